"""Prefix-shared ("tree") packed rows: continuations of one context encode it once.

A packed row normally holds independent sequences, each with ``position_ids`` 0..n-1. A tree
holds a context once and several continuations of it (step-DPO's chosen and rejected step,
or the N candidates whose reference log-probs a rollout worker computes)::

    tokens     c0 c1 .. c[C-1] w0 .. w[W-1]   c[C-1] r0 .. r[R-1]
    positions  0  1  .. C-1    C  .. C+W-1    C-1    C  .. C+R-1
               `--- root: context + first ---'  `--- branch ----'

The tree is read off ``position_ids`` alone. A *segment* is a maximal run whose positions go
up by 1. A segment starting at position 0, or at the start of a row, is a *root*. A segment
starting at position ``p > 0`` whose row's latest root (one that starts at position 0) has at
least ``p`` tokens is a *branch* of that root: it attends to the root's first ``p`` tokens and
causally to itself — not to the root's later tokens, not to its siblings. Any other drop of
position starts an independent sequence, as before trees existed.

A branch repeats the context's last token (at position ``C - 1``, so it shares ``p = C - 1``
tokens), because the token just before ``r0`` in the row is the one whose output predicts it:
next-token log-probs keep their shift by one, and the model code, the loss head and rotary
embeddings need no change (a branch's positions are those of its unshared sequence). In
exact arithmetic every token's hidden states, log-probs and gradients equal those of the
unshared packing ``[context, w] [context, r]``; a branch costs one token instead of ``C``.
A one-token context gives a branch at position 0, i.e. a separate sequence: still exact.

Kernels: :func:`sdpa_tree` (any device; ``safer_segments``) runs SDPA once per segment, a
branch's queries against its prefix's keys and its own; :func:`flex_tree` (CUDA, for
``safer_varlen``'s 16-bit rows) runs ``torch.nn.attention.flex_attention`` with a block mask of
the same structure (:func:`token_layout`). Which attention backends take a tree is decided by
:func:`safer_dist.train.attention.tree_packing_unsupported`; packers share a prefix only then.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of the flattened ``B * T`` row(s); they attend causally to
    themselves and to all of ``[prefix_start, prefix_start + prefix_len)`` (a root: 0, 0)."""

    start: int
    end: int
    prefix_start: int = 0
    prefix_len: int = 0


def tree_segments(position_ids: torch.Tensor | None, batch_size: int, seq_len: int) -> list[Segment]:
    """The segments of a packed batch (see the module docstring), in token order.

    ``position_ids``: ``[B, T]`` or ``[1, T]`` (broadcast); ``None`` means one sequence per row.
    """
    if position_ids is None:
        return [Segment(r * seq_len, (r + 1) * seq_len) for r in range(batch_size)]
    pos = position_ids.expand(batch_size, seq_len)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flat = starts.reshape(-1).nonzero().squeeze(-1)
    idx = flat.tolist()
    first = pos.reshape(-1)[flat].tolist()
    bounds = idx + [batch_size * seq_len]
    segments: list[Segment] = []
    root: Segment | None = None
    for a, b, p in zip(bounds, bounds[1:], first):
        if a % seq_len == 0:
            root = None  # trees never span rows
        if root is not None and 0 < p <= root.end - root.start:
            segments.append(Segment(a, b, root.start, p))
            continue
        segments.append(Segment(a, b))
        if p == 0:
            root = segments[-1]
    return segments


def has_branches(segments: list[Segment]) -> bool:
    return any(s.prefix_len for s in segments)


LAYOUT_KWARG = "safer_packed_layout"


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """The sequence boundaries of one packed batch, computed once on the host and handed to every
    layer's attention (a model forward's ``**layout.model_kwargs()``), so no layer derives them
    from ``position_ids`` again (on CUDA each derivation is a host synchronisation).

    ``segments``: :func:`tree_segments` of the batch; ``cu_seqlens``: int32 ``[S + 1]``, the
    segment starts over the flattened ``B * T`` tokens and ``B * T``; ``max_seqlen``: the longest
    segment; ``batch_size``, ``seq_len``: the batch's ``[B, T]``. Built by :func:`packed_layout`.
    """

    segments: tuple[Segment, ...]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch_size: int
    seq_len: int
    has_branches: bool
    # per-device block masks of flex_tree, built by the first layer that needs one
    _block_masks: dict = field(default_factory=dict, repr=False)

    def to(self, device: torch.device | str) -> "PackedLayout":
        """The layout with ``cu_seqlens`` on ``device`` (an asynchronous copy; the rest is host data)."""
        return PackedLayout(self.segments, self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen,
                            self.batch_size, self.seq_len, self.has_branches)

    def matches(self, batch_size: int, seq_len: int) -> bool:
        return (self.batch_size, self.seq_len) == (batch_size, seq_len)

    def model_kwargs(self) -> dict:
        """Keyword arguments for a transformers model forward, which passes them to every attention
        call: the layout itself (read by ``safer_segments`` / ``safer_varlen``) and, for a batch
        without tree branches, transformers' own varlen arguments (``cu_seq_lens_q/k``,
        ``max_length_q/k``; ``flash_attention_2`` reads them, ``sdpa``/``eager`` ignore them)."""
        out: dict = {LAYOUT_KWARG: self}
        if not self.has_branches:
            out.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                       max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
        return out

    def block_mask(self, device, build: Callable):
        """``build()``'s flex block mask, built once per device and reused by every later layer."""
        key = str(device)
        if key not in self._block_masks:
            self._block_masks[key] = build()
        return self._block_masks[key]


def packed_layout(position_ids: torch.Tensor, batch_size: int | None = None) -> PackedLayout:
    """The :class:`PackedLayout` of a packed batch from its ``position_ids`` ``[B, T]`` (or
    ``[1, T]`` broadcast to ``batch_size`` rows). Pass the host (CPU) tensor: on a CUDA tensor
    this reads it back, one synchronisation."""
    batch_size = batch_size or position_ids.shape[0]
    seq_len = position_ids.shape[-1]
    segments = tuple(tree_segments(position_ids.cpu(), batch_size, seq_len))
    starts = [s.start for s in segments]
    cu_seqlens = torch.tensor(starts + [batch_size * seq_len], dtype=torch.int32)
    return PackedLayout(segments, cu_seqlens, max((s.end - s.start for s in segments), default=0), batch_size,
                        seq_len, has_branches(list(segments)))


def token_layout(segments: list[Segment], device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """Per token of the flattened row: ``(segment_start, prefix_start, prefix_end)``, each
    ``[B * T]`` long. Key ``k`` is visible to query ``q`` iff
    ``segment_start[q] <= k <= q`` or ``prefix_start[q] <= k < prefix_end[q]``."""
    lengths = torch.tensor([s.end - s.start for s in segments])
    per_seg = torch.tensor([[s.start, s.prefix_start, s.prefix_start + s.prefix_len] for s in segments])
    cols = per_seg.repeat_interleave(lengths, dim=0).to(device)
    return cols[:, 0].contiguous(), cols[:, 1].contiguous(), cols[:, 2].contiguous()


def tree_mask(segments: list[Segment], device: torch.device | str | None = None) -> torch.Tensor:
    """The dense ``[N, N]`` bool mask (``True`` = may attend) of :func:`token_layout`, N = B * T."""
    seg_start, pre_start, pre_end = token_layout(segments, device)
    q = torch.arange(seg_start.numel(), device=device)[:, None]
    k = q.T
    return ((k >= seg_start[:, None]) & (k <= q)) | ((k >= pre_start[:, None]) & (k < pre_end[:, None]))


def _flatten_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[H, B*T, D]``: each segment is a contiguous slice along dim 1."""
    b, h, t, d = x.shape
    return x.transpose(0, 1).reshape(h, b * t, d)


def sdpa_tree(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, segments: list[Segment]
) -> torch.Tensor:
    """Attention of a packed (possibly tree) batch, SDPA once per segment.

    ``query`` ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]`` -> ``[B, T, Hq, D]``. A root
    runs causal SDPA over its own slice; a branch of ``L`` tokens runs its queries against
    ``[prefix keys (P), own keys (L)]`` with a ``[L, P + L]`` mask (prefix all visible, own causal).
    """
    batch_size, num_q_heads, q_len, head_dim = query.shape
    gqa = num_q_heads != key.shape[1]
    if len(segments) == 1 and not segments[0].prefix_len:  # one sequence: no slicing, no copy
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2)
    q, k, v = _flatten_heads(query), _flatten_heads(key), _flatten_heads(value)
    outs = []
    for s in segments:
        a, b = s.start, s.end
        if not s.prefix_len:
            # 4-D, as the one-sequence call above: SDPA runs its fused kernel on 4-D inputs and
            # its math path on 3-D ones, and the two round differently, so a sequence packed with
            # others would get other activations than the same sequence alone.
            outs.append(F.scaled_dot_product_attention(
                q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], is_causal=True, scale=scaling, enable_gqa=gqa)[0])
            continue
        p0, p1, n = s.prefix_start, s.prefix_start + s.prefix_len, b - a
        mask = torch.ones(n, s.prefix_len + n, dtype=torch.bool, device=query.device)
        mask[:, s.prefix_len:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        outs.append(F.scaled_dot_product_attention(
            q[:, a:b], torch.cat([k[:, p0:p1], k[:, a:b]], dim=1), torch.cat([v[:, p0:p1], v[:, a:b]], dim=1),
            attn_mask=mask, scale=scaling, enable_gqa=gqa))
    out = torch.cat(outs, dim=1)  # [H, B*T, D]
    return out.view(num_q_heads, batch_size, q_len, head_dim).permute(1, 2, 0, 3)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # Default compile (no dynamic=False): packed rows change length every micro-batch, and
    # after the first recompile dynamo compiles for dynamic shapes instead of once per length.
    return torch.compile(flex_attention)


def _eager_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


class _BlockMaskCache:
    """The block mask of the last ``position_ids`` seen: every layer of a forward passes the
    same ones, and building the mask costs more than a layer's attention on short rows."""

    def __init__(self):
        self.key: tuple | None = None
        self.position_ids: torch.Tensor | None = None
        self.block_mask = None

    def get(self, position_ids, batch_size, seq_len, build):
        key = (batch_size, seq_len, position_ids.device)
        if self.key == key and self.position_ids is not None and torch.equal(self.position_ids, position_ids):
            return self.block_mask
        self.block_mask = build()
        self.key, self.position_ids = key, position_ids.detach().clone()
        return self.block_mask


_BLOCK_MASKS = _BlockMaskCache()


def flex_tree(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
    position_ids: torch.Tensor | None, *, compiled: bool = True, layout: PackedLayout | None = None,
) -> torch.Tensor:
    """Attention of a packed tree batch through ``flex_attention``; same contract as
    :func:`sdpa_tree` (``[B, H, T, D]`` in, ``[B, T, Hq, D]`` out), the structure read from
    ``layout`` when given (its block mask built by the first layer, no synchronisation), else from
    ``position_ids`` ``[B or 1, T]``. ``compiled=False`` runs flex's unfused eager path (it
    materialises the scores; on CPU flex has no backward, so CPU tests use it without grad)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch_size, num_q_heads, q_len, head_dim = query.shape
    total = batch_size * q_len

    def build():
        segments = list(layout.segments) if layout is not None else tree_segments(position_ids, batch_size, q_len)
        seg_start, pre_start, pre_end = token_layout(segments, query.device)

        def mask_mod(b, h, q_idx, kv_idx):
            own = (kv_idx >= seg_start[q_idx]) & (kv_idx <= q_idx)
            return own | ((kv_idx >= pre_start[q_idx]) & (kv_idx < pre_end[q_idx]))

        return create_block_mask(mask_mod, None, None, total, total, device=query.device)

    if layout is not None:
        block_mask = layout.block_mask(query.device, build)
    else:
        block_mask = _BLOCK_MASKS.get(position_ids, batch_size, q_len, build)
    flex = _compiled_flex() if compiled else _eager_flex()
    q, k, v = (_flatten_heads(x)[None] for x in (query, key, value))  # [1, H, B*T, D]
    out = flex(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=num_q_heads != key.shape[1])
    return out[0].view(num_q_heads, batch_size, q_len, head_dim).permute(1, 2, 0, 3)
