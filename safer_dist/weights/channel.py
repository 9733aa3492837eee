"""Learner -> rollout-worker weight sync: a channel of its own per member.

The members are learner rank 0 (member 0, the sender) and the M rollout workers (members
1..M). Each member opens a :class:`Channel` over one TCPStore hosted by member 0:

- **broadcast** (every member not on the sender's GPU): a torch.distributed process group of
  its own, built from the store directly (not ``init_process_group``: learners already belong
  to their default group and rollout workers to none). Gloo on CPU, NCCL on CUDA.
- **CUDA IPC hand-over** (a rollout worker on the sender's own GPU, as colocated placement puts
  worker 0 with learner rank 0): NCCL refuses two ranks of one group on one device, so the
  sender shares each bucket's memory instead (``torch.multiprocessing.reductions.reduce_tensor``:
  a CUDA IPC handle), the worker rebuilds the tensor from the handle, copies it into its
  parameters and acknowledges; only then is the bucket freed. The handles travel through the
  store. Never used on CPU, where every member broadcasts over gloo (the same code otherwise).
  This path needs two processes on one GPU and has not run in CI (no GPU there).

Who takes which path is decided once per group, from every member's device
(:mod:`safer_dist.weights.layout`). Parameters travel in flat buckets of at most ``bucket_mb``
in a fixed order (the module's ``named_parameters()`` order, tied weights once), so both sides
agree without exchanging them. Before the buckets the sender publishes the sync's version, dtype and element
count in the store; every receiver checks them against what it expects and holds, so weights of
another version or dtype are never read as if they were right. Under ZeRO-3 every learner rank
takes part in gathering each bucket; only rank 0 sends.

The channel can be rebuilt: a rollout worker that Ray restarted is a new process outside the old
group, so every member closes its channel (:func:`close_channel`) and opens a new one over a
fresh TCPStore on a new port (see :meth:`safer_dist.weights.driver.WeightSync.resync`).
"""

from __future__ import annotations

import contextlib
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

from safer_dist.weights.layout import Member


class Channel:
    """A member's end of the weight sync (see the module docstring)."""

    def __init__(self, host: str, port: int, member: Member, backend: str, *, local_ip: str, timeout_s: float = 600.0):
        timeout = timedelta(seconds=timeout_s)
        self.member = member
        self.store = dist.TCPStore(host, port, member.num_members, is_master=member.member == 0, timeout=timeout)
        self.group = None
        if member.group_rank is not None and member.group_size > 1:
            self.group = make_group(dist.PrefixStore("safer-weight-sync", self.store), member.group_rank,
                                    member.group_size, backend, local_ip=local_ip, timeout=timeout)

    def close(self) -> None:
        """Abort rather than shut down: a member may be dead, and a graceful shutdown could wait for it."""
        abort = getattr(self.group, "abort", None)  # not on every backend in every torch release
        if abort is not None:
            abort()


def make_group(store, rank: int, world_size: int, backend: str, *, local_ip: str, timeout: timedelta):
    """A process group of its own (not the default group) over ``store``; gloo binds to
    ``local_ip`` (this process's address)."""
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_ip)]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def close_channel(channel: Channel | None) -> None:
    """Leave a channel before opening a new one (None: nothing to leave)."""
    if channel is not None:
        channel.close()


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


def send_weights(module: torch.nn.Module, channel: Channel | None, *, rank: int, zero3: bool, version: int,
                 bucket_mb: float = 256.0) -> int:
    """Send ``module``'s parameters from learner rank 0 as ``version``: broadcast, and the CUDA-IPC
    hand-over to the sender's GPU peers. Collective over all learner ranks under ZeRO-3 (gather),
    otherwise only rank 0 needs to call it. Returns bytes sent."""
    params_all = list(module.named_parameters())
    if rank == 0:
        numel = sum(_numel(p) for _, p in params_all)
        channel.store.set(f"v{version}/meta", f"{params_all[0][1].dtype}:{numel}")
    sent = 0
    for i, bucket in enumerate(buckets(params_all, bucket_mb)):
        params = [p for _, p in bucket]
        if zero3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            if rank == 0:
                flat = torch.cat([p.data.reshape(-1) for p in params])
                if channel.group is not None:
                    channel.group.broadcast(flat, 0).wait()
                if channel.member.ipc_peers:
                    _hand_over(channel, flat, f"v{version}/b{i}")
                sent += flat.numel() * flat.element_size()
    return sent


def _hand_over(channel: Channel, flat: torch.Tensor, key: str) -> None:
    """Share ``flat``'s GPU memory with the IPC peers and wait until each copied it."""
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.current_stream(flat.device).synchronize()  # the bucket is written before a peer reads it
    channel.store.set(key, pickle.dumps(reduce_tensor(flat)))
    channel.store.wait([f"{key}/ack{m}" for m in channel.member.ipc_peers])
    channel.store.delete_key(key)


def check_meta(params: list[tuple[str, torch.nn.Parameter]], channel: Channel, version: int) -> None:
    """Wait for the sender's ``version`` and check its dtype and element count against
    ``params`` (a receiver's ``named_parameters()``; a sharded parameter counts whole):
    ValueError naming both when they differ."""
    mine = f"{params[0][1].dtype}:{sum(p.numel() for _, p in params)}"
    theirs = channel.store.get(f"v{version}/meta").decode()  # waits for the sender's version
    if theirs != mine:
        raise ValueError(f"weight sync version {version}: the learners send dtype:elements {theirs}, this rollout "
                         f"worker holds {mine}; model.dtype must give learners and rollout workers one dtype")


def receive_weights(module: torch.nn.Module, channel: Channel, *, version: int, bucket_mb: float = 256.0) -> None:
    """Receive ``version`` from :func:`send_weights` into ``module`` (same architecture and order),
    by broadcast or by the CUDA-IPC hand-over, as the channel's member says. ValueError when the
    sender's dtype or parameter count differ from this module's."""
    params_all = list(module.named_parameters())
    check_meta(params_all, channel, version)
    with torch.no_grad():
        for i, bucket in enumerate(buckets(params_all, bucket_mb)):
            params = [p for _, p in bucket]
            if channel.group is not None:
                flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
                channel.group.broadcast(flat, 0).wait()
            else:
                fn, args = pickle.loads(channel.store.get(f"v{version}/b{i}"))
                flat = fn(*args)  # the sender's bucket, in its memory on this GPU
                assert flat.dtype == params[0].dtype and flat.numel() == sum(p.numel() for p in params)
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            if channel.group is None:
                torch.cuda.current_stream(flat.device).synchronize()  # copied before the sender frees it
                del flat
                channel.store.set(f"v{version}/b{i}/ack{channel.member.member}", b"1")
    if channel.group is None:
        torch.cuda.ipc_collect()  # release the mappings of buckets the sender has freed
