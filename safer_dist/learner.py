"""One learner rank: a DeepSpeed ZeRO engine over a Hugging Face causal LM.

A ``Learner`` is a plain object; :mod:`safer_dist.group` runs one per Ray actor. Ranks form
their own torch.distributed group (gloo on CPU, NCCL on CUDA) from the address rank 0
publishes. Each rank derives its shard of every global batch itself (see
:mod:`safer_dist.sft_data`), so no tokens pass through the driver.

Loss scaling: DeepSpeed divides the loss by the gradient-accumulation steps (GAS) and
averages gradients over the W data-parallel ranks. Each micro-batch's loss is the summed
token NLL over the *global* count N of labelled tokens, multiplied by GAS*W to undo both,
so the applied gradient is exactly that of mean NLL over the global batch — identical for
any split into ranks and micro-batches.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safer_dist.config import DataSection, LearnerSection, ModelSection, TrainSection
from safer_dist.log import get_logger, quiet_libraries

log = get_logger("learner")


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


def lr_lambda(train: TrainSection):
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""

    warmup = min(train.warmup_steps, train.max_steps)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, train.max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(learner: LearnerSection, train: TrainSection, world_size: int, dtype: torch.dtype) -> dict:
    gas = train.global_batch_size // (train.micro_batch_size * world_size)
    zero: dict[str, Any] = {"stage": learner.zero_stage}
    if learner.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if learner.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if learner.zero_stage == 3:
        # Gather full 16-bit weights on save so export needs no conversion step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": train.grad_clip,
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


class Learner:
    """One data-parallel rank. Methods are called by the driver through Ray."""

    def __init__(
        self, learner: LearnerSection, train: TrainSection, model: ModelSection, data: DataSection,
        *, seed: int, device: str = "auto",
    ):
        self.cfg, self.train_cfg, self.model_cfg, self.data_cfg = learner, train, model, data
        self.seed = seed
        self.device = resolve_device(device)
        if self.device == "cpu":
            torch.set_num_threads(learner.cpus_per_learner)
        self.engine = None
        self._hf_ds_config = None  # ZeRO-3: transformers' HfDeepSpeedConfig, which it only references weakly
        self._data = None
        self._pairs = None

    # -- set-up ---------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to publish."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int) -> dict:
        import deepspeed

        from safer_dist.models import count_params, load_tokenizer

        self.rank, self.world_size = rank, world_size
        quiet_libraries()
        import ray

        init_distributed(
            rank, world_size, master_addr, master_port, "nccl" if self.device == "cuda" else "gloo",
            local_ip=ray.util.get_node_ip_address(),
        )
        random.seed(self.seed + rank)
        np.random.seed(self.seed + rank)
        torch.manual_seed(self.seed)
        self.dtype = resolve_dtype(self.model_cfg.dtype, self.device)
        self.tokenizer = load_tokenizer(self.model_cfg.path, trust_remote_code=self.model_cfg.trust_remote_code)
        t = self.train_cfg
        ds_config = deepspeed_config(self.cfg, t, world_size, self.dtype)
        model = self._load_model(ds_config)
        if self.model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.attn_implementation = model.config._attn_implementation
        optimizer = None
        if self.cfg.offload_optimizer:
            ds_config["optimizer"] = {
                "type": "AdamW",
                "params": {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "weight_decay": t.weight_decay},
            }
        else:
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                foreach=self.device == "cuda",
            )
        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))) if optimizer is None else (
            torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=model.parameters() if optimizer is None else None,
        )
        return {
            "rank": rank, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation,
            "num_params": count_params(model),
        }

    def _load_model(self, ds_config: dict):
        """The model to train. Under ZeRO-3 it is built and loaded partitioned, so no rank ever
        holds the full weights (:mod:`safer_dist.partitioned_load`); otherwise every rank loads
        it whole, as rollout workers do."""
        from safer_dist.models import load_model

        m = self.model_cfg
        if self.cfg.zero_stage == 3:
            from safer_dist.partitioned_load import load_model_partitioned

            model, self._hf_ds_config = load_model_partitioned(
                m.path, dtype=self.dtype, ds_config=ds_config, attn_implementation=m.attn_implementation,
                device=self.device, trust_remote_code=m.trust_remote_code,
            )
            return model
        return load_model(m.path, dtype=self.dtype, attn_implementation=m.attn_implementation, device=self.device,
                          trust_remote_code=m.trust_remote_code)

    # -- training -------------------------------------------------------------------------
    def _all_reduce(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sft_step(self, step: int) -> dict:
        """One optimizer step on global batch ``step``. Returns global metrics (same on all ranks)."""
        from safer_dist.losses import sft_loss
        from safer_dist.sft_data import Encoded, num_label_tokens, pack

        t0 = time.perf_counter()
        t = self.train_cfg
        batches, counts = self._sft_data().micro_batches(
            step, global_batch_size=t.global_batch_size, rank=self.rank,
            world_size=self.world_size, micro_batch_size=t.micro_batch_size,
        )
        local_label = sum(num_label_tokens(b) for b in batches if b is not None)
        local_tokens = sum(b["input_ids"].numel() for b in batches if b is not None)
        n_label, n_tokens, n_trunc, n_drop = self._all_reduce(
            [local_label, local_tokens, counts["truncated"], counts["dropped"]]
        )
        scale = self.engine.gradient_accumulation_steps() * self.world_size
        lr = self.engine.get_lr()[0]
        loss_sum = 0.0
        for b in batches:
            if b is None:  # every example of this micro-batch was dropped: keep ranks in step
                b = pack([Encoded([self.tokenizer.eos_token_id], [-100])])
            b = {k: v.to(self.device) for k, v in b.items()}
            logits = self.engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
            loss = sft_loss(logits, b["labels"], max(n_label, 1.0)) + 0.0 * logits.sum()
            self.engine.backward(loss * scale)
            self.engine.step()
            loss_sum += float(loss.detach())
        (loss_global,) = self._all_reduce([loss_sum])
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss_global, "lr": lr, "num_tokens": int(n_tokens), "num_loss_tokens": int(n_label),
            "truncated": int(n_trunc), "dropped": int(n_drop),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time_s": time.perf_counter() - t0,
        }

    def _sft_data(self):
        if self._data is None:
            from safer_dist.data.records import load_records
            from safer_dist.sft_data import SFTData

            self._data = SFTData(
                load_records(self.data_cfg.train, "sft"), self.tokenizer, seed=self.seed,
                max_seq_len=self.data_cfg.max_seq_len, overlong=self.data_cfg.overlong,
                segment_dropout=self.data_cfg.segment_dropout,
            )
        return self._data

    # -- step-level DPO -------------------------------------------------------------------
    def load_pairs(self, path: str, seed: int, safety_repeats: int = 1) -> int:
        """Read an iteration's pairs (written by the driver before training); returns how many
        the learner trains on per epoch (safety pairs count ``safety_repeats`` times)."""
        import json

        from safer_dist.pairs import PairData

        recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        self._pairs = PairData([r for r in recs if r.get("chosen") is not None], self.tokenizer, seed=seed,
                               safety_repeats=safety_repeats)
        return len(self._pairs)

    def dpo_step(self, step: int, erpo) -> dict:
        """One optimizer step of step-level DPO on pair batch ``step`` of the loaded pairs.

        ``erpo`` is the ErpoSection (beta, label smoothing, length alpha, NLL weight).
        Reference log-probs come with the pairs (computed by rollout workers at sampling).
        """
        from safer_dist.losses import sequence_logprobs, step_dpo_loss

        t0 = time.perf_counter()
        t = self.train_cfg
        batches = self._pairs.micro_batches(
            step, global_batch_size=t.global_batch_size, rank=self.rank, world_size=self.world_size,
            micro_batch_size=t.micro_batch_size,
        )
        n_tokens_local = sum(b["input_ids"].numel() for b in batches)
        n_chosen_local = sum(int(b["chosen_len"].sum()) for b in batches)
        n_tokens, n_chosen = self._all_reduce([n_tokens_local, n_chosen_local])
        n_pairs = t.global_batch_size
        scale = self.engine.gradient_accumulation_steps() * self.world_size
        lr = self.engine.get_lr()[0]
        sums = {"loss": 0.0, "margin": 0.0, "acc": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0}
        for b in batches:
            k = int(b["num_pairs"])
            dev = {key: b[key].to(self.device) for key in ("input_ids", "position_ids", "labels", "seq_ids")}
            logits = self.engine(input_ids=dev["input_ids"], position_ids=dev["position_ids"], use_cache=False).logits
            logp, _ = sequence_logprobs(logits, dev["labels"], dev["seq_ids"], 2 * k)
            logp = logp.double()
            chosen, rejected = logp[0::2], logp[1::2]
            loss, stats = step_dpo_loss(
                chosen, rejected, b["ref_chosen"].to(logp), b["ref_rejected"].to(logp), beta=erpo.beta,
                num_pairs_global=n_pairs, label_smoothing=erpo.label_smoothing, length_alpha=erpo.length_alpha,
                chosen_len=b["chosen_len"].to(self.device), rejected_len=b["rejected_len"].to(self.device),
                nll_weight=erpo.nll_weight, chosen_nll_sum=-chosen, num_chosen_tokens_global=max(n_chosen, 1.0),
            )
            self.engine.backward(loss.float() * scale)
            self.engine.step()
            sums["loss"] += float(loss.detach())
            sums["margin"] += float(stats["margin"].sum())
            sums["acc"] += float((stats["margin"] > 0).double().sum())
            sums["reward_chosen"] += float(stats["reward_chosen"].sum())
            sums["reward_rejected"] += float(stats["reward_rejected"].sum())
        loss, margin, acc, rc, rr = self._all_reduce([sums[k] for k in ("loss", "margin", "acc", "reward_chosen", "reward_rejected")])
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss, "lr": lr, "reward_margin": margin / n_pairs, "preference_accuracy": acc / n_pairs,
            "reward_chosen": rc / n_pairs, "reward_rejected": rr / n_pairs, "num_pairs": n_pairs,
            "num_tokens": int(n_tokens), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time_s": time.perf_counter() - t0,
        }

    # -- weight sync to rollout workers -----------------------------------------------------
    def init_sync(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins the weight-sync group as member 0 (other ranks have nothing to join)."""
        if self.rank == 0:
            from safer_dist.weight_sync import make_group

            import ray

            backend = "nccl" if self.device == "cuda" else "gloo"
            self.sync_group = make_group(host, port, 0, world_size, backend, local_ip=ray.util.get_node_ip_address())

    def send_weights(self, version: int) -> int:
        """Broadcast the current weights to the rollout workers. Collective under ZeRO-3."""
        from safer_dist.weight_sync import send_weights

        return send_weights(self.engine.module, getattr(self, "sync_group", None), rank=self.rank,
                            zero3=self.cfg.zero_stage == 3)

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> None:
        """Write this rank's shards and RNG state into ``root/tag``. Collective."""
        self.engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), Path(root) / tag / f"rng_rank{self.rank}.pt")

    def load_checkpoint(self, root: str, tag: str, *, load_optimizer: bool = True, universal: bool = False) -> dict:
        """Restore shards, scheduler and this rank's RNG from ``root/tag``. Collective."""
        from safer_dist.safe_load import weights_only_torch_load

        self.engine._config.load_universal_checkpoint = universal
        # DeepSpeed asks torch.load for full pickle; force weights-only (safer_dist/safe_load.py).
        with weights_only_torch_load():
            path, client_state = self.engine.load_checkpoint(
                root, tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer,
                load_module_strict=True,
            )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root}/{tag}")
        rng_file = Path(root) / tag / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return client_state or {}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated weights on rank 0 (None elsewhere). Collective under ZeRO-3."""
        if self.cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict() if self.rank == 0 else None
        if sd is None or self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    def export_hf(self, out_dir: str) -> None:
        """Write a Hugging Face directory (safetensors, config, tokenizer). Collective."""
        from safer_dist.export import save_hf_atomically

        sd = self.full_state_dict()
        if self.rank == 0:
            save_hf_atomically(self.engine.module, self.tokenizer, out_dir, state_dict=sd)

    def logits(self, input_ids: list[int]) -> torch.Tensor:
        """Logits of one unpacked sequence under the current weights (for tests). Collective under ZeRO-3."""
        ids = torch.tensor([input_ids], device=self.device)
        with torch.no_grad():
            return self.engine(input_ids=ids, use_cache=False).logits[0].float().cpu()
