"""Step-level preference pairs as training data: tokenizing and packing them.

Which candidates form a pair is decided by :class:`safer_dist.erpo.ranking.Ranking`.

Tokenization of a pair, shared by rollout workers (reference log-probs) and learners::

    context  = chat-formatted prompt + response prefix     (no loss; prompt: a string or messages)
    step     = the step's text (+ EOS for the answer step)  (the DPO loss counts these)
"""

from __future__ import annotations

import random

import torch

from safer_dist.data.chat import Prompt
from safer_dist.train.losses import IGNORE_INDEX
from safer_dist.train.sft_data import encode_context


def step_sequence(tokenizer, prompt: Prompt, prefix_text: str, step_text: str, ends_with_eos: bool) -> tuple[list[int], list[int]]:
    """(context ids, step ids) for a step given the prompt and the response prefix."""
    ctx = encode_context(tokenizer, prompt, prefix_text)
    step = tokenizer.encode(step_text, add_special_tokens=False)
    if ends_with_eos:
        step = step + [tokenizer.eos_token_id]
    return ctx, step


class PairData:
    """Pairs of one ERPO iteration as packed micro-batches, in a step-derived order.

    ``pairs`` are pair records (see :mod:`safer_dist.erpo.controller`) with ``prompt``, ``prefix``, ``step``,
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
