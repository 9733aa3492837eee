"""Risk-category assignment for prompts that carry no ``category`` label.

Both classifiers return, per prompt, ``(category, source)``: a rulebook category id or
``"none"``, and ``"keyword"`` / ``"model"`` / ``"keyword_fallback"``.

- :class:`KeywordClassifier` — a baseline built from the rulebook alone: the content words
  of each category's name, description and rule texts (lower-cased, crude suffix stripping,
  instruction words such as "help" or "provide" dropped), weighted by inverse category
  frequency. A prompt goes to the category with the highest summed weight of the stems it
  shares with it, or ``none`` when it shares none. It cannot tell a benign look-alike
  ("kill a Python process") from a harmful request: it names the category a prompt
  *touches*, which is what the teacher prompt needs (the teacher then decides the verdict).
- :class:`ModelClassifier` — asks a model (any teacher backend: a local model on Ray workers
  or an endpoint) with ``configs/synth/classify_prompt.txt`` and takes the first category id
  or ``none`` in its reply; an unusable reply falls back to the keyword baseline.
"""

from __future__ import annotations

import math
import re

_WORD = re.compile(r"[a-z]+")
_STOP = frozenset("""
able about across against also another anyone anything being carry cause causes content create deliberately
does doing done either every from give giving have help helping including information into like make making
many means more most other others over people person provide providing request requests someone something
specific such than that their them there these they thing things this those through toward towards under
using ways what when where which while with without would your were never because write improve real good
work pass tips plan aimed involving state direct
""".split())
_SUFFIXES = ("ations", "ation", "ings", "ing", "ions", "ion", "ers", "er", "ies", "es", "ed", "ly", "al", "s")


def stem(word: str) -> str:
    """A crude stem: strip one common suffix when at least 4 letters remain."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def stems(text: str) -> set[str]:
    return {stem(w) for w in _WORD.findall(text.lower()) if len(w) >= 4 and w not in _STOP}


class KeywordClassifier:
    def __init__(self, rulebook):
        self.vocab: dict[str, set[str]] = {}
        for c in rulebook.categories:
            text = " ".join([c.name.replace("_", " "), c.description, *(r.text for r in c.rules)])
            self.vocab[c.id] = stems(text)
        df: dict[str, int] = {}
        for words in self.vocab.values():
            for w in words:
                df[w] = df.get(w, 0) + 1
        n = len(self.vocab)
        self.weight = {w: math.log(1 + n / d) for w, d in df.items()}

    def scores(self, prompt: str) -> dict[str, float]:
        words = stems(prompt)
        return {cid: sum(self.weight[w] for w in words & vocab) for cid, vocab in self.vocab.items()}

    def predict(self, prompt: str) -> str:
        scores = self.scores(prompt)
        best = max(scores, key=lambda cid: (scores[cid], -list(scores).index(cid)), default=None)
        return best if best is not None and scores[best] > 0 else "none"

    def classify(self, prompts: list[str]) -> list[tuple[str, str]]:
        return [(self.predict(p), "keyword") for p in prompts]


_ID = re.compile(r"\b(C\d\d|none)\b", re.IGNORECASE)


class ModelClassifier:
    def __init__(self, teacher, template: str, rulebook, *, max_new_tokens: int = 16):
        self.teacher, self.template, self.max_new_tokens = teacher, template, max_new_tokens
        self.known = set(rulebook.category_ids)
        self.categories = "\n".join(f"{c.id} {c.name}: {c.description}" for c in rulebook.categories)
        self.fallback = KeywordClassifier(rulebook)

    def parse(self, reply: str | None) -> str | None:
        for m in _ID.finditer(reply or ""):
            token = m.group(1)
            if token.lower() == "none":
                return "none"
            if token.upper() in self.known:
                return token.upper()
        return None

    def classify(self, prompts: list[str]) -> list[tuple[str, str]]:
        asks = [self.template.format(prompt=p, categories=self.categories) for p in prompts]
        outs = self.teacher.generate(asks, max_new_tokens=self.max_new_tokens, temperature=0.0)
        result = []
        for p, out in zip(prompts, outs, strict=True):
            cid = self.parse(out.text)
            result.append((cid, "model") if cid is not None else (self.fallback.predict(p), "keyword_fallback"))
        return result
