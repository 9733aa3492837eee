"""Weight sync of LoRA learners to rollout workers, over the channel of
:mod:`safer_dist.weights.channel` (broadcast, or the CUDA-IPC hand-over to a colocated worker).

Rollout workers hold a plain model loaded from the same directory the learners' frozen base
came from (ERPO: the SFT export), so after each iteration only the adapters travel:

    learner rank 0 ──(lora_A, lora_B of every adapted layer, fp32, learner order)──▶ workers
    worker: W = merge_weight(W_base, A, B, alpha / r)   (W_base: its copy of the weights as loaded)

The adapters are sent by :func:`~safer_dist.weights.channel.send_weights` itself, as the
parameters of a holder module of fp32 copies (version, dtype and count checked like any sync).
:func:`~safer_dist.train.lora.merge_weight` is the merge the exports use, on the same inputs
(fp32 holds bf16 and fp32 adapter values exactly), so a worker holds the merged export's weights
bit for bit where both merge on the same kind of device. Each worker keeps the adapted layers'
loaded weights in host memory (about the model's size) to merge onto. Bytes per sync: the
adapters in fp32, 4.1% of the demo model's fp32 weights at rank 8.

With a 4-bit base (QLoRA) the workers merge onto the full-precision weights they loaded, while
the learners train against the NF4-quantized ones: rollout and reference log-probs then differ
from the learners' by the quantization error (the merged export, written by the learners, is
over the dequantized base).
"""

from __future__ import annotations

import contextlib

import torch

from safer_dist.config import ModelSection
from safer_dist.weights.channel import receive_weights, send_weights
from safer_dist.runtime.log import get_logger
from safer_dist.train.lora import ADAPTER, Adapters, is_adapter_name, merge_weight, peft_config, scaling

log = get_logger("lora")


def _holder(tensors: list[torch.Tensor]) -> torch.nn.Module:
    """A module whose parameters, in order, are ``tensors`` (what the weight sync sends and fills)."""
    return torch.nn.ParameterList([torch.nn.Parameter(t, requires_grad=False) for t in tensors])


def send(adapters: Adapters, model: torch.nn.Module, channel, *, rank: int, zero3: bool, version: int,
         device: str) -> int:
    """Send the adapters of ``model`` from learner rank 0 as ``version``; returns the bytes sent.
    Collective over the learners under ZeRO-3 (the adapters are gathered)."""
    params = [p for n, p in model.named_parameters() if is_adapter_name(n)]
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with ctx:
        copies = [p.data.to(device=device, dtype=torch.float32, copy=True) for p in params] if rank == 0 else None
    if rank != 0:
        return 0
    sent = send_weights(_holder(copies), channel, rank=0, zero3=False, version=version)
    log.info("weight sync: %.2f MiB of adapters sent (%d trainable of %d parameters)", sent / 2**20,
             adapters.num_trainable, adapters.num_total)
    return sent


class AdapterReceiver:
    """A rollout worker's side of :func:`send`: the adapted layers and their weights as loaded
    (host memory), merged with each sync's adapters."""

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

    def receive(self, model: torch.nn.Module, channel, *, version: int) -> None:
        """Receive ``version``'s adapters and set every adapted weight to its merge."""
        device = next(model.parameters()).device
        holder = _holder([torch.empty(shape, dtype=torch.float32, device=device) for _, shape in self.shapes])
        receive_weights(holder, channel, version=version)
        got = {name: t for (name, _), t in zip(self.shapes, holder)}
        with torch.no_grad():
            for m in self.layers:
                w = model.get_submodule(m).weight
                w.copy_(merge_weight(self.base[m].to(w.device), got[f"{m}.lora_A.{ADAPTER}.weight"],
                                     got[f"{m}.lora_B.{ADAPTER}.weight"], self.scaling))
