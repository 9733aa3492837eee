"""Attention backend selection and a PyTorch-native varlen flash path for packed batches.

This module picks the backend; the ``safer_*`` attention functions and the varlen kernel's discovery are in
safer_dist/train/attention_kernels.py.

Packed (padding-free) batches are the training format everywhere: ``input_ids`` ``[B, T]``
(usually ``B == 1``) holding several sequences back to back, ``position_ids`` restarting at 0
for each sequence, ``attention_mask=None``, ``use_cache=False``. Every backend chosen by
:func:`resolve_attn_implementation` keeps those sequences from attending to each other:

- ``flash_attention_2`` (flash-attn package): transformers derives ``cu_seqlens`` from
  ``position_ids`` itself.
- ``sdpa`` / ``eager``: transformers 5 detects packing from ``position_ids`` and builds a
  block-diagonal causal 4D mask (``masking_utils.find_packed_sequence_indices``). Correct only
  without a KV cache, hence ``use_cache=False`` in training.
- ``safer_varlen`` (ours, CUDA only): takes ``cu_seqlens`` from the batch's
  :class:`~safer_dist.train.tree_attention.PackedLayout` (computed once per packed batch on the
  host and passed to the model forward as ``**layout.model_kwargs()``, as the learner does; else
  derived from ``position_ids`` in every layer, a host synchronisation each) and calls
  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's bundled flash kernel) — no ``T x T``
  mask is materialised. Its arguments changed across torch releases: the first take
  ``is_causal`` and no ``scale``; 2.11 takes ``scale`` and ``window_size`` but no
  ``enable_gqa``; later ones also ``enable_gqa``. What the installed function accepts is read
  once from its signature (:func:`varlen_api`); without ``enable_gqa`` the KV heads are
  repeated to the query head count before the call, without ``scale`` the query is
  pre-scaled. It is registered with transformers' ``AttentionInterface`` and, for
  mask creation, reuses transformers' ``flash_attention_mask`` (returns ``None`` when there is
  no padding, else the 2D padding mask), so the model never builds a 4D mask for it. Cases
  the kernel cannot take fall back: fp32 or CPU tensors of a packed batch to per-sequence
  SDPA (as ``safer_segments``); a padding mask or KV-cache decoding (``q_len != kv_len``) to
  SDPA with an explicit 4D mask built here, so generation with the same model object stays
  correct.
- ``safer_segments`` (ours, any device; the CPU default): runs SDPA once per packed sequence
  (``is_causal=True``, no mask; the sequences read from the ``PackedLayout`` when one is passed)
  instead of once over the whole row with a dense block-diagonal ``T x T`` mask. On CPU, packs
  of 8 sequences of 150-250 tokens, forward + backward on 1 thread run 1.7x faster for the tiny
  model and 1.5x for the 20M one (``bench/packed_attention.py``, docs/BENCHMARKS.md). Same mask
  function and same fallback as ``safer_varlen`` for padding and KV-cache decoding.

Both ``safer_*`` backends also take prefix-shared (tree) rows, where a position that drops to
``p > 0`` starts a branch sharing the first ``p`` tokens of the sequence before it
(:mod:`safer_dist.train.tree_attention`): ``safer_segments`` runs SDPA once per segment,
``safer_varlen`` sends a tree row on CUDA through ``flex_attention`` with the tree as block mask
(the varlen kernel takes only block-diagonal packing); the explicit-mask fallback builds the
tree mask. :func:`tree_packing_unsupported` says whether a backend takes trees.

On CUDA a packed row is never run silently through SDPA with a dense block-diagonal mask (it
ran 4.6x slower than varlen on an H200): ``auto`` without a usable varlen kernel picks
``safer_segments`` and warns once with the reason; an explicit ``sdpa``/``eager`` on CUDA, and
the explicit-mask fallback meeting a packed CUDA row, warn once too.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from safer_dist.train.attention_kernels import SEGMENTS_NAME, VARLEN_NAME, _warn_once, varlen_unavailable_reason

EXPLICIT_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", VARLEN_NAME, SEGMENTS_NAME)
_INSTALL_HINT = "pip install flash-attn --no-build-isolation (README: On GPUs)"


@functools.cache
def flash_attn_available() -> bool:
    """Whether the flash-attn package imports (a broken CUDA build raises more than ImportError)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def _cuda_supports_flash() -> bool:
    # PyTorch's flash kernels need Ampere (sm80) or newer.
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def resolve_attn_implementation(requested: str, device_type: str) -> str:
    """Map a requested attention backend to a transformers ``attn_implementation`` name.

    ``requested`` is ``"auto"`` or one of :data:`EXPLICIT_IMPLEMENTATIONS`; ``device_type`` is
    ``"cpu"``, ``"cuda"`` (a ``torch.device`` or ``"cuda:1"`` also works). ``"auto"`` picks
    ``flash_attention_2`` on CUDA with flash-attn installed, else ``safer_varlen`` on CUDA when
    this torch has a usable varlen kernel and the GPU supports it, else ``safer_segments`` (on
    CUDA with a one-time warning naming the reason). ``auto`` never picks ``sdpa`` or ``eager``,
    which run a packed row with a dense mask; asking for them on CUDA warns once. Raises
    ``ValueError`` for unknown names and for backends the device cannot run.
    """
    device = torch.device(device_type).type
    if requested == "auto":
        if device != "cuda":
            return SEGMENTS_NAME
        if flash_attn_available():
            return "flash_attention_2"
        reason = varlen_unavailable_reason()
        if reason is None and not _cuda_supports_flash():
            reason = "this GPU is older than sm80 (Ampere), which PyTorch's flash kernels need"
        if reason is None:
            return VARLEN_NAME
        _warn_once(
            "auto-segments",
            f"attention 'auto' on CUDA: no varlen flash kernel ({reason}); using {SEGMENTS_NAME} (SDPA once "
            f"per packed sequence) rather than SDPA with a dense T x T mask over the packed row, which ran "
            f"4.6x slower than varlen on an H200. For a varlen kernel: {_INSTALL_HINT}, or a "
            "torch with torch.nn.attention.varlen on an sm80+ GPU",
        )
        return SEGMENTS_NAME
    if requested not in EXPLICIT_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {requested!r}; choose one of "
            f"{('auto', *EXPLICIT_IMPLEMENTATIONS)}"
        )
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ValueError(
                "attn_implementation 'flash_attention_2' needs the flash-attn package, which is not "
                f"installed (or does not import); install it with: {_INSTALL_HINT} — or use 'auto'"
            )
        if device != "cuda":
            raise ValueError(f"attn_implementation 'flash_attention_2' needs a CUDA device, got {device!r}")
    if requested == VARLEN_NAME:
        if device != "cuda":
            raise ValueError(
                f"attn_implementation {VARLEN_NAME!r} runs only on CUDA (got {device!r}); use 'sdpa' or 'auto'"
            )
        reason = varlen_unavailable_reason()
        if reason is not None:
            raise ValueError(
                f"attn_implementation {VARLEN_NAME!r} needs a usable torch.nn.attention.varlen.varlen_attn: "
                f"{reason}; use 'auto' or {SEGMENTS_NAME!r}"
            )
    if requested in ("sdpa", "eager") and device == "cuda":
        _warn_once(
            f"dense-{requested}",
            f"attn_implementation {requested!r} on CUDA runs each packed row with a dense T x T "
            f"block-diagonal mask (SDPA so ran 4.6x slower than varlen on an H200); 'auto' avoids it",
        )
    return requested


def tree_packing_unsupported(attn_implementation: str, device_type: str) -> str | None:
    """Why a model running ``attn_implementation`` on ``device_type`` cannot take prefix-shared
    (tree) packed rows (:mod:`safer_dist.train.tree_attention`); ``None`` when it can.

    ``safer_segments`` takes them on any device, ``safer_varlen`` too (on CUDA its 16-bit rows go
    through ``flex_attention``). transformers' own backends derive sequence boundaries from
    ``position_ids`` themselves and would let a branch see its sibling, so packers must not
    share a prefix for them.
    """
    if attn_implementation == SEGMENTS_NAME:
        return None
    if attn_implementation == VARLEN_NAME:
        if torch.device(device_type).type == "cuda" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention, which {VARLEN_NAME} needs for them"
        return None
    return (
        f"attention {attn_implementation!r} finds packed sequences itself and cannot take a shared prefix; "
        f"{SEGMENTS_NAME!r} (any device) and {VARLEN_NAME!r} (CUDA) can"
    )
