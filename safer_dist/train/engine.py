"""Rank plumbing for a learner: device and dtype choice, the DeepSpeed config, the process
group, the RNG state a checkpoint carries (per rank), reading a step's metrics back in one host
synchronisation, and the profiler ranges a step marks."""

from __future__ import annotations

import importlib
import os
import random
from typing import Any

import numpy as np
import torch

from safer_dist.config import LearnerSection, OptimSection


# Profiler ranges around a micro-batch's phases (torch.profiler; bench/gpu.py --profile reads them).
FORWARD_LOSS, BACKWARD, OPTIMIZER_STEP = PHASES = ("safer.forward_loss", "safer.backward", "safer.optimizer_step")


def read_numbers(values: list, device: str) -> list[float]:
    """``values`` (tensors of any shape, numbers, ``None`` for NaN, as DeepSpeed may give a grad norm)
    as one flat list of floats in order: the tensors come back from ``device`` in one copy, a step's
    only host synchronisation."""
    tensors = [v.detach().reshape(-1).to(device, torch.float64) for v in values if torch.is_tensor(v)]
    read = iter(torch.cat(tensors).tolist() if tensors else [])
    out: list[float] = []
    for v in values:
        if torch.is_tensor(v):
            out += [next(read) for _ in range(v.numel())]
        else:
            out.append(float("nan") if v is None else float(v))
    return out


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("launch.device=cuda but no CUDA device is visible to this learner")
    return requested


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, requested)


def client_optimizer_kwargs(device: str) -> dict:
    """How ``torch.optim.AdamW`` runs the learner's client optimizer on ``device``: on CUDA the
    fused kernel (the whole update in a few launches instead of several per parameter tensor;
    DeepSpeed hands it its fp32 master partitions, which are CUDA tensors); elsewhere the
    per-tensor loop (``foreach=False``), whose CPU results the tests pin."""
    if torch.device(device).type == "cuda":
        return {"fused": True}
    return {"foreach": False}


def deepspeed_config(learner: LearnerSection, optim: OptimSection, world_size: int, dtype: torch.dtype) -> dict:
    gas = optim.global_batch_size // (optim.micro_batch_size * world_size)
    zero: dict[str, Any] = {"stage": learner.zero_stage}
    if learner.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if learner.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if learner.zero_stage == 3:
        # Gather full 16-bit weights on save so export needs no conversion step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": optim.global_batch_size,
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, backend: str, *, local_ip: str | None = None,
) -> None:
    """Join the default process group. ``local_ip``: this node's address (Ray's); gloo then
    talks over the interface that holds it (see :func:`gloo_interface`)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
    )
    if backend == "gloo" and local_ip and "GLOO_SOCKET_IFNAME" not in os.environ:
        ifname = gloo_interface(local_ip)
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
    import deepspeed

    # DeepSpeed JIT-compiles a shared-memory op (~30 s) at init that only inference
    # all-reduce uses; skip it. It must be patched on the module object itself.
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, dist_init_required=True)


def gloo_interface(ip: str) -> str | None:
    """The network interface holding ``ip``, or None.

    Without GLOO_SOCKET_IFNAME gloo binds to the address the *hostname* resolves to; where
    that is 127.0.0.1 (common in /etc/hosts, and on the dev cluster, whose nodes share one
    hostname) every rank advertises loopback and ranks on other hosts cannot connect.
    Ray's node address is the one the other hosts reach, so use its interface.
    """
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None


def rng_state() -> dict:
    return {
        "python": list(_flatten(random.getstate())),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _flatten(state):
    version, internal, gauss = state
    return [version, *internal, -1 if gauss is None else gauss]


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def set_rng_state(state: dict) -> None:
    flat = state["python"]
    gauss = None if flat[-1] == -1 else flat[-1]
    random.setstate((flat[0], tuple(int(x) for x in flat[1:-1]), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
