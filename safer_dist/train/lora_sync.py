"""Weight sync of LoRA learners to rollout workers (the sync group of
:mod:`safer_dist.erpo.weight_sync`; learner rank 0 sends).

Rollout workers hold a plain model loaded from the same directory the learners' frozen base
came from (ERPO: the SFT export), so after each iteration only the adapters travel:

    learner rank 0 ──(lora_A, lora_B of every adapted layer, fp32, learner order)──▶ workers
    worker: W = merge_weight(W_base, A, B, alpha / r)   (W_base: its copy of the weights as loaded)

:func:`~safer_dist.train.lora.merge_weight` is the merge the exports use, on the same inputs
(the adapters travel in fp32, which holds bf16 or fp32 values exactly), so a worker holds the
merged export's weights bit for bit where both merge on the same kind of device. Each worker
keeps the adapted layers' loaded weights in host memory (about the model's size) to merge onto.
Bytes per sync: the adapters in fp32, ~4% of the demo model at rank 8.

A 4-bit (QLoRA) base is the exception: the learners train against the NF4 weights, not the
checkpoint's, so the learners send merged weights over the dequantized base
(:meth:`~safer_dist.train.lora.Adapters.merged_buckets`), the whole model every time.
Both sides choose with :func:`adapters_only` from the same ``model`` section.
"""

from __future__ import annotations

import contextlib

import torch

from safer_dist.config import ModelSection
from safer_dist.erpo.weight_sync import buckets
from safer_dist.runtime.log import get_logger
from safer_dist.train.lora import ADAPTER, Adapters, is_adapter_name, merge_weight, peft_config, scaling

log = get_logger("lora")


def adapters_only(model: ModelSection) -> bool:
    """Whether a sync carries the adapters alone (else the merged weights)."""
    return model.lora.enabled and model.quantization == "none"


def _fp32_standins(named: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, torch.Tensor]]:
    """What the buckets are formed over on both sides: each adapter's shape in fp32."""
    return [(n, torch.empty(shape, dtype=torch.float32, device="meta")) for n, shape in named]


def send(adapters: Adapters, model: torch.nn.Module, group, *, model_cfg: ModelSection, zero3: bool, rank: int,
         bucket_mb: float = 256.0) -> int:
    """Send the adapters (or, over a 4-bit base, the merged weights) from learner rank 0;
    returns the bytes sent. Collective over the learners under ZeRO-3 (gathers)."""
    if adapters_only(model_cfg):
        named = [(n, p) for n, p in model.named_parameters() if is_adapter_name(n)]
        params = dict(named)
        shapes = [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in named]
        sent = 0
        for bucket in buckets(_fp32_standins(shapes), bucket_mb):
            ps = [params[n] for n, _ in bucket]
            ctx = contextlib.nullcontext()
            if zero3:
                import deepspeed

                ctx = deepspeed.zero.GatheredParameters(ps, modifier_rank=None)
            with ctx:
                if rank == 0:
                    flat = torch.cat([p.data.float().reshape(-1) for p in ps])
                    group.broadcast(flat, 0).wait()
                    sent += flat.numel() * flat.element_size()
        what = "adapters"
    else:
        sent = 0
        for bucket in adapters.merged_buckets(model, zero3=zero3, rank=rank, bucket_mb=bucket_mb):
            if bucket is not None:
                flat = torch.cat([w.reshape(-1) for _, w in bucket])
                group.broadcast(flat, 0).wait()
                sent += flat.numel() * flat.element_size()
        what = "merged weights"
    if rank == 0:
        log.info("weight sync: %.2f MiB of %s sent (%d trainable of %d parameters)", sent / 2**20, what,
                 adapters.num_trainable, adapters.num_total)
    return sent


class AdapterReceiver:
    """A rollout worker's side of :func:`send` with :func:`adapters_only`: the adapted layers
    and their weights as loaded (host memory), merged with each sync's adapters."""

    def __init__(self, model_cfg: ModelSection, model: torch.nn.Module):
        from peft import inject_adapter_in_model
        from transformers import AutoModelForCausalLM

        # The adapters' names, shapes and order, as the learners' injection makes them (no memory: meta tensors).
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model.config, trust_remote_code=model_cfg.trust_remote_code)
            inject_adapter_in_model(peft_config(model_cfg.lora), skeleton, adapter_name=ADAPTER)
        self.shapes = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters() if is_adapter_name(n)]
        marker = f".lora_A.{ADAPTER}.weight"
        self.layers = [n[: -len(marker)] for n, _ in self.shapes if n.endswith(marker)]
        self.scaling = scaling(model_cfg.lora)
        self.base = {m: model.get_submodule(m).weight.detach().to("cpu", copy=True) for m in self.layers}

    def receive(self, model: torch.nn.Module, group, *, bucket_mb: float = 256.0) -> int:
        """Receive one sync's adapters and set every adapted weight to its merge; returns bytes received."""
        device = next(model.parameters()).device
        got: dict[str, torch.Tensor] = {}
        received = 0
        for bucket in buckets(_fp32_standins(self.shapes), bucket_mb):
            flat = torch.empty(sum(t.numel() for _, t in bucket), dtype=torch.float32, device=device)
            group.broadcast(flat, 0).wait()
            received += flat.numel() * flat.element_size()
            offset = 0
            for name, t in bucket:
                got[name] = flat[offset: offset + t.numel()].view(t.shape)
                offset += t.numel()
        with torch.no_grad():
            for m in self.layers:
                w = model.get_submodule(m).weight
                w.copy_(merge_weight(self.base[m].to(w.device), got[f"{m}.lora_A.{ADAPTER}.weight"],
                                     got[f"{m}.lora_B.{ADAPTER}.weight"], self.scaling))
        return received
