"""Attention backend selection and a PyTorch-native varlen flash path for packed batches.

Packed (padding-free) batches are the training format everywhere: ``input_ids`` ``[B, T]``
(usually ``B == 1``) holding several sequences back to back, ``position_ids`` restarting at 0
for each sequence, ``attention_mask=None``, ``use_cache=False``. Every backend chosen by
:func:`resolve_attn_implementation` keeps those sequences from attending to each other:

- ``flash_attention_2`` (flash-attn package): transformers derives ``cu_seqlens`` from
  ``position_ids`` itself.
- ``sdpa`` / ``eager``: transformers 5 detects packing from ``position_ids`` and builds a
  block-diagonal causal 4D mask (``masking_utils.find_packed_sequence_indices``). Correct only
  without a KV cache, hence ``use_cache=False`` in training.
- ``safer_varlen`` (ours, CUDA only): derives ``cu_seqlens`` from ``position_ids`` and calls
  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's bundled flash kernel) — no ``T x T``
  mask is materialised. It is registered with transformers' ``AttentionInterface`` and, for
  mask creation, reuses transformers' ``flash_attention_mask`` (returns ``None`` when there is
  no padding, else the 2D padding mask), so the model never builds a 4D mask for it. Cases
  the kernel cannot take fall back: fp32 or CPU tensors of a packed batch to per-sequence
  SDPA (as ``safer_segments``); a padding mask or KV-cache decoding (``q_len != kv_len``) to
  SDPA with an explicit 4D mask built here, so generation with the same model object stays
  correct.
- ``safer_segments`` (ours, any device; the CPU default): runs SDPA once per packed sequence
  (``is_causal=True``, no mask) instead of once over the whole row with a dense block-diagonal
  ``T x T`` mask. On CPU, packs of 8 sequences of 150-250 tokens, forward + backward on 1
  thread run 1.7x faster for the tiny model and 1.5x for the 20M one
  (``bench/packed_attention.py``, docs/BENCHMARKS.md). Same mask function and same fallback as
  ``safer_varlen`` for padding and KV-cache decoding.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

VARLEN_NAME = "safer_varlen"
SEGMENTS_NAME = "safer_segments"
EXPLICIT_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", VARLEN_NAME, SEGMENTS_NAME)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_INSTALL_HINT = "pip install 'safer[gpu]'"


@functools.cache
def flash_attn_available() -> bool:
    """Whether the flash-attn package imports (a broken CUDA build raises more than ImportError)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


@functools.cache
def torch_varlen_available() -> bool:
    """Whether this torch ships ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
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
    this torch has the varlen kernel and the GPU supports it, else ``sdpa`` on CUDA and
    ``safer_segments`` elsewhere. ``auto`` never picks ``eager``. Raises ``ValueError`` for
    unknown names and for backends the device cannot run.
    """
    device = torch.device(device_type).type
    if requested == "auto":
        if device != "cuda":
            return SEGMENTS_NAME
        if flash_attn_available():
            return "flash_attention_2"
        if torch_varlen_available() and _cuda_supports_flash():
            return VARLEN_NAME
        return "sdpa"
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
        if not torch_varlen_available():
            raise ValueError(
                f"attn_implementation {VARLEN_NAME!r} needs torch.nn.attention.varlen "
                f"(torch >= 2.10); this is torch {torch.__version__}"
            )
    return requested


def register_varlen_attention() -> None:
    """Register ``safer_varlen`` and ``safer_segments`` with transformers' attention and mask
    interfaces. Idempotent.

    Must run in every process before a model is loaded or switched to one of them;
    :func:`safer_dist.train.models.load_model` does it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN_NAME, varlen_attention_forward)
    AttentionInterface.register(SEGMENTS_NAME, segments_attention_forward)
    # Without a registered mask function transformers drops even a 2D padding mask for a custom
    # backend; flash_attention_mask keeps it (and returns None when nothing is padded).
    AttentionMaskInterface.register(VARLEN_NAME, flash_attention_mask)
    AttentionMaskInterface.register(SEGMENTS_NAME, flash_attention_mask)


def packed_cu_seqlens(position_ids: torch.Tensor | None, batch_size: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts of a (possibly packed) batch.

    A new sequence starts at the start of every row and wherever ``position_ids`` does not
    continue by +1 (normally where it restarts at 0). Returns ``(cu_seqlens, max_seqlen)`` with
    ``cu_seqlens`` int32 of shape ``[num_sequences + 1]`` over the flattened ``B * T`` tokens.
    ``position_ids``: ``[B, T]`` or ``[1, T]`` (broadcast); ``None`` means one sequence per row.
    """
    if position_ids is None:
        device = None
        starts = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    else:
        device = position_ids.device
        position_ids = position_ids.expand(batch_size, seq_len)
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts[:, 0] = True
    total = batch_size * seq_len
    start_idx = starts.reshape(-1).nonzero().squeeze(-1)
    cu_seqlens = torch.cat([start_idx, start_idx.new_tensor([total])]).to(device=device, dtype=torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen


def _varlen_kernel(*args, **kwargs) -> torch.Tensor:
    # Indirection so CPU tests can substitute a reference implementation.
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(*args, **kwargs)


def _use_varlen_kernel(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in _HALF_DTYPES


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``safer_varlen``.

    ``query``: ``[B, Hq, Tq, D]``; ``key``/``value``: ``[B, Hkv, Tk, D]``; ``attention_mask``:
    ``None`` or a 2D ``[B, >=Tk]`` bool padding mask (from ``flash_attention_mask``);
    ``kwargs`` may carry ``position_ids`` ``[B or 1, Tq]`` and precomputed ``cu_seq_lens_q`` /
    ``max_length_q`` (transformers' FlashAttentionKwargs). Returns ``([B, Tq, Hq, D], None)``.
    """
    if dropout:
        raise ValueError(f"{VARLEN_NAME} does not support attention dropout (got {dropout}); set attention_dropout=0")
    if _fallback_needed(module, query, key, attention_mask, is_causal) or not _use_varlen_kernel(query):
        # padding, KV-cache decoding, non-causal, fp32 or CPU: exactly what safer_segments does
        return segments_attention_forward(module, query, key, value, attention_mask, 0.0, scaling, is_causal, **kwargs)
    batch_size, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None:
        cu_seqlens, max_seqlen = kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"])
    else:
        cu_seqlens, max_seqlen = packed_cu_seqlens(kwargs.get("position_ids"), batch_size, q_len)
        cu_seqlens = cu_seqlens.to(query.device)
    # [B, H, T, D] -> [B*T, H, D], the kernel's packed layout
    q = query.transpose(1, 2).reshape(batch_size * q_len, num_q_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch_size * kv_len, num_kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(batch_size * kv_len, num_kv_heads, head_dim)
    out = _varlen_kernel(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        scale=scaling,
        window_size=(-1, 0),  # causal; must be a tuple, varlen_attn compares with == (-1, 0)
        enable_gqa=num_q_heads != num_kv_heads,
    )
    return out.view(batch_size, q_len, num_q_heads, head_dim), None


def segments_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``safer_segments``: causal SDPA per packed sequence.

    Same contract as :func:`varlen_attention_forward` (``query`` ``[B, Hq, Tq, D]``, returns
    ``([B, Tq, Hq, D], None)``). Padding masks, KV-cache decoding and non-causal calls take the
    explicit-mask SDPA fallback.
    """
    if dropout:
        raise ValueError(f"{SEGMENTS_NAME} does not support attention dropout (got {dropout}); set attention_dropout=0")
    if _fallback_needed(module, query, key, attention_mask, is_causal):
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling, kwargs.get("position_ids"), causal)
    return _sdpa_segments(query, key, value, scaling, kwargs)


def _fallback_needed(module, query, key, attention_mask, is_causal) -> bool:
    """Whether a call is one the packed paths do not take: a padding mask, KV-cache decoding
    (``q_len != kv_len``) or non-causal attention."""
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    return attention_mask is not None or query.shape[2] != key.shape[2] or not causal


def _sdpa_segments(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, kwargs: dict
) -> tuple[torch.Tensor, None]:
    """Causal SDPA over each sequence of a packed batch; ``[B, H, T, D]`` in, ``[B, T, H, D]`` out."""
    batch_size, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    cu_seqlens, _ = packed_cu_seqlens(kwargs.get("position_ids"), batch_size, q_len)
    bounds = cu_seqlens.tolist()
    if len(bounds) == 2:  # one sequence: no slicing, no copy
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=num_q_heads != num_kv_heads
        )
        return out.transpose(1, 2), None
    # [B, H, T, D] -> [H, B*T, D]: sequences are contiguous slices along dim 1
    q = query.transpose(0, 1).reshape(num_q_heads, batch_size * q_len, head_dim)
    k = key.transpose(0, 1).reshape(num_kv_heads, batch_size * q_len, head_dim)
    v = value.transpose(0, 1).reshape(num_kv_heads, batch_size * q_len, head_dim)
    outs = [
        F.scaled_dot_product_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True, scale=scaling, enable_gqa=num_q_heads != num_kv_heads
        )
        for a, b in zip(bounds, bounds[1:])
    ]
    out = torch.cat(outs, dim=1)  # [H, B*T, D]
    return out.view(num_q_heads, batch_size, q_len, head_dim).permute(1, 2, 0, 3), None


def _sdpa_fallback(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    position_ids: torch.Tensor | None,
    is_causal: bool,
) -> tuple[torch.Tensor, None]:
    """SDPA with an explicit ``[B, 1, Tq, Tk]`` bool mask: causal (queries are the last Tq
    keys, as in KV-cache decoding), block-diagonal for packed rows, and padding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch_size, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    device = query.device
    allowed = torch.ones(batch_size, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if is_causal:
        q_abs = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        allowed &= torch.arange(kv_len, device=device)[None, :] <= q_abs
    if q_len == kv_len and position_ids is not None:
        cu_seqlens, _ = packed_cu_seqlens(position_ids, batch_size, q_len)
        seq_id = torch.zeros(batch_size * q_len, dtype=torch.long, device=device)
        seq_id[cu_seqlens[1:-1].long().to(device)] = 1
        seq_id = seq_id.cumsum(0).view(batch_size, q_len)
        allowed &= (seq_id[:, None, :, None] == seq_id[:, None, None, :])
    if attention_mask is not None:
        allowed &= attention_mask[:, -kv_len:].to(device=device, dtype=torch.bool)[:, None, None, :]
    # A fully masked row (a left-pad query) would give NaN; let it attend anywhere, its output
    # is ignored.
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return sdpa_attention_forward(module, query, key, value, allowed, dropout=0.0, scaling=scaling, is_causal=False)

