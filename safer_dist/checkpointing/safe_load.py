"""Loading checkpoint files without running pickled code.

DeepSpeed reads its own checkpoint files with ``torch.load(..., weights_only=False)`` (engine
load, universal conversion, ``zero_to_fp32``), which lets a crafted ``*.pt`` file run arbitrary
code. Every DeepSpeed load that safer triggers runs inside :func:`weights_only_torch_load`:
for its duration ``torch.load`` is replaced by a wrapper that forces ``weights_only=True``
(PyTorch's restricted unpickler: tensors, containers, numbers, strings) and allows, beyond
PyTorch's defaults, only the few plain DeepSpeed data classes its checkpoint files contain
(:data:`ALLOWED_GLOBALS`). A file that needs anything else fails to load with PyTorch's
"Weights only load failed ... Unsupported global" error instead of executing it.

The patch is process-wide while active (``torch.load`` is looked up on the module at call
time); callers use it around single-threaded checkpoint I/O only.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

# "module.attr" names of the non-tensor globals DeepSpeed 0.19 writes into ZeRO-1/2/3 and
# universal checkpoints: an enum, a namedtuple and the (fp32) loss-scaler's state holder.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)

_lock = threading.RLock()


def allowed_globals() -> list:
    out = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # an older/newer DeepSpeed without that class
            continue
    return out


@contextlib.contextmanager
def weights_only_torch_load():
    """Within the block, every ``torch.load`` in this process is ``weights_only=True``."""
    import torch

    with _lock:
        real = torch.load
        allowed = allowed_globals()

        def safe_load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
            del pickle_module, weights_only  # never a custom unpickler, never full pickle
            with torch.serialization.safe_globals(allowed):
                return real(f, map_location=map_location, weights_only=True, **kwargs)

        torch.load = safe_load
        try:
            yield
        finally:
            torch.load = real
