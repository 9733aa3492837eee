"""Candidate-step sampling with one prefill per shared prefix, and teacher-forced log-probs.

``sample_candidates`` encodes each prefix once (prefixes packed back to back, no padding),
stores its KV cache once, and samples N continuations per prefix whose attention reads that
one copy (shared-prefix attention) — instead of re-encoding the prefix N times and carrying N
copies of its cache as ``generate(num_return_sequences=N)`` does. Sampling is
continuous batching (``safer_dist.rollout.decode``): a row leaves the batch as soon as it ends —
at EOS, when the text generated so far contains a stop string (a step's closing tag), or at
its token limit — and waiting prefixes take its place, so no batch runs for its longest row
only. The returned continuation is cut right after the stop string.

Samples are a function of (seed, prefix token ids, candidate index): each row draws from its
own random stream, so a row's sample does not depend on the prefix's place in ``prefixes``,
on the other prefixes of the call (a prefix given twice gets the same samples twice), on
``batch_rows`` or on prefix reuse. (The earlier sampler, one ``generate`` call
per batch under a global ``torch.manual_seed``, drew every row from one stream, so its samples
depended on batch composition; those exact samples are not reproduced.) Temperature 0 is
greedy and equals ``model.generate`` greedy decoding.

``continuation_logprobs`` scores given continuations of given contexts in packed,
padding-free batches with the same tokenization the learners use.
"""

from __future__ import annotations

import contextlib

import torch

from safer_dist.rollout.decode import decode
from safer_dist.rollout.draw import Seed, StopCheck
from safer_dist.rollout.packed_linear import packed_linears
from safer_dist.erpo.pairs import append_continuations, packed_length
from safer_dist.train.attention import tree_packing_unsupported
from safer_dist.train.losses import sequence_logprobs


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Text up to and including the first stop string, and whether one was found."""
    best = None
    for s in stops or ():
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return (text, False) if best is None else (text[:best], True)


def sample_candidates(
    model, tokenizer, prefixes: list[list[int]], n: int, *, max_new_tokens: int,
    stop_strings: list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
    seed: Seed = 0, batch_rows: int = 64, reuse_prefix: bool = True, packed_weights: bool = True,
) -> list[list[dict]]:
    """``n`` sampled continuations of each prefix (token ids, already chat-formatted).

    Returns, per prefix, ``n`` dicts ``{text, num_tokens, stopped}``: ``text`` is cut after the
    first stop string; ``num_tokens`` counts the tokens of ``text`` (re-encoded) plus 1 for an
    EOS; ``stopped`` says whether a stop string or EOS ended it (False: the token limit did).
    At most ``max(batch_rows, n)`` rows are sampled at once. ``reuse_prefix=False`` encodes the
    prefix once per row (the peer method); it draws the same samples. With ``packed_weights`` a
    CPU model's fp32 linear layers run oneDNN's matmul on weights reordered once for the call
    (:mod:`safer_dist.rollout.packed_linear`; a copy of those weights is held meanwhile); False runs
    ``nn.Linear``. The two agree to float32 rounding, not bit for bit.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample_candidates needs n >= 1 and max_new_tokens >= 1 (got n={n}, "
                         f"max_new_tokens={max_new_tokens})")
    if any(not p for p in prefixes):
        raise ValueError("sample_candidates: every prefix needs at least one token (the chat-formatted prompt)")
    eos = tokenizer.eos_token_id
    sampled = sample_token_ids(
        model, tokenizer, prefixes, n, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
        temperature=temperature, top_p=top_p, seed=seed, batch_rows=batch_rows, reuse_prefix=reuse_prefix,
        packed_weights=packed_weights,
    )
    out: list[list[dict]] = []
    for rows in sampled:
        cands = []
        for row in rows:
            hit_eos = bool(row) and row[-1] == eos
            if hit_eos:
                row = row[:-1]
            text, hit_stop = cut_at_stop(tokenizer.decode(row, skip_special_tokens=False), stop_strings)
            text = _strip_pad(text, tokenizer)
            # The token that completed a stop string may carry text past it, which is cut: count
            # the kept text as the learners will tokenize it.
            num = len(tokenizer.encode(text, add_special_tokens=False)) + (1 if hit_eos else 0)
            cands.append({"text": text, "num_tokens": num, "stopped": hit_eos or hit_stop})
        out.append(cands)
    return out


def sample_token_ids(
    model, tokenizer, prefixes: list[list[int]], n: int, *, max_new_tokens: int,
    stop_strings: list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
    seed: Seed = 0, batch_rows: int = 64, reuse_prefix: bool = True, packed_weights: bool = True,
) -> list[list[list[int]]]:
    """The sampled token ids behind :func:`sample_candidates` (same arguments, same draws), ``n``
    per prefix: each ends with EOS, with the token that completed a stop string, or at
    ``max_new_tokens``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with packed_linears(model, rows_hint=max(batch_rows, n)) if packed_weights else contextlib.nullcontext():
        return decode(
            model, prefixes, n, max_new_tokens=max_new_tokens, eos=tokenizer.eos_token_id, pad=pad,
            stop=StopCheck(tokenizer, stop_strings), temperature=temperature, top_p=top_p, seed=seed,
            capacity=batch_rows, reuse_prefix=reuse_prefix,
        )


def _strip_pad(text: str, tokenizer) -> str:
    pad = tokenizer.pad_token
    return text.replace(pad, "") if pad else text


@torch.no_grad()
def continuation_logprobs(
    model, items: list[tuple[list[int], list[int]]], *, max_tokens_per_pack: int = 8192, share_prefix: bool = True,
) -> list[tuple[float, int]]:
    """Sum of log p(continuation | context) and its token count, for each (context, continuation).

    Items are packed padding-free, about ``max_tokens_per_pack`` tokens per forward. With
    ``share_prefix``, items with the same context are packed as one tree, the context encoded
    once (:func:`safer_dist.erpo.pairs.append_continuations`), if the model's attention takes
    trees (:func:`safer_dist.train.attention.tree_packing_unsupported`; otherwise each item is
    its own sequence, as with ``share_prefix=False``). Both give the same sums up to rounding.
    """
    device = next(model.parameters()).device
    share = share_prefix and tree_packing_unsupported(model.config._attn_implementation, device.type) is None
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(items):
        groups.setdefault(tuple(ctx), []).append(i)
    order = list(groups.items())
    results: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    start = 0
    while start < len(order):
        cols: dict[str, list[int]] = {"input_ids": [], "position_ids": [], "labels": [], "seq_ids": []}
        members: list[int] = []
        end = start
        while end < len(order):
            ctx, idxs = order[end]
            conts = [items[i][1] for i in idxs]
            size = packed_length(len(ctx), [len(c) for c in conts], share_prefix=share)
            if members and len(cols["input_ids"]) + size > max_tokens_per_pack:
                break
            seqs = list(range(len(members), len(members) + len(idxs)))
            append_continuations(cols, list(ctx), conts, seqs, share_prefix=share)
            members += idxs
            end += 1
        row = {name: torch.tensor([xs], dtype=torch.long, device=device) for name, xs in cols.items()}
        logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
        sums, counts = sequence_logprobs(logits, row["labels"], row["seq_ids"], len(members))
        for i, total, n in zip(members, sums.tolist(), counts.tolist()):
            results[i] = (float(total), int(n))
        start = end
    return results
