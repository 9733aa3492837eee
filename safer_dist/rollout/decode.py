"""Continuous batching over a prefix-shared KV cache: the decode loop behind ``sample_candidates``.

A *row* is one continuation being sampled; a *group* is the rows of one prefix. A group's
prefix is encoded once and its KV cache stored once; each row stores only the KV of the tokens
it sampled. Every decode step feeds one token per row, and attention
(:func:`shared_prefix_attention`, switched in for the step) reads each prefix's keys and values
once for all its rows: a row's scores over its prefix and over its own tokens share one
softmax, which equals attention over a copy of the prefix in every row, without the copies
(``n`` rows of one prefix read its KV once per step instead of ``n`` times).

A row that ends — EOS, a stop string in its text, or its token limit — leaves the batch at
the next rebuild (its own KV rows are dropped with ``index_select``, its prefix with its last
row), and waiting prefixes are prefilled and join, so the batch never runs for its longest
row only. A prefill packs the admitted prefixes back to back in one row, without padding
(``safer_segments``: causal SDPA per prefix), and the batch keeps the prefixes left-padded to
one width (and the rows' own tokens likewise), columns that every prefix or row pads cut.

Randomness: every row draws from its own ``random.Random``, seeded from (seed, the prefix's
token ids, continuation index), by inverse-CDF sampling over the row's probabilities. A row's
sample depends on its prefix and that seed only — not on the prefix's place among the
prefixes, which rows share its batch, when it was admitted, or the batch capacity. On CPU with
oneDNN linear layers (:mod:`safer_dist.rollout.packed_linear`, the default) a row's logits come
out the same bit for bit in any batch as well, save a rare float64 rounding tie (see
:func:`shared_prefix_attention`); with MKL's ``nn.Linear`` they do not (its kernels for a few
rows round otherwise than for many). Temperature 0 is greedy (argmax).

Models with sliding-window attention, logit soft-capping or attention sinks are refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from safer_dist.rollout.draw import RowRng, Seed, StopCheck, draw, row_rng
from safer_dist.train.attention_kernels import SEGMENTS_NAME, register_varlen_attention


@dataclass
class _Row:
    prefix: int  # index into the prefixes
    cand: int
    prefix_len: int
    rng: RowRng
    group: int  # index of its prefix's KV in the batch
    slot: int  # its place among its prefix's rows (0 when each row has its own prefill)
    tokens: list[int] = field(default_factory=list)  # sampled ids, the last one not yet fed


def forward(model, cache, **inputs):
    """``model(**inputs)`` extending ``cache`` in place; the argument is ``cache`` from
    transformers 5.2x on and ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(**inputs, **{name: cache}, use_cache=True)


SHARED_PREFIX_NAME = "safer_shared_prefix"
_REFUSED_KWARGS = ("softcap", "s_aux", "sliding_window")


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask=None, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """One decode step's attention with each prefix's KV read once for all its rows.

    ``query [B, H, 1, D]``; ``key``/``value`` ``[B, Hkv, S, D]`` are the rows' own tokens (this
    step's included); the prefixes' come from ``kwargs["safer_shared_prefix"]`` (a ``_Batch``)
    for ``module.layer_idx``. A row's scores over its prefix and over its own tokens share one
    softmax, so the result is softmax attention over the concatenation, as if the prefix were
    copied into every row. The queries are laid out on the batch's ``[G, width]`` grid, so
    the prefix part is one batched matmul per layer (grouped-query heads included, no KV
    repeat). Returns ``([B, 1, H, D], None)`` as transformers' attention functions do.
    """
    batch = kwargs.get("safer_shared_prefix")
    if batch is None:
        raise RuntimeError(f"attention {SHARED_PREFIX_NAME!r} runs only inside candidate sampling's decode steps")
    refused = [k for k in _REFUSED_KWARGS if kwargs.get(k) is not None]
    if refused or dropout:
        raise ValueError(f"candidate sampling's shared-prefix attention does not support {refused or 'dropout'}")
    pk, pv = batch.prefix[module.layer_idx]
    b, h, q_len, d = query.shape
    g, hkv, p, _ = pk.shape
    s, rep, w = key.shape[2], h // hkv, batch.width
    if q_len != 1:
        raise ValueError(f"shared-prefix attention decodes one token per row, got {q_len}")

    full = b == g * w  # every prefix has all its rows, in order: the rows are the grid

    def to_grid(x: torch.Tensor) -> torch.Tensor:  # [B, H, X] -> [G, Hkv, rep * width, X]
        grid = x if full else x.new_zeros(g * w, h, x.shape[-1]).index_copy_(0, batch.slot, x)
        return grid.reshape(g, w, hkv, rep, -1).permute(0, 2, 3, 1, 4).reshape(g, hkv, rep * w, -1)

    def from_grid(x: torch.Tensor) -> torch.Tensor:  # [G, Hkv, rep * width, X] -> [B, H, X]
        rows = x.view(g, hkv, rep, w, -1).permute(0, 3, 1, 2, 4).reshape(g * w, h, -1)
        return rows if full else rows.index_select(0, batch.slot)

    q = query[:, :, 0]
    on_prefix = from_grid(torch.matmul(to_grid(q), pk.transpose(-1, -2)))  # [B, H, P]
    on_own = torch.matmul(q.reshape(b, hkv, rep, d), key.transpose(-1, -2)).reshape(b, h, s)
    # A row's real columns sit at offsets that depend on the batch (its prefix's left padding, and
    # the masked gap before its own tokens), and a float32 softmax rounds its sum differently at
    # other offsets. On CPU the softmax runs in float64: its offset-dependent rounding is ~2^29
    # times smaller and reaches a float32 probability only where that lies within a float64
    # rounding of a float32 tie, so a row's logits do not depend on the rows beside it (bit for bit
    # in tests/unit/test_sampling.py). On GPUs the batch changes the matmul kernels anyway, and
    # float32 keeps the step short.
    acc = torch.float64 if query.device.type == "cpu" else torch.float32
    scores = torch.cat([on_prefix, on_own], dim=-1).to(acc) * (d**-0.5 if scaling is None else scaling)
    scores.masked_fill_(~batch.step_mask[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(value.dtype)
    out = from_grid(torch.matmul(to_grid(probs[..., :p]), pv))
    out += torch.matmul(probs[..., p:].reshape(b, hkv, rep, s), value).reshape(b, h, d)
    return out.unsqueeze(1), None


@functools.cache
def _register_shared_prefix_attention() -> None:
    """Register :func:`shared_prefix_attention` with transformers (no mask function: the model
    then builds no mask for it, the batch holds its own)."""
    from transformers import AttentionInterface

    AttentionInterface.register(SHARED_PREFIX_NAME, shared_prefix_attention)


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    """Run ``model`` with attention ``name``, then restore what it had (sub-configs included)."""
    cfg = model.config
    before = {"": cfg._attn_implementation}
    for key in getattr(cfg, "sub_configs", {}):
        sub = getattr(cfg, key, None)
        if sub is not None:
            before[key] = sub._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = before


def _check_full_attention(model) -> None:
    """Refuse models with sliding-window layers: shared-prefix attention lets every row see its
    whole prefix."""
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
        self._keys = k0.new_empty(sum(k.shape[0] for k, _ in blocks), k0.shape[1], width + spare, k0.shape[3])
        self._values = torch.empty_like(self._keys)
        _stack_right_aligned(self._keys, self._values, blocks, width)
        self.keys, self.values = self._keys[:, :, :width], self._values[:, :, :width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t, new = self.keys.shape[-2], key_states.shape[-2]
        if t + new > self._keys.shape[-2]:  # out of spare columns: copy into larger buffers
            self.__init__([(self.keys, self.values)], t, max(64, t))
        self._keys[:, :, t : t + new], self._values[:, :, t : t + new] = key_states, value_states
        self.keys, self.values = self._keys[:, :, : t + new], self._values[:, :, : t + new]
        return self.keys, self.values


def _stack_right_aligned(keys: torch.Tensor, values: torch.Tensor,
                         blocks: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
    """Write row blocks ``[b_i, H, T_i, D]`` one under another into ``keys``/``values``
    ``[sum b_i, H, >= width, D]``, each right-aligned to column ``width``; the columns left of a
    block are set to 0 (masked, but read: they must be finite)."""
    r = 0
    for k, v in blocks:
        b, lead = k.shape[0], width - k.shape[2]
        for buf, part in ((keys, k), (values, v)):
            buf[r : r + b, :, :lead] = 0
            buf[r : r + b, :, lead:width] = part
        r += b


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Per row of a bool ``mask [R, T]``, the column of its first True (``T`` for a row with none)."""
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    return torch.where(mask.any(dim=1), mask.int().argmax(dim=1), mask.shape[1])


def _keep(layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, rows: list[int]
          ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """``rows`` of per-layer ``(keys, values)`` ``[R, H, T, D]`` and of ``mask [R, T]`` (no copy
    when that is all of them), with the leading columns that no kept row uses cut."""
    if len(rows) < mask.shape[0]:
        idx = torch.tensor(rows, device=mask.device)
        layers = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in layers]
        mask = mask.index_select(0, idx)
    lead = int(_first_true(mask).min())
    return [(k[:, :, lead:], v[:, :, lead:]) for k, v in layers], mask[:, lead:]


class _Batch:
    """The rows in flight, grouped by prefix: the KV cache of a group's prefix is stored once and
    read by all its rows (:func:`shared_prefix_attention`); each row stores only its own tokens'.

    Per layer ``prefix[l] = (keys, values)`` ``[G, H, P, D]`` with ``pmask [G, P]``, the groups
    left-padded to one width; the rows' own keys/values live in ``cache`` (``_SlotLayer``,
    ``[B, H, S, D]``, ``smask [B, S]``, left-padded: a row that joins a running batch has the
    columns before it masked). ``slot [B]`` places row ``b`` at ``group * width + cand`` of a
    ``[G * width]`` grid, ``width`` being the rows per prefix; rows stay in grid order, so
    when every prefix has all its rows the rows are the grid. A row that ends stays (``alive``
    False, fed a pad token, its output unused) until the next ``rebuild``, so the cache is copied
    once per admission, not once per ending row; a prefix goes with its last row."""

    def __init__(self, pad: int, spare: int, width: int):
        self.pad, self.spare, self.width = pad, spare, width
        self.rows: list[_Row] = []
        self.alive: list[bool] = []
        self.prefix, self.pmask, self.cache, self.smask, self.slot = None, None, None, None, None
        self.row_pmask = None  # [B, P]: each row's prefix mask
        self.step_mask = None  # [B, P + S] for the step being run: the row's prefix, then its own tokens

    def __len__(self) -> int:
        return len(self.rows)

    def num_alive(self) -> int:
        return sum(self.alive)

    def rebuild(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                mask: torch.Tensor | None = None, rows: list[_Row] = ()) -> None:
        """Drop the rows that ended (and prefixes none of whose rows is left), and append ``rows``
        with their prefixes (``prefix``: per layer ``(keys, values)`` ``[g, H, L, D]``, ``mask [g, L]``;
        ``rows[i].group`` indexes them). Leading columns no prefix or no row uses are cut."""
        keep = [i for i, a in enumerate(self.alive) if a]
        kept_rows = [self.rows[i] for i in keep]
        groups = sorted({r.group for r in kept_rows})
        renumber = {g: i for i, g in enumerate(groups)}
        prefix_blocks, pmasks, suffix_blocks, smasks = [], [], [], []
        if kept_rows:
            kv, m = _keep(self.prefix, self.pmask, groups)
            prefix_blocks.append(kv)
            pmasks.append(m)
            kv, m = _keep([(layer.keys, layer.values) for layer in self.cache.layers], self.smask, keep)
            suffix_blocks.append(kv)
            smasks.append(m)
        for r in kept_rows:
            r.group = renumber[r.group]
        if rows:
            for r in rows:
                r.group += len(groups)
            prefix_blocks.append(list(prefix))
            pmasks.append(mask.bool())
            k0 = prefix[0][0]
            none = k0.new_zeros(len(rows), k0.shape[1], 0, k0.shape[3])  # a joining row has no own token yet
            suffix_blocks.append([(none, none)] * len(prefix))
            smasks.append(torch.zeros(len(rows), 0, dtype=torch.bool, device=mask.device))
        self.rows = kept_rows + list(rows)
        self.alive = [True] * len(self.rows)
        if not self.rows:
            self.prefix, self.pmask, self.cache, self.smask, self.slot = None, None, None, None, None
            return
        self.prefix, self.pmask = _join_left_padded(prefix_blocks, pmasks)
        width = max(m.shape[1] for m in smasks)
        self.smask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in smasks])
        self.cache = DynamicCache()
        self.cache.layers = [_SlotLayer([part[i] for part in suffix_blocks], width, self.spare)
                             for i in range(len(suffix_blocks[0]))]
        self.slot = torch.tensor([r.group * self.width + r.slot for r in self.rows], device=self.smask.device)
        self.row_pmask = self.pmask.index_select(0, self.slot // self.width)  # [B, P], fixed until the next rebuild

    def step(self, model) -> torch.Tensor:
        """Feed every row's last sampled token (a pad for ended rows); next-token logits ``[B, V]``."""
        device = self.smask.device
        ids = torch.tensor([[r.tokens[-1] if a else self.pad] for r, a in zip(self.rows, self.alive)], device=device)
        pos = torch.tensor([[r.prefix_len + len(r.tokens) - 1] for r in self.rows], device=device)
        self.smask = F.pad(self.smask, (0, 1), value=True)
        self.step_mask = torch.cat([self.row_pmask, self.smask], dim=1)
        with _attention_implementation(model, SHARED_PREFIX_NAME):
            out = forward(model, self.cache, input_ids=ids, position_ids=pos, safer_shared_prefix=self)
        return out.logits[:, -1]


def _join_left_padded(blocks: list[list[tuple[torch.Tensor, torch.Tensor]]],
                      masks: list[torch.Tensor]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per layer, the blocks' ``(keys, values)`` ``[g_i, H, L_i, D]`` stacked and right-aligned to
    the widest; the masks ``[g_i, L_i]`` alike. A single block is returned as it is."""
    if len(blocks) == 1:
        return blocks[0], masks[0]
    width = max(m.shape[1] for m in masks)
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])
    layers = []
    for i in range(len(blocks[0])):
        parts = [b[i] for b in blocks]
        k0 = parts[0][0]
        keys = k0.new_empty(mask.shape[0], k0.shape[1], width, k0.shape[3])
        values = torch.empty_like(keys)
        _stack_right_aligned(keys, values, parts, width)
        layers.append((keys, values))
    return layers, mask


def _prefill(model, seqs: list[list[int]], device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor,
                                                              torch.Tensor]:
    """Encode ``seqs`` packed back to back in one row (no padding; ``safer_segments``: causal SDPA
    per sequence). Returns per layer ``(keys, values)`` ``[len(seqs), H, L, D]`` with the
    sequences right-aligned to the longest ``L`` (the columns before a shorter one hold copies
    of real keys: finite, masked), ``mask [len(seqs), L]`` (True on tokens), and each sequence's
    next-token logits ``[len(seqs), V]``."""
    lens = torch.tensor([len(x) for x in seqs])
    ends = lens.cumsum(0)
    ids = torch.tensor([t for x in seqs for t in x], device=device)[None]
    pos = torch.cat([torch.arange(n) for n in lens.tolist()]).to(device)[None]
    cache = DynamicCache()
    with _attention_implementation(model, SEGMENTS_NAME):
        out = forward(model, cache, input_ids=ids, position_ids=pos, logits_to_keep=(ends - 1).to(device))
    width = int(lens.max())
    # Column j of sequence i is packed position ends[i] - width + j; the columns before its start
    # (negative offsets into it) read position 0 instead, under mask False.
    col = ends[:, None] - width + torch.arange(width)[None]
    mask = col >= (ends - lens)[:, None]
    idx = torch.where(mask, col, 0).flatten().to(device)
    g = len(seqs)

    def unpack(x: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [g, H, width, D]
        return x[0].index_select(1, idx).view(x.shape[1], g, width, x.shape[3]).transpose(0, 1).contiguous()

    prefix = [(unpack(layer.keys), unpack(layer.values)) for layer in cache.layers]
    return prefix, mask.to(device), out.logits[0]


@torch.no_grad()
def decode(
    model, prefixes: list[list[int]], n: int, *, max_new_tokens: int, eos: int | None, pad: int, stop: StopCheck,
    temperature: float, top_p: float, seed: Seed, capacity: int, reuse_prefix: bool = True,
) -> list[list[list[int]]]:
    """Sampled token ids, ``n`` per prefix: each row ends with EOS, with the token that
    completed a stop string, or at ``max_new_tokens``. At most ``max(capacity, n)`` rows in flight.

    ``reuse_prefix=False`` prefills every row's prefix on its own (the peer method, for tests).
    """
    _check_full_attention(model)
    _register_shared_prefix_attention()
    register_varlen_attention()
    device = next(model.parameters()).device
    out: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prefixes]
    # Units enter together: a prefix's n rows, or (without reuse) one row. Longest first, so a
    # prefill batch holds similar lengths (little padding); the order changes no sample.
    units = [(p, c) for p in range(len(prefixes)) for c in ((None,) if reuse_prefix else range(n))]
    units.sort(key=lambda u: -len(prefixes[u[0]]))
    per_unit = n if reuse_prefix else 1
    capacity = max(capacity, per_unit)
    batch, next_unit = _Batch(pad, spare=max_new_tokens + 1, width=per_unit), 0

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
            prefix, mask, logits = _prefill(model, [prefixes[p] for p, _ in admit], device)
            rows = [_Row(p, c, len(prefixes[p]), row_rng(seed, prefixes[p], c), group, c if reuse_prefix else 0)
                    for group, (p, cs) in enumerate(admit) for c in (range(n) if cs is None else (cs,))]
            src = torch.tensor([r.group for r in rows], device=device)  # row -> its prefill
            done = sample_into(rows, logits.index_select(0, src))
            rows = [r for r, d in zip(rows, done) if not d]
            if rows:  # the prefixes with rows that go on join the batch, stored once each
                groups = sorted({r.group for r in rows})
                prefix, mask = _keep(prefix, mask, groups)
                renumber = {g: i for i, g in enumerate(groups)}
                for r in rows:
                    r.group = renumber[r.group]
                batch.rebuild(prefix, mask, rows)
            continue
        if 4 * (len(batch) - batch.num_alive()) > len(batch):  # many ended rows and none to admit
            batch.rebuild()
        logits = batch.step(model)
        live = [i for i, a in enumerate(batch.alive) if a]
        for i, d in zip(live, sample_into([batch.rows[i] for i in live], logits[live])):
            batch.alive[i] = not d
    return out
