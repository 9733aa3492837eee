"""Ranking a prefix's candidate steps and choosing its preference pair (the ``erpo.ranking`` section).

For each prefix the best and the worst candidate form a pair if they differ enough
(docs/design.md §4):

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

Length control: iteration t ranks with the step token budget times ``budget_decay**t`` and
the efficiency weight times ``efficiency_growth**t`` (:meth:`Ranking.at_iteration`).

This module is pure Python (no torch), so the config tree can use :class:`Ranking` as its
``erpo.ranking`` section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Ranking:
    scoring: str = "lexicographic"  # lexicographic | weighted
    margin: float = 0.25
    min_length_gap: int = 4
    # No pair prefers an unacceptable response: utility and length pairs need a chosen response
    # with safety >= min_chosen_safety; length pairs also need utility >= min_efficiency_utility.
    min_chosen_safety: float = 0.5
    min_efficiency_utility: float = 0.5
    w_safety: float = 1.0
    w_utility: float = 1.0
    w_efficiency: float = 0.1
    # Length control: each iteration multiplies the step token budget by budget_decay and
    # the efficiency weight by efficiency_growth. A budget of 0 means none.
    step_token_budget: float = 0.0
    budget_decay: float = 0.85
    efficiency_growth: float = 1.5

    def at_iteration(self, iteration: int) -> Ranking:
        """The ranking iteration ``iteration`` uses: budget and efficiency weight scaled."""
        return dataclasses.replace(
            self,
            step_token_budget=self.step_token_budget * self.budget_decay**iteration if self.step_token_budget else 0.0,
            w_efficiency=self.w_efficiency * self.efficiency_growth**iteration,
        )

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

    def validate(self, key: str) -> list[str]:
        """Messages for bad values ('' when fine); ``key`` is this section's dotted name."""
        bad = []
        if self.scoring not in ("lexicographic", "weighted"):
            bad.append(f"{key}.scoring must be one of lexicographic, weighted (got {self.scoring!r})")
        for name in ("min_chosen_safety", "min_efficiency_utility"):
            if not 0 <= getattr(self, name) <= 1:
                bad.append(f"{key}.{name} must be in [0, 1]")
        if self.margin < 0 or self.min_length_gap < 0 or self.step_token_budget < 0:
            bad.append(f"{key}.margin, {key}.min_length_gap and {key}.step_token_budget must be >= 0")
        return bad


def _ok(c: dict) -> bool:
    """A candidate whose response is a valid trace and whose step ended by itself."""
    return c.get("valid", True) and c.get("stopped", True)
