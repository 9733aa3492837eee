"""Who takes which path of the weight sync: the broadcast, or the CUDA-IPC hand-over.

The members are learner rank 0 (member 0, the sender) and the M rollout workers (members
1..M). A worker on the sender's own GPU (colocated placement puts worker 0 with learner rank 0)
gets the hand-over, because NCCL refuses two ranks of one group on one device; every other
member joins the broadcast group (:mod:`safer_dist.weights.channel`). The driver decides this
once per group from every member's :func:`device_key` (:mod:`safer_dist.weights.driver`).

Light on purpose: the driver imports it without torch (the CLI's light imports,
tests/unit/test_imports.py); torch and ray are imported where a device is asked about, in the
actors.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    """One member's place in the weight sync (:func:`layout`)."""

    member: int  # 0: learner rank 0 (the sender); i + 1: rollout worker i
    num_members: int
    group_rank: int | None  # rank in the broadcast group; None: receives by CUDA IPC
    group_size: int
    ipc_peers: tuple[int, ...] = ()  # the sender's: members it hands buckets to by CUDA IPC


def device_key(device: str) -> str | None:
    """This process's device as the weight sync compares them: the node and GPU UUID on CUDA,
    None on CPU (never shared by IPC)."""
    if device != "cuda":
        return None
    # Heavy, and only ever needed inside an actor on a GPU.
    import ray
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{ray.util.get_node_ip_address()}/{props.uuid}"


def member_device_key(actor) -> str | None:
    """:func:`device_key` of a learner or rollout-worker actor (run through ``__ray_call__``)."""
    return device_key(actor.device)


def layout(keys: list[str | None]) -> list[Member]:
    """Each member's path given every member's :func:`device_key` (``keys[0]``: the sender):
    members on the sender's GPU get the CUDA-IPC hand-over, the others broadcast."""
    n = len(keys)
    ipc = tuple(m for m in range(1, n) if keys[0] is not None and keys[m] == keys[0])
    group = [m for m in range(n) if m not in ipc]
    return [Member(m, n, group.index(m) if m in group else None, len(group), ipc if m == 0 else ()) for m in range(n)]


def free_address() -> tuple[str, int]:
    """This node's IP (as Ray sees it) and a free port: where a process group's first member
    listens (the weight sync's learner rank 0, a tensor-parallel worker's rank 0)."""
    import ray  # heavy: imported by the calls that use it (this module stays light)

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]
