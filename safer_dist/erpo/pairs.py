"""Step-level preference pairs: ranking candidates, building pairs, and packing them.

A *candidate* is one sampled step for a prefix (prompt + the steps before it), with the
judge's scores of the full response it led to. For each prefix the best and the worst
candidate form a pair if they differ enough (docs/design.md §4):

- ``lexicographic``: by safety, then utility, then efficiency. A pair needs a safety or a
  utility gap of at least ``margin``; when both tie, a length gap of at least
  ``min_length_gap`` tokens (the shorter step wins) between two *valid* responses that
  stopped by themselves. Candidates longer than the step token budget rank below every
  candidate within it on the efficiency tier.

  A pair never holds up an unacceptable response as the better one: a utility pair needs a
  chosen response with safety ≥ ``min_chosen_safety``, and a length pair needs responses
  with safety ≥ ``min_chosen_safety`` and utility ≥ ``min_efficiency_utility``. Without this,
  two unsafe (or two over-refusing) candidates of different lengths make a length pair whose
  chosen side — pushed up by DPO and by the NLL term — teaches the unsafe decision.
- ``weighted``: ``w_safety*safety + w_utility*utility + w_efficiency*efficiency`` where
  efficiency is minus the step's tokens over 100; a pair needs a gap of at least ``margin``.

Tokenization of a pair, shared by rollout workers (reference log-probs) and learners::

    context  = chat-formatted prompt + response prefix     (no loss)
    step     = the step's text (+ EOS for the answer step)  (the DPO loss counts these)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from safer_dist.train.losses import IGNORE_INDEX


def step_sequence(tokenizer, prompt: str, prefix_text: str, step_text: str, ends_with_eos: bool) -> tuple[list[int], list[int]]:
    """(context ids, step ids) for a step given the prompt and the response prefix."""
    from safer_dist.train.sft_data import encode_prompt

    ctx = encode_prompt(tokenizer, prompt)
    if prefix_text:
        ctx = ctx + tokenizer.encode(prefix_text, add_special_tokens=False)
    step = tokenizer.encode(step_text, add_special_tokens=False)
    if ends_with_eos:
        step = step + [tokenizer.eos_token_id]
    return ctx, step


@dataclass
class Ranking:
    scoring: str = "lexicographic"
    margin: float = 0.25
    min_length_gap: int = 4
    step_token_budget: float = 0.0  # 0: none
    w_safety: float = 1.0
    w_utility: float = 1.0
    w_efficiency: float = 0.1
    min_chosen_safety: float = 0.5
    min_efficiency_utility: float = 0.5

    def key(self, c: dict) -> tuple:
        over = max(0.0, c["num_tokens"] - self.step_token_budget) if self.step_token_budget else 0.0
        if self.scoring == "weighted":
            return (self.weighted(c),)
        return (c["safety"], c["utility"], -over, -c["num_tokens"])

    def weighted(self, c: dict) -> float:
        over = max(0.0, c["num_tokens"] - self.step_token_budget) if self.step_token_budget else 0.0
        efficiency = -(c["num_tokens"] + over) / 100.0
        return self.w_safety * c["safety"] + self.w_utility * c["utility"] + self.w_efficiency * efficiency

    def pair(self, candidates: list[dict]) -> tuple[int, int, str] | None:
        """(chosen index, rejected index, why) for the best and worst candidate, or None."""
        if len(candidates) < 2:
            return None
        order = sorted(range(len(candidates)), key=lambda i: self.key(candidates[i]), reverse=True)
        best, worst = order[0], order[-1]
        b, w = candidates[best], candidates[worst]
        if self.scoring == "weighted":
            gap = self.weighted(b) - self.weighted(w)
            ok = gap >= self.margin and _ok(b) and b["safety"] >= self.min_chosen_safety
            return (best, worst, f"weighted +{gap:.3f}") if ok else None
        if b["safety"] - w["safety"] >= self.margin:
            return best, worst, "safety"
        if abs(b["safety"] - w["safety"]) < 1e-9 and b["safety"] >= self.min_chosen_safety:
            if b["utility"] - w["utility"] >= self.margin:
                return best, worst, "utility"
            tie = abs(b["utility"] - w["utility"]) < 1e-9
            if tie and b["utility"] >= self.min_efficiency_utility and _ok(b) and _ok(w):
                over_b, over_w = self.key(b)[2], self.key(w)[2]
                if over_b > over_w or w["num_tokens"] - b["num_tokens"] >= self.min_length_gap:
                    return best, worst, "efficiency"
        return None


def _ok(c: dict) -> bool:
    """A candidate whose response is a valid trace and whose step ended by itself."""
    return c.get("valid", True) and c.get("stopped", True)


class PairData:
    """Pairs of one ERPO iteration as packed micro-batches, in a step-derived order.

    ``pairs`` are pair records (see erpo.py) with ``prompt``, ``prefix``, ``step``,
    ``chosen_text``, ``rejected_text``, ``ref_chosen``, ``ref_rejected``. A pair whose ``why``
    is ``"safety"`` appears ``safety_repeats`` times per epoch.
    """

    def __init__(self, pairs: list[dict], tokenizer, *, seed: int, safety_repeats: int = 1):
        if not pairs:
            raise ValueError("no preference pairs to train on")
        pairs = [p for p in pairs for _ in range(safety_repeats if p.get("why") == "safety" else 1)]
        self.pairs, self.tokenizer, self.seed = pairs, tokenizer, seed
        self._perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(len(self)))
            random.Random(f"pairs-{self.seed}-{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1]

    def global_batch(self, step: int, batch_size: int) -> list[int]:
        n = len(self)
        return [self._order(pos // n)[pos % n] for pos in range(step * batch_size, (step + 1) * batch_size)]

    def encode(self, index: int) -> dict:
        r = self.pairs[index]
        eos = r["step"] == "answer"
        ctx, chosen = step_sequence(self.tokenizer, r["prompt"], r["prefix"], r["chosen_text"], eos)
        _, rejected = step_sequence(self.tokenizer, r["prompt"], r["prefix"], r["rejected_text"], eos)
        return {"ctx": ctx, "chosen": chosen, "rejected": rejected, "ref_chosen": r["ref_chosen"], "ref_rejected": r["ref_rejected"]}

    def micro_batches(self, step: int, *, global_batch_size: int, rank: int, world_size: int, micro_batch_size: int) -> list[dict]:
        """This rank's micro-batches of step ``step``: each packs, per pair, the sequence
        context+chosen then context+rejected (sequence 2i and 2i+1)."""
        items = self.global_batch(step, global_batch_size)
        per_rank = global_batch_size // world_size
        shard = items[rank * per_rank : (rank + 1) * per_rank]
        return [pack_pairs([self.encode(i) for i in shard[s : s + micro_batch_size]]) for s in range(0, len(shard), micro_batch_size)]


def pack_pairs(encoded: list[dict]) -> dict[str, torch.Tensor]:
    ids, pos, labels, seq = [], [], [], []
    for i, e in enumerate(encoded):
        for j, step in enumerate((e["chosen"], e["rejected"])):
            full = e["ctx"] + step
            ids += full
            pos += range(len(full))
            labels += [IGNORE_INDEX] * len(e["ctx"]) + step
            seq += [2 * i + j] * len(full)
    row = lambda xs, dtype=torch.long: torch.tensor([xs], dtype=dtype)  # noqa: E731
    return {
        "input_ids": row(ids), "position_ids": row(pos), "labels": row(labels), "seq_ids": row(seq),
        "ref_chosen": torch.tensor([e["ref_chosen"] for e in encoded], dtype=torch.float64),
        "ref_rejected": torch.tensor([e["ref_rejected"] for e in encoded], dtype=torch.float64),
        "chosen_len": torch.tensor([len(e["chosen"]) for e in encoded]),
        "rejected_len": torch.tensor([len(e["rejected"]) for e in encoded]),
        "num_pairs": torch.tensor(len(encoded)),
    }
