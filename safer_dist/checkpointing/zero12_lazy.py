"""The fp32 weights of a ZeRO-1/2 checkpoint, one tensor at a time, for ``safer export``.

DeepSpeed's ``zero_to_fp32`` rebuilds a ZeRO-1/2 checkpoint's weights by concatenating every
rank's fp32 partition into one vector (the whole fp32 model in host memory, its lazy mode
included) after loading the model-states file whole (the whole 16-bit model). This reads the
same files memory-mapped and cuts each tensor out of the partitions it spans as it is fetched;
the pages a fetch touched are handed back to the kernel right after (``madvise``), so the
resident memory holds about one tensor, not the model. The layout is DeepSpeed's (its
``_zero2_merge_trainable_params``): per parameter group, the ranks' partitions back to back,
the group's parameters in ``param_shapes`` order, each followed by its alignment padding;
buffers, frozen parameters and shared (tied) names as DeepSpeed restores them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
from collections.abc import Callable
from pathlib import Path

import torch

from safer_dist.checkpointing.safe_load import weights_only_torch_load

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def release_pages(t: torch.Tensor) -> None:
    """Drop the pages under ``t`` (a view of a memory-mapped, never written file) from this
    process's resident set; a later read faults them in from the file again."""
    if t.numel() == 0:
        return
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = t.data_ptr() + t.numel() * t.element_size()
    _libc.madvise(start, end - start, _MADV_DONTNEED)


def _load(path: Path) -> dict:
    with weights_only_torch_load():
        return torch.load(path, map_location="cpu", mmap=True)


def zero12_stage(checkpoint: Path) -> int | None:
    """The ZeRO stage of a DeepSpeed checkpoint with optimizer files (None: no optimizer files)."""
    files = sorted(Path(checkpoint).glob("*optim_states.pt"))
    if not files:
        return None
    return int(_load(files[0])["optimizer_state_dict"]["zero_stage"])


def lazy_zero12_state_dict(checkpoint: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """``name -> fetch()`` of the fp32 weights of the ZeRO-1/2 checkpoint directory ``checkpoint``
    (fetch returns a new tensor; each call reads the files again)."""
    from deepspeed.checkpoint.constants import (
        BUFFER_NAMES,
        FROZEN_PARAM_FRAGMENTS,
        FROZEN_PARAM_SHAPES,
        OPTIMIZER_STATE_DICT,
        PARAM_ALIGNMENT_PADDINGS,
        PARAM_SHAPES,
        PARTITION_COUNT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
        ZERO_STAGE,
    )

    checkpoint = Path(checkpoint)
    states = _load(checkpoint / "mp_rank_00_model_states.pt")
    optim_files = sorted(checkpoint.glob("*_optim_states.pt"), key=_rank_of)
    optims = [_load(f)[OPTIMIZER_STATE_DICT] for f in optim_files]
    stage, world = optims[0][ZERO_STAGE], optims[0][PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else world
    if stage > 2:
        raise ValueError(f"{checkpoint}: a ZeRO-{stage} checkpoint; this reader takes ZeRO-1/2")
    if world != len(optims):
        raise ValueError(f"{checkpoint}: {len(optims)} optimizer files for {world} ranks (an incomplete checkpoint?)")
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for name in states[BUFFER_NAMES]:
        buf = states["module"][name]
        out[name] = _fetch_whole(buf, float_=buf.is_floating_point())
    frozen = states.get(FROZEN_PARAM_FRAGMENTS) or {}
    for name in states.get(FROZEN_PARAM_SHAPES) or {}:
        out[name] = _fetch_whole(frozen[name], float_=False)
    paddings = optims[0].get(PARAM_ALIGNMENT_PADDINGS)
    for g, shapes in enumerate(states[PARAM_SHAPES]):
        parts = [o[SINGLE_PARTITION_OF_FP32_GROUPS][g].detach() for o in optims]
        bounds = [0]
        for p in parts:
            bounds.append(bounds[-1] + p.numel())
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > bounds[-1]:
                raise ValueError(f"{checkpoint}: {name} reaches past the fp32 partitions of group {g}")
            out[name] = _fetch_slice(parts, bounds, offset, numel, tuple(shape))
            offset += numel + (paddings[g][i] if paddings is not None else 0)
    for alias, source in states["shared_params"].items():
        if source in out:
            out[alias] = out[source]
    return out


def _rank_of(path: Path) -> int:
    # "zero_pp_rank_3_mp_rank_00_optim_states.pt" (ZeRO-1/2: bf16_zero_pp_rank_...) -> 3
    parts = path.name.split("_")
    return int(parts[parts.index("pp") + 2])


def _fetch_whole(t: torch.Tensor, *, float_: bool) -> Callable[[], torch.Tensor]:
    def fetch() -> torch.Tensor:
        out = t.to(torch.float32 if float_ else t.dtype, copy=True)
        release_pages(t)
        return out

    return fetch


def _fetch_slice(parts: list[torch.Tensor], bounds: list[int], offset: int, numel: int,
                 shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    def fetch() -> torch.Tensor:
        out = torch.empty(numel, dtype=parts[0].dtype)
        pos = 0
        for r, part in enumerate(parts):
            lo, hi = max(offset, bounds[r]), min(offset + numel, bounds[r + 1])
            if lo >= hi:
                continue
            piece = part.narrow(0, lo - bounds[r], hi - lo)
            out[pos : pos + hi - lo].copy_(piece)
            release_pages(piece)
            pos += hi - lo
        return out.view(shape)

    return fetch
