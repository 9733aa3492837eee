"""Continuous batching over a per-row KV cache: the decode loop behind ``sample_candidates``.

A *row* is one continuation being sampled: its KV cache (a row of a transformers
``DynamicCache``, left-padded to the batch's width), its attention-mask row, and the token
it feeds next. Every step feeds one token per row. A row that ends — EOS, a stop string in
its text, or its token limit — leaves the batch at once (its KV rows are dropped with
``index_select``), and waiting prefixes are prefilled and join (old and new KV left-padded to
one width, then concatenated), so the batch never runs for its longest row only. Columns
that every row pads are cut.

Prefix reuse: a prefix is prefilled once; its KV rows and its last position's logits are
repeated for its ``n`` continuations, which join together (when ``n`` rows are free).

Randomness: every row draws from its own ``random.Random``, seeded from (seed, prefix index,
continuation index), by inverse-CDF sampling over the row's probabilities. A row's sample
depends on its prefix and that seed only — not on which rows share its batch, when it was
admitted, or the batch capacity. Temperature 0 is greedy (argmax).

Models with sliding-window attention are refused (their masks take a key's column for its
position, which left padding breaks).
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Draws for one row: a stream of its own, from a string seed (Python hashes str seeds with
# SHA-512, so the stream is the same on every platform and run).
RowRng = random.Random


def row_rng(seed: int, prefix: int, cand: int) -> RowRng:
    return random.Random(f"safer-sample-{seed}-{prefix}-{cand}")


@dataclass
class _Row:
    prefix: int  # index into the prefixes
    cand: int
    prefix_len: int
    rng: RowRng
    tokens: list[int] = field(default_factory=list)  # sampled ids, the last one not yet fed


def left_pad(seqs: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` and ``mask`` ``[len(seqs), max len]``, sequences right-aligned (mask 1 on tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def forward(model, cache, **inputs):
    """``model(**inputs)`` extending ``cache`` in place; the argument is ``cache`` from
    transformers 5.2x on and ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(**inputs, **{name: cache}, use_cache=True)


def _check_full_attention(model) -> None:
    """Refuse models with sliding-window layers: their masks take a key's column for its
    position, which left padding breaks."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(cfg, "layer_types", None)
    sliding = (any("sliding" in str(t) for t in layer_types) if layer_types is not None
               else getattr(cfg, "sliding_window", None) is not None)
    if sliding:
        raise ValueError(f"candidate sampling does not support sliding-window attention ({type(cfg).__name__})")


class _SlotLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values ``[B, H, T, D]`` are views of buffers
    with spare columns: a decode step writes its column in place, where ``DynamicLayer``
    concatenates (a copy of the whole cache per layer and step).

    Built from row blocks ``(keys, values)`` of shape ``[b_i, H, T_i, D]``, stacked along the
    batch and right-aligned to ``width`` columns (the columns to their left are set to 0:
    padding, masked, but read, so they must be finite). The spare columns are left unset: a
    column is written before any view covers it."""

    def __init__(self, blocks: list[tuple[torch.Tensor, torch.Tensor]], width: int, spare: int):
        super().__init__()
        k0 = blocks[0][0]
        self.device, self.is_initialized = k0.device, True
        rows = sum(k.shape[0] for k, _ in blocks)
        self._keys = k0.new_empty(rows, k0.shape[1], width + spare, k0.shape[3])
        self._values = torch.empty_like(self._keys)
        r = 0
        for k, v in blocks:
            b, lead = k.shape[0], width - k.shape[2]
            for buf, part in ((self._keys, k), (self._values, v)):
                buf[r : r + b, :, :lead] = 0
                buf[r : r + b, :, lead:width] = part
            r += b
        self.keys, self.values = self._keys[:, :, :width], self._values[:, :, :width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t, new = self.keys.shape[-2], key_states.shape[-2]
        if t + new > self._keys.shape[-2]:  # out of spare columns: copy into larger buffers
            self.__init__([(self.keys, self.values)], t, max(64, t))
        self._keys[:, :, t : t + new], self._values[:, :, t : t + new] = key_states, value_states
        self.keys, self.values = self._keys[:, :, : t + new], self._values[:, :, : t + new]
        return self.keys, self.values


class _Batch:
    """The rows in flight: a cache of ``_SlotLayer`` (keys/values ``[B, H, T, D]``), ``mask [B, T]``.
    A row that ends stays (``alive`` False, fed a pad token, its output unused) until the next
    ``rebuild``, so the cache is copied once per admission, not once per ending row."""

    def __init__(self, pad: int, spare: int):
        self.pad, self.spare = pad, spare
        self.cache, self.mask, self.rows, self.alive = None, None, [], []

    def __len__(self) -> int:
        return len(self.rows)

    def num_alive(self) -> int:
        return sum(self.alive)

    def rebuild(self, cache=None, mask: torch.Tensor | None = None, rows: list[_Row] = ()) -> None:
        """Drop the rows that ended and append ``rows`` (prefilled: ``cache`` layers ``[b, H, L, D]``,
        ``mask [b, L]``), both left-padded to one width; leading columns no row uses are cut."""
        keep = [i for i, a in enumerate(self.alive) if a]
        blocks, masks = [], []  # per part (kept rows, new rows): per layer (keys, values); masks
        if keep:
            old = [(layer.keys, layer.values) for layer in self.cache.layers]
            mask_kept = self.mask
            if len(keep) < len(self.rows):
                idx = torch.tensor(keep, device=self.mask.device)
                old = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in old]
                mask_kept = self.mask.index_select(0, idx)
            lead = int(mask_kept.argmax(dim=1).min())  # leading pad columns of the least padded row
            blocks.append([(k[:, :, lead:], v[:, :, lead:]) for k, v in old])
            masks.append(mask_kept[:, lead:])
        if rows:
            blocks.append([(layer.keys, layer.values) for layer in cache.layers])
            masks.append(mask)
        self.rows = [self.rows[i] for i in keep] + list(rows)
        self.alive = [True] * len(self.rows)
        if not masks:
            self.cache, self.mask = None, None
            return
        width = max(m.shape[1] for m in masks)
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])
        self.cache = DynamicCache()
        self.cache.layers = [_SlotLayer([part[i] for part in blocks], width, self.spare) for i in range(len(blocks[0]))]

    def step(self, model) -> torch.Tensor:
        """Feed every row's last sampled token (a pad for ended rows); next-token logits ``[B, V]``."""
        device = self.mask.device
        ids = torch.tensor([[r.tokens[-1] if a else self.pad] for r, a in zip(self.rows, self.alive)], device=device)
        pos = torch.tensor([[r.prefix_len + len(r.tokens) - 1] for r in self.rows], device=device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return forward(model, self.cache, input_ids=ids, attention_mask=self.mask, position_ids=pos).logits[:, -1]


def draw(logits: torch.Tensor, rngs: list[RowRng], temperature: float, top_p: float) -> list[int]:
    """One token per row of ``logits [B, V]``: argmax at temperature 0; otherwise a sample from
    softmax(logits / temperature) restricted to the top-p nucleus (as transformers'
    ``TopPLogitsWarper``), by inverse CDF with one uniform from each row's ``rngs[i]``."""
    if temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    scores = logits.double() / temperature  # float64: the CDF of a large vocabulary stays exact enough
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        drop[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)
    u = torch.tensor([[g.random()] for g in rngs], dtype=cdf.dtype, device=cdf.device)
    # The first token whose cumulative probability exceeds u: never one of probability 0.
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)
    return ids.squeeze(1).tolist()


class StopCheck:
    """Whether a row's sampled text contains a stop string, from its last ``lookback`` tokens
    (every token is at least one byte, so this window holds any stop string just completed)."""

    def __init__(self, tokenizer, stops: list[str] | None):
        self.tokenizer, self.stops = tokenizer, list(stops or ())
        self.lookback = max((len(s.encode()) for s in self.stops), default=0) + 2

    def __call__(self, rows: list[list[int]]) -> list[bool]:
        if not self.stops or not rows:
            return [False] * len(rows)
        texts = self.tokenizer.batch_decode([r[-self.lookback :] for r in rows], skip_special_tokens=False)
        return [any(s in t for s in self.stops) for t in texts]


@torch.no_grad()
def decode(
    model, prefixes: list[list[int]], n: int, *, max_new_tokens: int, eos: int | None, pad: int, stop: StopCheck,
    temperature: float, top_p: float, seed: int, capacity: int, reuse_prefix: bool = True,
) -> list[list[list[int]]]:
    """Sampled token ids, ``n`` per prefix: each row ends with EOS, with the token that
    completed a stop string, or at ``max_new_tokens``. At most ``max(capacity, n)`` rows in flight.

    ``reuse_prefix=False`` prefills every row's prefix on its own (the peer method, for tests).
    """
    _check_full_attention(model)
    device = next(model.parameters()).device
    out: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prefixes]
    # Units enter together: a prefix's n rows, or (without reuse) one row. Longest first, so a
    # prefill batch holds similar lengths (little padding); the order changes no sample.
    units = [(p, c) for p in range(len(prefixes)) for c in ((None,) if reuse_prefix else range(n))]
    units.sort(key=lambda u: -len(prefixes[u[0]]))
    per_unit = n if reuse_prefix else 1
    capacity = max(capacity, per_unit)
    batch, next_unit = _Batch(pad, spare=max_new_tokens + 1), 0

    def sample_into(rows: list[_Row], logits: torch.Tensor) -> list[bool]:
        """Append one sampled token to each row; whether each row has ended (its output recorded)."""
        for r, t in zip(rows, draw(logits, [r.rng for r in rows], temperature, top_p)):
            r.tokens.append(t)
        stopped = stop([r.tokens for r in rows])
        done = [s or r.tokens[-1] == eos or len(r.tokens) >= max_new_tokens for r, s in zip(rows, stopped)]
        for r, d in zip(rows, done):
            if d:
                out[r.prefix][r.cand] = r.tokens
        return done

    while next_unit < len(units) or batch.num_alive():
        free = (capacity - batch.num_alive()) // per_unit
        if free and next_unit < len(units):
            admit, next_unit = units[next_unit : next_unit + free], next_unit + free
            ids, mask = left_pad([prefixes[p] for p, _ in admit], pad, device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            pre = forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
            logits = pre.logits[:, -1]
            rows = [_Row(p, c, len(prefixes[p]), row_rng(seed, p, c))
                    for p, cs in admit for c in (range(n) if cs is None else (cs,))]
            src = torch.arange(len(admit), device=device).repeat_interleave(per_unit)  # row -> prefilled prefix
            live = [i for i, d in enumerate(sample_into(rows, logits.index_select(0, src))) if not d]
            if live:  # the rows that go on get their prefix's KV: one copy per row, none for the rest
                src = src[live]
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys.index_select(0, src), layer.values.index_select(0, src)
                batch.rebuild(cache, mask.index_select(0, src), [rows[i] for i in live])
            continue
        if 4 * (len(batch) - batch.num_alive()) > len(batch):  # many ended rows and none to admit
            batch.rebuild()
        logits = batch.step(model)
        live = [i for i, a in enumerate(batch.alive) if a]
        for i, d in zip(live, sample_into([batch.rows[i] for i in live], logits[live])):
            batch.alive[i] = not d
    return out
