"""Host memory (RAM) per node of a SLURM job: what `safer slurm submit` asks for as ``--mem``.

The tensors come from the planner's memory model (safer_dist/cluster/gpu_memory.py); the rest is an allowance
per process. For the fullest node (``l`` learners, ``w`` rollout workers)::

    per node = NODE_HOST_BYTES                   Ray's daemons (GCS, raylet, agents), the driver
             + l x (process + learner tensors)
             + w x (process + worker tensors)

    process  = PROCESS_HOST_BYTES                Python, torch, transformers, DeepSpeed, Ray's
                                                 core worker; CUDA_PROCESS_HOST_BYTES on GPUs
                                                 (CUDA context, pinned staging buffers)
    GPU learner:  d·P (the weights are read on the host at load, d = 2 bytes in bf16/fp16,
                  4 in fp32) + the optimizer states and fp32 gradients offloaded to the host
                  (gpu_memory.model_states' cpu_per_node for one GPU)
    CPU learner:  4P (fp32 weights as loaded) + gradients + optimizer states (ZeRO-partitioned
                  over learner.num_learners) + activations + logits + DeepSpeed's bucket
                  buffers, all from gpu_memory.estimate in fp32; the buffers count only up to 4P (a
                  bucket's pages are touched only as far as the gradients fill it)
    GPU rollout worker: 2P (the bf16 weights pass through the host)
    CPU rollout worker: gpu_memory.rollout_bytes in fp32 (weights, KV cache, scoring logits)
    With rollout.tensor_parallel = K each worker is K processes, each holding a K-th of the
    weights and KV cache (transformers reads each rank's slice of the checkpoint, safetensors
    get_slice): 2P/K on a GPU host, gpu_memory.rollout_bytes(tensor_parallel=K) on CPU.

With ``checkpoint.async_save`` each learner also holds a host copy of its checkpoint files
while they are written (safer_dist/checkpointing/async_save.py): its optimizer partition,
12P / W (fp32 master weights and Adam moments; W = learner.num_learners, 1 under ZeRO-0), and
under ZeRO-3 its d·P / W of the weights; under ZeRO-0/1/2 rank 0 alone writes the whole d·P
module, counted once on the fullest node.

How many learners and rollout workers (of every rollout group) each node holds comes from the
placement rule (safer_dist/cluster/placement.py), phase by phase; the fullest node of any phase
is the one asked for. A colocated worker is a process of its own like a separate one, so it
counts the same, and so does each rank of a tensor-parallel worker. It errs on the large side: a job killed for memory loses more than one that
asks too much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from safer_dist.cluster.placement import Cluster, placement
from safer_dist.cluster.gpu_memory import GIB, Setup, estimate, resolve_shape, rollout_bytes
from safer_dist.config import Config

NODE_HOST_BYTES = 2 * GIB
PROCESS_HOST_BYTES = 1.5 * GIB
CUDA_PROCESS_HOST_BYTES = 3 * GIB


@dataclass(frozen=True)
class HostMemory:
    """Bytes per node for the fullest node of the job."""

    learners: int
    workers: int
    learner_bytes: float  # each, process allowance included
    worker_bytes: float
    # once per node: rank 0's host copy of the whole module during an asynchronous checkpoint
    once_bytes: float = 0.0

    @property
    def per_node(self) -> float:
        return NODE_HOST_BYTES + self.learners * self.learner_bytes + self.workers * self.worker_bytes + self.once_bytes

    def slurm_mem(self) -> str:
        """``--mem`` value: whole GiB, rounded up."""
        return f"{math.ceil(self.per_node / GIB)}G"

    def describe(self) -> str:
        parts = [f"Ray + driver {NODE_HOST_BYTES / GIB:.1f}",
                 f"{self.learners} learner(s) x {self.learner_bytes / GIB:.1f}"]
        if self.workers:
            parts.append(f"{self.workers} rollout worker(s) x {self.worker_bytes / GIB:.1f}")
        if self.once_bytes:
            parts.append(f"rank 0's asynchronous checkpoint copy of the module {self.once_bytes / GIB:.1f}")
        return " + ".join(parts) + f" = {self.per_node / GIB:.1f} GiB per node"


def host_memory(cfg: Config, *, nodes: int, gpus_per_node: int, cpus_per_node: int, stage: str,
                model_dir: str | Path | None = None, shape: str | None = None) -> HostMemory:
    """Estimate ``cfg``'s host memory per node on ``nodes`` SLURM nodes. ``stage``: run, sft or erpo
    (SFT places no rollout workers). ``model_dir``: where model.path is (default: as configured);
    ``shape``: a shape name or config.json as `safer plan --shape` takes, instead of the model's.
    Raises ValueError when the model's shape is unknown (no config.json, no init preset)."""
    lr, ro = cfg.learner, cfg.rollout
    shape, _ = resolve_shape(str(model_dir or cfg.model.path), cfg.model.init_preset, shape)
    p = float(shape.num_params())
    where = placement(cfg, stage, Cluster.uniform(nodes, gpus_per_node, cpus_per_node))
    gpu = where.gpu
    k = ro.tensor_parallel  # a rollout worker is k processes, each holding a k-th of the model
    seq = cfg.data.max_seq_len
    if gpu:
        mixed = cfg.model.dtype in ("auto", "bfloat16", "float16")
        setup = Setup(lr.zero_stage, lr.offload_optimizer, lr.offload_params, cfg.model.gradient_checkpointing,
                      cfg.train.micro_batch_size)
        est = estimate(shape, setup, world_size=lr.num_learners, gpus_per_node=1, max_seq_len=seq,
                       mixed_precision=mixed, loss_chunk_tokens=lr.loss_chunk_tokens)
        learner = CUDA_PROCESS_HOST_BYTES + (2 if mixed else 4) * p + est.cpu_per_node
        worker = CUDA_PROCESS_HOST_BYTES + 2 * p / k
    else:
        mixed = False  # CPU learners train in fp32
        setup = Setup(lr.zero_stage, False, False, cfg.model.gradient_checkpointing, cfg.train.micro_batch_size)
        est = estimate(shape, setup, world_size=lr.num_learners, gpus_per_node=1, max_seq_len=seq,
                       mixed_precision=False, loss_chunk_tokens=lr.loss_chunk_tokens)
        learner = (PROCESS_HOST_BYTES + 4 * p + est.grads + est.optimizer + est.activations + est.logits
                   + min(est.buffers, 4 * p))
        worker = PROCESS_HOST_BYTES + 2 * rollout_bytes(shape, rows=ro.batch_size, tokens_per_row=seq,
                                                        tensor_parallel=k)["total"]
    once = 0.0
    if cfg.checkpoint.async_save:  # the host copy of each rank's checkpoint files (module docstring)
        d = 2 if mixed else 4
        w = lr.num_learners if lr.zero_stage >= 1 else 1
        learner += 12 * p / w + (d * p / lr.num_learners if lr.zero_stage == 3 else 0.0)
        once = 0.0 if lr.zero_stage == 3 else d * p
    counts = [(0, 0)]
    for phase in where.phases:
        if phase.nodes is None:  # does not fit (check_fits says why): as if spread evenly
            per_role = {a.role: math.ceil(a.processes / nodes) for a in phase.actors.values()}
            loads = [per_role]
        else:
            loads = phase.nodes
        counts += [(n.get("learner", 0), sum(v for k, v in n.items() if k != "learner")) for n in loads]
    n_learners, n_workers = max(counts, key=lambda c: c[0] * learner + c[1] * worker + (once if c[0] else 0.0))
    return HostMemory(n_learners, n_workers, learner, worker, once if n_learners else 0.0)
