"""Learner -> rollout-worker weight sync over a torch.distributed group of its own.

The sync group has learner rank 0 as member 0 and the M rollout workers as members 1..M.
It is built from a TCPStore directly (not ``init_process_group``), because learners already
belong to their own default group and rollout workers belong to none. Gloo on CPU, NCCL
on CUDA.

Parameters travel in flat buckets of at most ``bucket_mb`` in a fixed order (the module's
``named_parameters()`` order, tied weights once), so both sides agree without exchanging
metadata. Under ZeRO-3 every learner rank takes part in gathering each bucket; only rank 0
sends. Each sync carries a version number the workers record.

The group can be rebuilt: a rollout worker that Ray restarted is a new process outside the old
group, so every member closes its group (:func:`close_group`) and joins a new one over a fresh
TCPStore on a new port (see ``LearnerGroup.resync``).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist


def make_group(host: str, port: int, rank: int, world_size: int, backend: str, *, local_ip: str, timeout_s: float = 600.0):
    """A process group of its own (not the default group) over a fresh TCPStore hosted by
    member 0 at ``host:port``; gloo binds to ``local_ip`` (this process's address)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    store = dist.PrefixStore("safer-weight-sync", store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_ip)]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def close_group(group) -> None:
    """Tear down a group built by :func:`make_group` before joining a new one. Aborts rather
    than shuts down: a member may be dead, and a graceful shutdown could wait for it."""
    if group is None:
        return
    abort = getattr(group, "abort", None)  # not on every backend in every torch release
    if abort is not None:
        abort()


def buckets(params: list[tuple[str, torch.nn.Parameter]], bucket_mb: float) -> list[list[tuple[str, torch.nn.Parameter]]]:
    limit = int(bucket_mb * 2**20)
    out, cur, size = [], [], 0
    for name, p in params:
        n = _numel(p) * p.element_size()
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append((name, p))
        size += n
    if cur:
        out.append(cur)
    return out


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def send_weights(module: torch.nn.Module, group, *, rank: int, zero3: bool, bucket_mb: float = 256.0) -> int:
    """Broadcast ``module``'s parameters from learner rank 0. Collective over all learner ranks
    under ZeRO-3 (gather), otherwise only rank 0 needs to call it. Returns bytes sent."""
    sent = 0
    for bucket in buckets(list(module.named_parameters()), bucket_mb):
        params = [p for _, p in bucket]
        if zero3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            if rank == 0:
                flat = torch.cat([p.data.reshape(-1) for p in params])
                group.broadcast(flat, 0).wait()
                sent += flat.numel() * flat.element_size()
    return sent


def receive_weights(module: torch.nn.Module, group, *, bucket_mb: float = 256.0) -> None:
    """Receive a broadcast from ``send_weights`` into ``module`` (same architecture and order)."""
    with torch.no_grad():
        for bucket in buckets(list(module.named_parameters()), bucket_mb):
            params = [p for _, p in bucket]
            flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            group.broadcast(flat, 0).wait()
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

