"""Training throughput: tokens/s and model FLOP utilisation (MFU) per step.

    MFU = 6 * N * tokens_per_s / (peak FLOP/s summed over all learners)

N is :func:`non_embedding_params` (each learner reports it at setup). 6N counts the forward
(2N) and backward (4N) FLOPs per token of the matmuls with the weights; with LoRA adapters
(``model.lora``) the frozen weights need no weight gradient, so the backward is 2N + 2T for
the T trained parameters and 6N becomes 4N + 2T (both count the adapters in N); attention's own FLOPs,
which grow with the sequence length, are left out (the usual estimate), so MFU reads slightly
low for long sequences. The peak is the device's dense bf16 tensor-core rate: from
``learner.peak_tflops`` when set, else looked up by the GPU's name (:data:`PEAK_BF16_TFLOPS`).
On CPU without ``learner.peak_tflops``, or on a GPU not in the table, no MFU is reported.
"""

from __future__ import annotations

import re

from safer_dist.runtime.log import get_logger

log = get_logger("throughput")

# Dense (no sparsity) bf16 TFLOP/s per device from NVIDIA's data sheets, by a pattern of
# torch.cuda.get_device_name(); the first match wins, so specific variants come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM
    (r"\bH800\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_tflops_of(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of the GPU named ``device_name`` (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def device_peak_flops(device: str, peak_tflops: float | None) -> float | None:
    """Peak FLOP/s of this process's learner device (``device``: "cpu" | "cuda"):
    ``peak_tflops`` (learner.peak_tflops) when set, else by the GPU's name; None when unknown."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    tflops = peak_tflops_of(name)
    if tflops is None:
        log.warning("no peak FLOP/s known for GPU %r: set learner.peak_tflops to report MFU", name)
        return None
    return tflops * 1e12


def non_embedding_params(model) -> int:
    """Parameters that take part in a matmul for every token: all of them (tied weights once,
    full size under ZeRO-3 partitioning) less the input embedding, which is a lookup. An output
    projection tied to the input embedding still does its matmul, so it counts."""
    def numel(p) -> int:
        return getattr(p, "ds_numel", p.numel())

    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    n = sum(numel(p) for p in model.parameters()) - numel(embedding)
    if output is not None and output.weight is embedding:
        n += numel(embedding)
    return n


def mfu(num_params: int, tokens_per_s: float, peak_flops: float, num_trained: int | None = None) -> float:
    """Model FLOP utilisation: (4 * num_params + 2 * num_trained) * tokens_per_s / peak_flops (all
    learners' peak); ``num_trained``, the parameters with a weight gradient, defaults to all
    (6 * num_params)."""
    trained = num_params if num_trained is None else num_trained
    return (4.0 * num_params + 2.0 * trained) * tokens_per_s / peak_flops


class Throughput:
    """Per-step throughput of a learner group, from the dicts its ranks returned at setup
    (``num_params_non_embedding``, ``peak_flops``, and ``num_params_trained`` with adapters)."""

    def __init__(self, infos: list[dict]):
        self.num_params = int(infos[0]["num_params_non_embedding"])
        self.num_trained = infos[0].get("num_params_trained")
        peaks = [info["peak_flops"] for info in infos]
        self.peak_flops = float(sum(peaks)) if all(peaks) else None

    def __call__(self, num_tokens: int, seconds: float) -> dict:
        """{"tokens_per_s": ..., "mfu": ...} for a step of ``num_tokens`` in ``seconds``; no
        "mfu" when the peak is unknown."""
        out = {"tokens_per_s": num_tokens / seconds}
        if self.peak_flops:
            out["mfu"] = mfu(self.num_params, out["tokens_per_s"], self.peak_flops, self.num_trained)
        return out


def progress_fields(speed: dict) -> dict:
    """The progress line's fields for a :class:`Throughput` result: tok_s, and mfu when known."""
    return {"tok_s": speed["tokens_per_s"], **({"mfu": speed["mfu"]} if "mfu" in speed else {})}
