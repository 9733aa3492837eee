"""Run a function on N real ranks (spawned processes, gloo), without Ray."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_accelerator(device: str) -> None:
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        os.environ.pop("DS_ACCELERATOR", None)


def _worker(rank, world_size, port, cfg, fn, queue, device):
    try:
        _set_accelerator(device)
        from safer_dist.train.learner import Learner

        learner = Learner(cfg.learner, cfg.train, cfg.model, cfg.data, seed=cfg.run.seed, device=device,
                          dpo_loss=cfg.erpo.loss)
        learner.setup(rank, world_size, "127.0.0.1", port)
        queue.put((rank, "ok", fn(learner)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))


def _group_worker(rank, world_size, port, fn, queue, device):
    try:
        _set_accelerator(device)
        from safer_dist.train.engine import init_distributed

        init_distributed(rank, world_size, "127.0.0.1", port, "gloo" if device == "cpu" else "nccl")
        queue.put((rank, "ok", fn(rank, world_size)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))


def _spawn(target, args_of_rank, world_size: int, timeout_s: float) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=args_of_rank(r, port, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def run_ranks(cfg, fn, world_size: int | None = None, timeout_s: float = 300.0, device: str = "cpu") -> list:
    """Start ``world_size`` (default learner.num_learners) ranks; return ``fn(learner)`` per rank.
    ``fn`` returns plain Python values: a tensor crosses the queue as a file descriptor that
    vanishes when its rank process exits (``.tolist()`` it)."""
    world_size = world_size or cfg.learner.num_learners
    return _spawn(_worker, lambda r, port, q: (r, world_size, port, cfg, fn, q, device), world_size, timeout_s)


def run_group(fn, world_size: int, timeout_s: float = 300.0, device: str = "cpu") -> list:
    """Start ``world_size`` ranks that only join a process group (DeepSpeed's, as learners do);
    return ``fn(rank, world_size)`` per rank (plain Python values, as for :func:`run_ranks`)."""
    return _spawn(_group_worker, lambda r, port, q: (r, world_size, port, fn, q, device), world_size, timeout_s)
