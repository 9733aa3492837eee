"""The ``safer_varlen`` and ``safer_segments`` attention functions for packed batches and the
discovery of PyTorch's varlen kernel; safer_dist/train/attention.py describes the backends and picks one."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from safer_dist.runtime.log import get_logger
from safer_dist.train.tree_attention import (
    LAYOUT_KWARG, PackedLayout, flex_tree, sdpa_tree, tree_mask, tree_segments,
)

log = get_logger("attention")

VARLEN_NAME = "safer_varlen"
SEGMENTS_NAME = "safer_segments"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class VarlenApi:
    """What an installed ``varlen_attn`` accepts, read from its signature.

    ``causal_arg``: ``"window_size"`` (takes ``window_size=(-1, 0)`` for causal) or
    ``"is_causal"``; ``takes_scale``: has a ``scale`` argument (else the kernel uses
    ``head_dim ** -0.5``); ``takes_gqa``: has ``enable_gqa`` (else key/value need as many heads
    as the query).
    """

    causal_arg: str
    takes_scale: bool
    takes_gqa: bool


@functools.cache
def _torch_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_kernel() -> Callable | None:
    """The varlen kernel to call, ``None`` when this torch has none. An indirection so CPU tests
    can substitute kernels with each released signature, implemented in plain PyTorch."""
    return _torch_varlen_attn()


@functools.cache
def _read_varlen_api(kernel: Callable) -> VarlenApi | str:
    """The kernel's :class:`VarlenApi`, or why it cannot run causal packed attention. Cached per
    kernel object, so the signature is read once per process, never per call."""
    try:
        params = inspect.signature(kernel).parameters
    except (TypeError, ValueError) as exc:
        return f"the signature of {getattr(kernel, '__qualname__', kernel)!r} cannot be read ({exc})"
    if "window_size" in params:
        causal_arg = "window_size"
    elif "is_causal" in params:
        causal_arg = "is_causal"
    else:
        return (
            f"torch {torch.__version__}'s varlen_attn{inspect.signature(kernel)} takes neither window_size nor "
            "is_causal, so it cannot run causal attention"
        )
    return VarlenApi(causal_arg=causal_arg, takes_scale="scale" in params, takes_gqa="enable_gqa" in params)


def varlen_unavailable_reason() -> str | None:
    """Why ``safer_varlen`` cannot use a varlen kernel on this torch (``None`` when it can)."""
    kernel = _varlen_kernel()
    if kernel is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    api = _read_varlen_api(kernel)
    return api if isinstance(api, str) else None


def varlen_api() -> VarlenApi | None:
    """The installed kernel's :class:`VarlenApi`; ``None`` when there is no usable kernel."""
    kernel = _varlen_kernel()
    api = None if kernel is None else _read_varlen_api(kernel)
    return api if isinstance(api, VarlenApi) else None


def torch_varlen_available() -> bool:
    """Whether this torch ships a ``torch.nn.attention.varlen.varlen_attn`` we can call."""
    return varlen_unavailable_reason() is None


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)



def _is_cuda(tensor: torch.Tensor) -> bool:
    # Indirection so CPU tests can exercise the CUDA-only decisions.
    return tensor.is_cuda


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


def _use_varlen_kernel(query: torch.Tensor) -> bool:
    return _is_cuda(query) and query.dtype in _HALF_DTYPES


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
    ``kwargs`` may carry ``position_ids`` ``[B or 1, Tq]``, the batch's
    :class:`~safer_dist.train.tree_attention.PackedLayout` (``safer_packed_layout``, from
    ``layout.model_kwargs()``: then nothing is derived from ``position_ids``, no host
    synchronisation per layer) or precomputed ``cu_seq_lens_q`` / ``max_length_q``
    (transformers' FlashAttentionKwargs). Returns ``([B, Tq, Hq, D], None)``.
    """
    if dropout:
        raise ValueError(f"{VARLEN_NAME} does not support attention dropout (got {dropout}); set attention_dropout=0")
    api = None
    if not _fallback_needed(module, query, key, attention_mask, is_causal) and _use_varlen_kernel(query):
        api = varlen_api()
        if api is None:  # only reachable by switching a loaded model to safer_varlen by hand
            _warn_once("varlen-missing", f"{VARLEN_NAME}: {varlen_unavailable_reason()}; running {SEGMENTS_NAME}")
    if api is None:
        # padding, KV-cache decoding, non-causal, fp32, CPU or no kernel: exactly what safer_segments does
        return segments_attention_forward(module, query, key, value, attention_mask, 0.0, scaling, is_causal, **kwargs)
    layout = _layout(kwargs, query)
    position_ids = kwargs.get("position_ids")
    if layout is not None:
        trees = layout.has_branches
    else:
        trees = position_ids is not None and _may_hold_trees(position_ids)
    if trees:
        # the varlen kernel takes only block-diagonal packing; a tree row goes through flex_attention
        pos = None if position_ids is None else position_ids.expand(query.shape[0], -1)
        return flex_tree(query, key, value, scaling, pos, layout=layout), None
    return _varlen_packed(api, query, key, value, scaling, kwargs, layout), None


def _layout(kwargs: dict, query: torch.Tensor) -> PackedLayout | None:
    """The batch's precomputed :class:`PackedLayout` when the call carries one for these query
    rows; ``None`` when the boundaries must be read off ``position_ids``."""
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        return None
    if not layout.matches(query.shape[0], query.shape[2]):
        raise ValueError(
            f"{LAYOUT_KWARG} describes a [{layout.batch_size}, {layout.seq_len}] batch, the attention got "
            f"[{query.shape[0]}, {query.shape[2]}]: build it from this batch's position_ids"
        )
    return layout


def _rows_with_drops(position_ids: torch.Tensor) -> list[int]:
    """Rows of ``position_ids`` ``[B, T]`` where some position drops to a value > 0: rows that may
    hold a tree branch (or an odd independent sequence, which the tree kernels also run right)."""
    drops = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return (drops & (position_ids[:, 1:] > 0)).any(dim=1).nonzero().flatten().tolist()


def _may_hold_trees(position_ids: torch.Tensor) -> bool:
    return bool(_rows_with_drops(position_ids))


def _varlen_packed(
    api: VarlenApi, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, kwargs: dict,
    layout: PackedLayout | None = None,
) -> torch.Tensor:
    """Causal attention of a packed batch through the varlen kernel, called as ``api`` says.
    ``[B, H, T, D]`` in, ``[B, T, Hq, D]`` out."""
    batch_size, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    if layout is not None:
        cu_seqlens, max_seqlen = layout.cu_seqlens.to(query.device), layout.max_seqlen  # a no-op once moved
    elif kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None:
        cu_seqlens, max_seqlen = kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"])
    else:
        cu_seqlens, max_seqlen = packed_cu_seqlens(kwargs.get("position_ids"), batch_size, q_len)
        cu_seqlens = cu_seqlens.to(query.device)
    # [B, H, T, D] -> [B*T, H, D], the kernel's packed layout
    q = query.transpose(1, 2).reshape(batch_size * q_len, num_q_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch_size * kv_len, num_kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(batch_size * kv_len, num_kv_heads, head_dim)
    call_kwargs: dict = {}
    if api.causal_arg == "window_size":
        call_kwargs["window_size"] = (-1, 0)  # causal; must be a tuple, varlen_attn compares with == (-1, 0)
    else:
        call_kwargs["is_causal"] = True
    if num_q_heads != num_kv_heads:
        assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)
        if api.takes_gqa:
            call_kwargs["enable_gqa"] = True
        else:
            # Query head h reads kv head h // group (SDPA's enable_gqa order); autograd sums the
            # copies' gradients back into each kv head.
            group = num_q_heads // num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if scaling is not None:
        if api.takes_scale:
            call_kwargs["scale"] = scaling
        elif scaling != head_dim**-0.5:
            # the kernel scales by head_dim ** -0.5; scaling q instead gives the same logits
            q = q * (scaling * head_dim**0.5)
    out = _varlen_kernel()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **call_kwargs)
    return out.view(batch_size, q_len, num_q_heads, head_dim)


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
    """Causal SDPA over each sequence (or tree segment, :mod:`safer_dist.train.tree_attention`) of a
    packed batch; ``[B, H, T, D]`` in, ``[B, T, H, D]`` out."""
    batch_size, _, q_len, _ = query.shape
    layout = _layout(kwargs, query)
    segments = list(layout.segments) if layout is not None else tree_segments(kwargs.get("position_ids"), batch_size, q_len)
    return sdpa_tree(query, key, value, scaling, segments), None


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
    if q_len == kv_len and position_ids is not None and _is_cuda(query):
        num_sequences = packed_cu_seqlens(position_ids, batch_size, q_len)[0].numel() - 1
        if num_sequences > batch_size:
            why = "a padding mask" if attention_mask is not None else "non-causal attention"
            _warn_once(
                f"dense-fallback-{why}",
                f"a packed CUDA batch with {why} runs SDPA with a dense block-diagonal T x T mask "
                "(4.6x slower than varlen on an H200); pack without padding for the varlen kernel",
            )
    allowed = torch.ones(batch_size, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if is_causal:
        q_abs = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        allowed &= torch.arange(kv_len, device=device)[None, :] <= q_abs
    if q_len == kv_len and position_ids is not None:
        cu_seqlens, _ = packed_cu_seqlens(position_ids, batch_size, q_len)
        seq_id = torch.zeros(batch_size * q_len, dtype=torch.long, device=device)
        seq_id[cu_seqlens[1:-1].long().to(device)] = 1
        seq_id = seq_id.cumsum(0).view(batch_size, q_len)
        block = seq_id[:, None, :, None] == seq_id[:, None, None, :]
        # a row holding trees gets the tree mask instead of the block-diagonal one
        position_ids = position_ids.expand(batch_size, q_len)
        for r in _rows_with_drops(position_ids):
            block[r, 0] = tree_mask(tree_segments(position_ids[r : r + 1], 1, q_len), device)
        allowed &= block
    if attention_mask is not None:
        allowed &= attention_mask[:, -kv_len:].to(device=device, dtype=torch.bool)[:, None, None, :]
    # A fully masked row (a left-pad query) would give NaN; let it attend anywhere, its output
    # is ignored.
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return sdpa_attention_forward(module, query, key, value, allowed, dropout=0.0, scaling=scaling, is_causal=False)
