"""Tensor-parallel rollout workers: one worker spread over K ranks of one node.

With ``rollout.tensor_parallel: K`` > 1 each rollout worker is K Ray actors
(:class:`TensorParallelRank`) in a STRICT_PACK placement group of K bundles (one GPU each where
the learners get GPUs, ``rollout.cpus_per_worker`` CPUs each; the placement rule,
safer_dist/cluster/placement.py, never colocates them with learners), which form a torch.distributed
default group of their own (NCCL on CUDA, gloo on CPU). Each rank loads its shard of the model by
the model's own TP plan (transformers ``tp_plan="auto"``, :func:`safer_dist.train.models.load_model`):
a model that does not fit one device samples on K. The driver starts the ranks with
:class:`safer_dist.cluster.rollout.TensorParallelWorkers`.

    RolloutGroup ──call──▶ rank 0 (leader) ──same call, same arguments──▶ ranks 1..K-1
                             │ runs it too: every forward is collective over the K ranks
                   ◀── rank 0's answer, once the followers' are in (sampled tokens: equal)

Lock-step: every forward of a sharded model is a collective, so the K ranks must run the same
forwards in the same order. The leader hands each call (``generate``, ``sample``, ``logprobs``,
``logits``, ``receive_weights``) to the followers before running it itself, and returns its own
answer once theirs are in; the group talks to the leader alone, as to a 1-rank worker. The ranks
agree on everything that steers the sampler: the logits are gathered (``lm_head`` is sharded
with gathered output), an all-reduce leaves the same sum on every rank, and each row's random
stream is seeded from (seed, prefix, candidate), so the same rows end at the same step on every
rank. The ranks' ``sample`` answers are compared, and a difference is an error.

What runs sharded: the sampler's own attention (shared-prefix decode steps, the
``safer_segments`` prefill) and ``continuation_logprobs`` take whatever heads a rank holds, and
run unchanged. The oneDNN packed linear layers (:mod:`safer_dist.rollout.packed_linear`) do not: they
would replace the forward that the TP plan installs (the collectives around the local matmul),
so they skip sharded layers and a tensor-parallel worker samples through ``nn.Linear``.

Weights (:func:`receive_sharded_weights`): only the leader is a member of the weight sync
(weights/channel.py: one member per worker, as with 1-rank workers), always by broadcast: it is
never on learner rank 0's GPU, and refuses the CUDA-IPC hand-over if the layout offered it. The
leader checks the sync's version, dtype and element count like a 1-rank worker, receives each
bucket's full tensors from learner rank 0 and broadcasts the bucket over the TP group, and every rank copies
its own slice of each tensor (the slice its DTensor placement names: rows for colwise, columns
for rowwise, the whole tensor where replicated). Cost: each bucket crosses the node's links once
more (to K-1 followers: NVLink on a GPU node), and each rank holds one full bucket
(``bucket_mb``) at a time besides its shard; no rank ever holds the whole unsharded model.

Failures: a tensor-parallel worker is not restarted (``rollout.max_restarts`` does not apply),
because a new process cannot join its ranks' process group. A follower that dies fails the
worker's call with RolloutFailure naming it (raised in rank 0, so the caller's error is also a
RolloutFailure); a leader that dies is reported by the group (RolloutFailure: it could not be
restarted).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from safer_dist.rollout.worker import RolloutFailure, RolloutWorker
from safer_dist.config import ModelSection, RolloutSection
from safer_dist.train.engine import gloo_interface, resolve_device
from safer_dist.weights.channel import buckets, check_meta
from safer_dist.runtime.log import get_logger

log = get_logger("tp_rollout")

TIMEOUT_S = 600.0  # placement, rendezvous and model load; a rank waiting on its peers


class TensorParallelRank(RolloutWorker):
    """Rank ``rank`` of a tensor-parallel rollout worker of ``rollout.tensor_parallel`` ranks.

    Joins the ranks' default process group (rank 0 hosts it at ``addr:port``), then loads its
    shard. ``followers``: on rank 0, the handles of ranks 1..K-1, which it drives in lock-step;
    empty on the others.
    """

    def __init__(self, model: ModelSection, rollout: RolloutSection, *, path: str | None, device: str, rank: int,
                 addr: str, port: int, followers: list | tuple = (), timeout_s: float = TIMEOUT_S):
        self.rank, self.followers, self.timeout_s = rank, list(followers), timeout_s
        self.tensor_parallel = rollout.tensor_parallel
        backend = "nccl" if resolve_device(device) == "cuda" else "gloo"
        # Ray shows each rank its own GPU as device 0; transformers binds the device LOCAL_RANK names.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(self.tensor_parallel), LOCAL_RANK="0")
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
            ifname = gloo_interface(self.node_ip())
            if ifname:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        dist.init_process_group(
            backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=self.tensor_parallel,
            timeout=timedelta(seconds=timeout_s), **({"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}),
        )
        super().__init__(model, rollout, path=path, device=device)
        check_weight_layout(self.model, trust_remote_code=model.trust_remote_code)

    # -- calls, run by every rank in lock-step ------------------------------------------------
    def generate(self, prompts, **kwargs) -> list[dict]:
        return self._lockstep("generate", super().generate, (prompts,), kwargs, compare=False)  # latencies differ

    def sample(self, items, **kwargs) -> list[list[dict]]:
        return self._lockstep("sample", super().sample, (items,), kwargs)

    # Numbers are rank 0's: the ranks' agree wherever reductions give every rank the same sum,
    # which is the backend's business, not a lock-step requirement (sample's tokens are).
    def logprobs(self, items, share_prefix: bool = True) -> list[tuple[float, int]]:
        return self._lockstep("logprobs", super().logprobs, (items, share_prefix), {}, compare=False)

    def logits(self, input_ids: list[int]) -> torch.Tensor:
        return self._lockstep("logits", super().logits, (input_ids,), {}, compare=False)

    def receive_weights(self, version: int) -> int:
        """Receive a push of ``version`` (the leader from the learners, then every rank over the
        TP group), each rank keeping its own shards."""
        def receive() -> int:
            receive_sharded_weights(self.model, self.sync.channel if self.rank == 0 else None, version=version)
            self.version = version
            return version

        return self._lockstep("receive_weights", receive, (), {}, follower_args=(version,))

    def init_sync(self, host: str, port: int, member) -> None:
        """Rank 0 opens the worker's end of the weight sync; a broadcast member only (a
        tensor-parallel worker is never on learner rank 0's GPU: it is placed apart)."""
        if member.group_rank is None:
            raise RuntimeError(
                "a tensor-parallel rollout worker shares learner rank 0's GPU, so the weight sync offered it the "
                "CUDA-IPC hand-over, which cannot fill sharded weights; tensor-parallel workers must be placed apart "
                "from the learners (rollout.placement=separate)"
            )
        super().init_sync(host, port, member)

    def _lockstep(self, name: str, run, args: tuple, kwargs: dict, *, compare: bool = True,
                  follower_args: tuple | None = None):
        """``run(*args, **kwargs)`` here, after handing method ``name`` to the followers (with
        ``follower_args`` where given, else the same arguments); this rank's answer, once
        theirs are in and, with ``compare``, equal to it."""
        refs = [getattr(f, name).remote(*(args if follower_args is None else follower_args), **kwargs)
                for f in self.followers]
        try:
            mine = run(*args, **kwargs)
        except BaseException:
            # Given the same arguments, the followers fail alike (or time out in a collective):
            # let them finish before the error leaves, so the next call finds them idle. If one
            # died (which fails this rank's collective), say so rather than how the collective failed.
            if refs:
                import ray

                ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
                self._raise_if_dead(name, refs)
            raise
        theirs = self._collect(name, refs)
        if compare:
            for r, answer in enumerate(theirs, 1):
                if answer != mine:
                    raise RuntimeError(f"tensor-parallel rank {r} answered {name} differently from rank 0: the ranks "
                                       "are out of lock-step")
        return mine

    def _raise_if_dead(self, name: str, refs: list) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        for r, ref in enumerate(refs, 1):
            try:
                ray.get(ref, timeout=0)
            except RayActorError as e:
                raise self._died(r, name, e) from None
            except (GetTimeoutError, RayError):  # still running, or failed as this rank did
                pass

    @staticmethod
    def _died(rank: int, name: str, err: Exception) -> RolloutFailure:
        return RolloutFailure(
            f"tensor-parallel rank {rank} of this rollout worker died during {name}; a tensor-parallel worker "
            f"cannot replace a rank (its process group is fixed): {(str(err).strip().splitlines() or [''])[0]}"
        )

    def _collect(self, name: str, refs: list) -> list:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.timeout_s
        out = []
        for r, ref in enumerate(refs, 1):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except RayActorError as e:
                raise self._died(r, name, e) from None
            except GetTimeoutError:
                raise RolloutFailure(
                    f"tensor-parallel rank {r} of this rollout worker did not finish {name} within "
                    f"{self.timeout_s:.0f} s of rank 0"
                ) from None
        return out


def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of parameter ``p`` this rank stores (an alias: writing to it writes ``p``)."""
    return p.to_local() if _is_dtensor(p) else p


def _is_dtensor(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def shard_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (the whole tensor of parameter ``p``), cut as ``p`` is
    sharded: by its DTensor placements (a local slice, no communication), else all of it."""
    if not _is_dtensor(p):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


def check_weight_layout(model: torch.nn.Module, *, trust_remote_code: bool = False) -> None:
    """Refuse a sharded ``model`` that :func:`receive_sharded_weights` cannot fill: its
    parameters must come in the order and with the full shapes of the unsharded model, which is
    what the learners send (a sharded parameter as a DTensor; a transformers release that held
    the shards as plain local tensors would show smaller shapes)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(model.config, trust_remote_code=trust_remote_code)
    want = [(n, tuple(p.shape)) for n, p in whole.named_parameters()]
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if got != want:
        diff = next(((g, w) for g, w in zip(got, want) if g != w), (got[len(want):] or None, want[len(got):] or None))
        raise RuntimeError(
            "rollout.tensor_parallel: this transformers release shards the model so that a weight push cannot "
            f"fill it (parameters must show the unsharded model's names, order and full shapes; first difference: "
            f"{diff[0]} where the learners send {diff[1]}); use a transformers release whose tensor parallelism "
            "holds DTensor parameters (5.25 does), or rollout.tensor_parallel=1"
        )


def receive_sharded_weights(module: torch.nn.Module, channel, *, version: int, bucket_mb: float = 256.0) -> None:
    """Receive a ``send_weights`` push of ``version`` into a tensor-parallel ``module``:
    collective over its ranks (the default process group). Rank 0 holds ``channel`` (its
    ``weight_sync.Channel``, a broadcast member; None on the other ranks), checks the sync's
    version, dtype and size (ValueError, raised on every rank, when they differ), and passes
    each bucket on over the default group; every rank copies its own part of each tensor
    (:func:`shard_of`).

    The buckets are those of :func:`safer_dist.weights.channel.buckets` over the parameters'
    full shapes (a DTensor's ``numel`` is the whole tensor's), so they match the sender's."""
    params_all = list(module.named_parameters())
    error = [None]
    if channel is not None:
        try:
            check_meta(params_all, channel, version)
        except ValueError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)  # the ranks stop together, before any bucket
    if error[0] is not None:
        raise ValueError(error[0])
    with torch.no_grad():
        for bucket in buckets(params_all, bucket_mb):
            params = [p for _, p in bucket]
            flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=_local(params[0]).device)
            if channel is not None:
                channel.group.broadcast(flat, 0).wait()
            dist.broadcast(flat, src=0)
            offset = 0
            for p in params:
                full = flat[offset : offset + p.numel()].view(p.shape)
                _local(p).copy_(shard_of(full, p))
                offset += p.numel()
