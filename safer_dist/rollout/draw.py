"""How one row of candidate sampling picks its next token and when it stops.

Every row draws from its own ``random.Random`` (:func:`row_rng`), seeded from (seed, the
prefix's token ids, continuation index), by inverse-CDF sampling over its probabilities
(:func:`draw`), so a row's sample depends on its prefix and that seed only: not on where the
prefix sits in a call, which other prefixes share the call, or how a caller split its prefixes
over calls (rollout workers). :class:`StopCheck` says whether a
row's text has just completed a stop string. The decode loop (``safer_dist.rollout.decode``)
calls both once per step for the rows in flight.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Draws for one row: a stream of its own, from a string seed (Python hashes str seeds with
# SHA-512, so the stream is the same on every platform and run).
RowRng = random.Random


@dataclass(frozen=True)
class Reseed:
    """A sampling seed under which a fixed ``fraction`` of the rows draw from seed ``other``
    instead: the rows are picked by a hash of (``seed``, prefix, continuation index), so the
    same rows are picked wherever they are sampled. For sensitivity checks (``erpo.resample``):
    how much a result moves when 1% of the candidates are drawn again."""

    seed: int
    fraction: float
    other: int

    def for_row(self, digest: str, cand: int) -> int:
        """The seed row (prefix ``digest``, ``cand``) draws from."""
        h = hashlib.blake2b(f"safer-resample-{self.seed}-{digest}-{cand}".encode(), digest_size=8).digest()
        return self.other if int.from_bytes(h, "big") < self.fraction * 2**64 else self.seed


# What the samplers take as ``seed``.
Seed = int | Reseed


def row_rng(seed: Seed, prefix: Sequence[int], cand: int) -> RowRng:
    """The stream of continuation ``cand`` of the prefix with token ids ``prefix``."""
    digest = hashlib.blake2b(",".join(map(str, prefix)).encode(), digest_size=16).hexdigest()
    if isinstance(seed, Reseed):
        seed = seed.for_row(digest, cand)
    return random.Random(f"safer-sample-{seed}-{digest}-{cand}")


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
