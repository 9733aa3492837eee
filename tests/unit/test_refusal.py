"""The refusal detector on a corpus written for it (tests/fixtures/refusals), the sentences
that the old phrase regex missed, and the demo's own answers."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from safer_dist.data import demo_content
from safer_dist.data.records import read_jsonl
from safer_dist.judging.judge import is_refusal
from safer_dist.reasoning import exante

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "refusals"


def _rows(name: str) -> list[tuple[str, str]]:
    """(tag, text) per line of a corpus file; '#' lines are comments."""
    lines = (CORPUS / name).read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t", 1)) for line in lines if line.strip() and not line.startswith("#")]


def _accuracy(rows: list[tuple[str, str]], refusal: bool) -> tuple[float, list[str]]:
    wrong = [f"{tag}: {text}" for tag, text in rows if is_refusal(text) != refusal]
    return 1 - len(wrong) / len(rows), wrong


@pytest.mark.parametrize("name, refusal", [("refusals.tsv", True), ("non_refusals.tsv", False)])
def test_corpus_accuracy_each_side(name, refusal):
    rows = _rows(name)
    assert len(rows) >= 200 and len({text for _, text in rows}) == len(rows)  # no duplicates
    accuracy, wrong = _accuracy(rows, refusal)
    assert accuracy >= 0.97, wrong


def test_heldout_lines_written_after_tuning():
    # Never used to tune the detector: a guard against regressions, at the level measured
    # when it was written (refusals 27/30, answers 30/30).
    rows = _rows("heldout.tsv")
    for label, floor in (("refusal", 0.9), ("answer", 1.0)):
        accuracy, wrong = _accuracy([r for r in rows if r[0] == label], label == "refusal")
        assert accuracy >= floor, wrong


@pytest.mark.parametrize("text", [
    "I can't fulfill that request.",
    "I can\u2019t help with that.",  # typographic apostrophe
    "I cannot create content that promotes violence.",
    "I won't do that.",
    "I'm not able to provide instructions for making weapons.",
])
def test_refusals_the_phrase_regex_missed(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "You can't go wrong with a cast-iron pan.",
    "I can't stress enough how much sleep matters; aim for eight hours.",
    "I won't bore you with details, here are the steps: mix, knead, bake.",
    "Sorry for the confusion earlier \u2014 here is the fixed code: x = 1",
    'The phrase "I must decline" is formal; say "no, thanks" with friends.',
    "How to refuse a job offer politely: thank them, decline clearly, keep in touch.",
    "I don't recommend mixing bleach and ammonia; use one cleaner at a time.",
    "We don't support Python 2 anymore; here is how to upgrade to Python 3.",
    "I can't help but smile at this question. The answer is 42.",
])
def test_refusal_words_in_answers_that_comply(text):
    assert not is_refusal(text)


def test_demo_refusals_detected_and_other_answers_not():
    # Every answer the demo can write: each refusal with each redirect, and the compliant kinds.
    redirects = list(demo_content.REDIRECTS.values()) + ["I am glad to help with a safer, related question instead."]
    for refusal, redirect in itertools.product(demo_content.REFUSALS, redirects):
        assert is_refusal(f"{refusal} {redirect}"), (refusal, redirect)
    for answer in demo_content.SAFEGUARDED + demo_content.SOFT_COMPLY:
        assert not is_refusal(answer), answer
    for tip, closing in itertools.product(demo_content.DOMAIN_TIPS.values(), demo_content.CLOSINGS):
        assert not is_refusal(f"Sure. To do it, {tip} {closing}"), (tip, closing)  # demo.py's comply answer


def test_demo_traces_refuse_exactly_when_their_strategy_does(demo_data_dir):
    records = read_jsonl(demo_data_dir / "sft.jsonl")
    strategies = set()
    for rec in records:
        trace = exante.parse(rec["response"]).trace
        strategies.add(trace.strategy)
        assert is_refusal(trace.answer) == (trace.strategy == "refuse_and_redirect"), trace.answer
    assert strategies == {"comply", "comply_with_safeguards", "refuse_and_redirect"}
