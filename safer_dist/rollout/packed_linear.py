"""fp32 linear layers on CPU through oneDNN, each weight reordered once per sampling call.

``nn.Linear`` on CPU calls MKL's sgemm on the weight as it is stored. :func:`packed_linears`
reorders the weight of every fp32 ``nn.Linear`` of a CPU model once into oneDNN's blocked
layout (``torch.ops.mkldnn._reorder_linear_weight``, the op ``torch.compile``'s CPU weight
prepacking uses) and, until it exits, runs those layers through
``torch.ops.mkldnn._linear_pointwise`` on the reordered copy. On the 2-core AMD EPYC VM of
docs/BENCHMARKS.md this made a decode step of 64 rows of the bench model 10–17% shorter and a
packed prefill 7–12% shorter (``bench/rollout.py``, whose ``nn.Linear`` contestant is the same
sampler without it).

The sums are accumulated in another order than MKL's: outputs agree with ``nn.Linear`` to
float32 rounding (about 1e-6 relative), not bit for bit.

Only for inference (the packed forward has no backward); the weights must not change inside
the context (each call reorders them afresh, so a weight sync between calls is seen). Exact
``nn.Linear`` modules only: subclasses (quantized or sharded layers) keep their own forward, and so
do the layers of a tensor-parallel model (:func:`_sharded`).
Where the ops are missing or a weight cannot be reordered, the layers keep ``nn.Linear``'s
forward and a warning says so once.

The reordered copies are held while the context is open: the memory of the model's linear
weights once more.
"""

from __future__ import annotations

import contextlib

import torch

from safer_dist.runtime.log import get_logger

log = get_logger("packed_linear")
_WARNED: set[str] = set()


def _packable(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and w is not None and w.dtype == torch.float32 and w.device.type == "cpu"
            and not _sharded(module, w))


def _sharded(module: torch.nn.Module, weight: torch.Tensor) -> bool:
    """A layer of a tensor-parallel model, which keeps ``nn.Linear``'s forward: transformers'
    TP plan installs its own forward on the instance (the input/output collectives around the
    local matmul) and holds the weight as a DTensor. A packed forward would skip those
    collectives, and restoring it would delete the TP forward for good."""
    if "forward" in module.__dict__:
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)


def _reorder(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("this torch was built without oneDNN")
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    return forward


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, rows_hint: int = 64):
    """Inside the context, every fp32 CPU ``nn.Linear`` of ``model`` runs oneDNN's matmul over a
    copy of its weight reordered once (``rows_hint``: the rows per call it is laid out for; any
    row count runs). The modules' own forward comes back on exit, also after an error. Nothing
    changes for a model with no such layer (a CUDA or bf16 model)."""
    modules = [m for m in model.modules() if _packable(m)]
    try:
        for m in modules:
            packed = _reorder(m.weight.detach(), rows_hint)
            m.forward = _packed_forward(packed, None if m.bias is None else m.bias.detach())
    except (RuntimeError, AttributeError) as err:  # a build without the ops, or a layout it refuses
        _restore(modules)
        if "reorder" not in _WARNED:
            _WARNED.add("reorder")
            log.warning(f"oneDNN linear unavailable ({type(err).__name__}: {err}); sampling runs nn.Linear")
    try:
        yield
    finally:
        _restore(modules)


def _restore(modules: list[torch.nn.Module]) -> None:
    for m in modules:
        m.__dict__.pop("forward", None)
