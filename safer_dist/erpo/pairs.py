"""Step-level preference pairs as training data: tokenizing and packing them.

Which candidates form a pair is decided by :class:`safer_dist.erpo.ranking.Ranking`.

Tokenization of a pair, shared by rollout workers (reference log-probs) and learners::

    context  = chat-formatted prompt + response prefix     (no loss; prompt: a string or messages)
    step     = the step's text (+ EOS for the answer step)  (the DPO loss counts these)

Packed, a pair is either two sequences (context + chosen, context + rejected) or, with
``share_prefix``, one tree whose context is encoded once (:func:`append_continuations`,
:mod:`safer_dist.train.tree_attention`).
"""

from __future__ import annotations

import hashlib
import json

import torch

from safer_dist.data.chat import Prompt
from safer_dist.train.losses import IGNORE_INDEX
from safer_dist.train.sft_data import encode_context


def step_sequence(tokenizer, prompt: Prompt, prefix_text: str, step_text: str, ends_with_eos: bool) -> tuple[list[int], list[int]]:
    """(context ids, step ids) for a step given the prompt and the response prefix."""
    return encode_context(tokenizer, prompt, prefix_text), step_ids(tokenizer, step_text, ends_with_eos)


def step_ids(tokenizer, step_text: str, ends_with_eos: bool) -> list[int]:
    """A step's token ids (the ones the DPO loss counts), + EOS for the answer step."""
    step = tokenizer.encode(step_text, add_special_tokens=False)
    return step + [tokenizer.eos_token_id] if ends_with_eos else step


# What makes a pair the pair it is: its place in an epoch is decided by these and nothing else.
PAIR_IDENTITY = ("prompt_id", "prompt", "step", "prefix", "chosen_text", "rejected_text")


def pair_digest(pair: dict) -> bytes:
    """A digest of a pair's identity (:data:`PAIR_IDENTITY`; fields it lacks count as ``None``)."""
    return hashlib.blake2b(json.dumps([pair.get(k) for k in PAIR_IDENTITY]).encode(), digest_size=16).digest()


class PairData:
    """Pairs of one ERPO iteration as packed micro-batches, in a step-derived order.

    Within an epoch, pairs are ordered by a hash of (seed, epoch, the pair's identity, which
    repeat it is), not by a shuffle of their indices: adding, removing or changing one pair
    leaves every other pair's order relative to the rest as it was, so a run whose candidates
    differ in one place trains on nearly the same batches (docs/erpo.md "Sensitivity").

    ``pairs`` are pair records (see :mod:`safer_dist.erpo.controller`) with ``prompt``, ``prefix``, ``step``,
    ``chosen_text``, ``rejected_text``, ``ref_chosen``, ``ref_rejected``. A pair whose ``why``
    is ``"safety"`` appears ``safety_repeats`` times per epoch. ``share_prefix``: pack each pair's
    context once (:func:`pack_pairs`); only for a model whose attention takes trees.

    Each pair is tokenized once, on first use (:meth:`tokenize_all` does them all; the learner
    calls it when it loads the pairs, so training steps only pack), a repeated safety pair once
    for all its repeats.
    """

    def __init__(self, pairs: list[dict], tokenizer, *, seed: int, safety_repeats: int = 1, share_prefix: bool = False):
        if not pairs:
            raise ValueError("no preference pairs to train on")
        expanded = [(j, r, p) for j, p in enumerate(pairs) for r in range(safety_repeats if p.get("why") == "safety" else 1)]
        self.pairs = [p for _, _, p in expanded]
        self.tokenizer, self.seed, self.share_prefix = tokenizer, seed, share_prefix
        self._source = [j for j, _, _ in expanded]  # the given pair each (repeated) pair is
        digests = [pair_digest(p) for p in pairs]
        self._identity = [digests[j] + r.to_bytes(4, "little") for j, r, _ in expanded]
        self._encoded: list[dict | None] = [None] * len(pairs)
        self._perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            salt = f"pairs-{self.seed}-{epoch}\0".encode()
            keys = [hashlib.blake2b(salt + ident, digest_size=16).digest() for ident in self._identity]
            self._perm = (epoch, sorted(range(len(self)), key=lambda i: (keys[i], i)))
        return self._perm[1]

    def global_batch(self, step: int, batch_size: int) -> list[int]:
        n = len(self)
        return [self._order(pos // n)[pos % n] for pos in range(step * batch_size, (step + 1) * batch_size)]

    def encode(self, index: int) -> dict:
        """Pair ``index`` tokenized: ``ctx``, ``chosen``, ``rejected`` ids and the reference log-probs
        (the same dict on every call: treat it as read-only)."""
        j = self._source[index]
        if self._encoded[j] is None:
            r = self.pairs[index]
            eos = r["step"] == "answer"
            self._encoded[j] = {
                "ctx": encode_context(self.tokenizer, r["prompt"], r["prefix"]),
                "chosen": step_ids(self.tokenizer, r["chosen_text"], eos),
                "rejected": step_ids(self.tokenizer, r["rejected_text"], eos),
                "ref_chosen": r["ref_chosen"], "ref_rejected": r["ref_rejected"],
            }
        return self._encoded[j]

    def tokenize_all(self) -> "PairData":
        """Tokenize every pair now (each once), so that :meth:`micro_batches` only packs."""
        for i in range(len(self)):
            self.encode(i)
        return self

    def micro_batches(self, step: int, *, global_batch_size: int, rank: int, world_size: int, micro_batch_size: int) -> list[dict]:
        """This rank's micro-batches of step ``step`` (:func:`pack_pairs`: per pair, the chosen
        step is sequence 2i, the rejected one 2i+1)."""
        items = self.global_batch(step, global_batch_size)
        per_rank = global_batch_size // world_size
        shard = items[rank * per_rank : (rank + 1) * per_rank]
        return [
            pack_pairs([self.encode(i) for i in shard[s : s + micro_batch_size]], share_prefix=self.share_prefix)
            for s in range(0, len(shard), micro_batch_size)
        ]


def append_continuations(
    cols: dict[str, list[int]], ctx: list[int], continuations: list[list[int]], seq_ids: list[int], *, share_prefix: bool,
) -> None:
    """Append a context and its continuations to the packed columns ``cols`` (``input_ids``,
    ``position_ids``, ``labels``, ``seq_ids``); continuation ``j`` is labelled and gets sequence
    ``seq_ids[j]``, the context is unlabelled (in the first continuation's sequence).

    ``share_prefix=False``: one sequence ``context + continuation`` each. ``True``: a tree
    (:mod:`safer_dist.train.tree_attention`) — ``context + continuations[0]``, then per further
    continuation the context's last token again at position ``C - 1`` followed by it, positions
    continuing from ``C``. Only for a model whose attention takes trees
    (:func:`safer_dist.train.attention.tree_packing_unsupported`).
    """
    for j, cont in enumerate(continuations):
        if j == 0 or not share_prefix or not ctx:
            head, start = ctx, 0
        else:
            head, start = ctx[-1:], len(ctx) - 1
        cols["input_ids"] += head + cont
        cols["position_ids"] += range(start, start + len(head) + len(cont))
        cols["labels"] += [IGNORE_INDEX] * len(head) + cont
        cols["seq_ids"] += [seq_ids[j]] * (len(head) + len(cont))


def packed_length(ctx_len: int, continuation_lens: list[int], *, share_prefix: bool) -> int:
    """Tokens :func:`append_continuations` appends for a context of ``ctx_len`` tokens."""
    if share_prefix and ctx_len:
        return ctx_len + sum(continuation_lens) + len(continuation_lens) - 1
    return ctx_len * len(continuation_lens) + sum(continuation_lens)


def pack_pairs(encoded: list[dict], *, share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """One padding-free micro-batch of encoded pairs (:meth:`PairData.encode`): pair ``i``'s
    chosen step is sequence ``2i``, its rejected step ``2i + 1``; ``share_prefix`` packs each
    pair's context once (:func:`append_continuations`).

    Returns ``input_ids``, ``position_ids``, ``labels``, ``seq_ids`` ``[1, T]``; ``ref_chosen``,
    ``ref_rejected`` ``[P]`` float64; ``chosen_len``, ``rejected_len`` ``[P]``; ``num_pairs``;
    ``num_pair_tokens`` (context + chosen plus context + rejected over the pairs, the tokens of
    the unshared packing, whatever ``share_prefix``).
    """
    cols: dict[str, list[int]] = {"input_ids": [], "position_ids": [], "labels": [], "seq_ids": []}
    for i, e in enumerate(encoded):
        append_continuations(cols, e["ctx"], [e["chosen"], e["rejected"]], [2 * i, 2 * i + 1], share_prefix=share_prefix)
    row = lambda xs, dtype=torch.long: torch.tensor([xs], dtype=dtype)  # noqa: E731
    return {
        **{name: row(xs) for name, xs in cols.items()},
        "ref_chosen": torch.tensor([e["ref_chosen"] for e in encoded], dtype=torch.float64),
        "ref_rejected": torch.tensor([e["ref_rejected"] for e in encoded], dtype=torch.float64),
        "chosen_len": torch.tensor([len(e["chosen"]) for e in encoded]),
        "rejected_len": torch.tensor([len(e["rejected"]) for e in encoded]),
        "num_pairs": torch.tensor(len(encoded)),
        "num_pair_tokens": torch.tensor(sum(2 * len(e["ctx"]) + len(e["chosen"]) + len(e["rejected"]) for e in encoded)),
    }
