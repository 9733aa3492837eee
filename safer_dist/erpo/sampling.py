"""Candidate-step sampling with one prefill per shared prefix, and teacher-forced log-probs.

``sample_candidates`` encodes each prefix once (a batched, left-padded prefill), copies its
KV cache N times, and samples N continuations per prefix from the copies — instead of
re-encoding the prefix N times as ``generate(num_return_sequences=N)`` does. Sampling stops
per row at EOS or when the text generated so far contains a stop string (a step's closing
tag); the returned continuation is cut right after the stop string.

``continuation_logprobs`` scores given continuations of given contexts in packed,
padding-free batches with the same tokenization the learners use.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from safer_dist.erpo.pairs import append_continuations, packed_length
from safer_dist.train.attention import tree_packing_unsupported
from safer_dist.train.losses import sequence_logprobs


class _StopOnStrings(StoppingCriteria):
    """Per-row stop when the generated text contains any stop string."""

    def __init__(self, tokenizer, stops: list[str], start: int, lookback: int = 16):
        self.tokenizer, self.stops, self.start, self.lookback = tokenizer, stops, start, lookback

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.lookback) :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    return ids, mask


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Text up to and including the first stop string, and whether one was found."""
    best = None
    for s in stops or ():
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return (text, False) if best is None else (text[:best], True)


@torch.no_grad()
def sample_candidates(
    model, tokenizer, prefixes: list[list[int]], n: int, *, max_new_tokens: int,
    stop_strings: list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
    seed: int = 0, batch_rows: int = 64, reuse_prefix: bool = True,
) -> list[list[dict]]:
    """``n`` sampled continuations of each prefix (token ids, already chat-formatted).

    Returns, per prefix, ``n`` dicts ``{text, num_tokens, stopped}``: ``text`` is cut after the
    first stop string; ``stopped`` says whether a stop string or EOS ended it (False: the
    token limit did). ``reuse_prefix=False`` re-encodes the prefix per row (the peer method).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    per_batch = max(1, batch_rows // n)
    out: list[list[dict]] = []
    torch.manual_seed(seed)
    sample = temperature > 0
    for start in range(0, len(prefixes), per_batch):
        chunk = prefixes[start : start + per_batch]
        ids, mask = _left_pad(chunk, pad)
        ids, mask = ids.to(device), mask.to(device)
        width = ids.shape[1]
        kwargs = {}
        if reuse_prefix and width > 1:
            # One prefill of all but the last prefix token; generate() feeds the last token.
            # Positions must count real tokens only (as generate() does for the rest), or
            # left-padded rows see their prefix at shifted distances.
            pos = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
            pre = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos, use_cache=True)
            cache = pre.past_key_values
            cache.batch_repeat_interleave(n)
            kwargs["past_key_values"] = cache
        ids = ids.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        stopping = StoppingCriteriaList([_StopOnStrings(tokenizer, stop_strings, width)]) if stop_strings else None
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            eos_token_id=eos, pad_token_id=pad, stopping_criteria=stopping, use_cache=True, **kwargs,
        )
        new = gen[:, width:].tolist()
        for p in range(len(chunk)):
            cands = []
            for row in new[p * n : (p + 1) * n]:
                hit_eos = eos in row
                if hit_eos:
                    row = row[: row.index(eos)]
                text, hit_stop = cut_at_stop(tokenizer.decode(row, skip_special_tokens=False), stop_strings)
                text = _strip_pad(text, tokenizer)
                # Rows that stopped early are padded to the batch's length: count the kept text.
                num = len(tokenizer.encode(text, add_special_tokens=False)) + (1 if hit_eos else 0)
                cands.append({"text": text, "num_tokens": num, "stopped": hit_eos or hit_stop})
            out.append(cands)
    return out


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
