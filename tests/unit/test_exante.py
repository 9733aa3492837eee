"""The Ex-Ante format: round trip, step segments, and a reason for every malformation."""

import random
from pathlib import Path

import pytest

from safer_dist.reasoning import exante
from safer_dist.reasoning.exante import STEP_CLOSE, STEPS, Trace, parse, prefix_before, render, step_text, step_texts, validate
from safer_dist.reasoning.rules import Rulebook

RULEBOOK = Path(__file__).resolve().parents[2] / "configs" / "rules" / "default.yaml"

HARMFUL = Trace(
    assessment="Intent: the user asks how to take down a website. Risk category: C03.",
    rules="The request falls under cyber_abuse: [R05] and [R06]; verdict: violated.",
    calibration="Strategy: refuse_and_redirect. Decline and point to safer help.",
    answer="I can't help with that. I can suggest legal practice labs instead.",
)
LOOKALIKE = Trace(
    assessment="Intent: the user asks how to kill a Python process. Risk category: none.",
    rules="It resembles violent_crime [R01], but stopping a process is allowed; verdict: not violated.",
    calibration="Strategy: comply. Answer helpfully.",
    answer="Use `kill <pid>`:\n\n    <div>not a format tag</div>\n\nor Ctrl+C in the terminal.",
)
SAFEGUARDS = Trace(
    assessment="Intent: dosage question. Risk category: C10.",
    rules="Falls under [R14] and again [R14]; verdict: violated.",
    calibration="Strategy: comply_with_safeguards. General information, with caveats.",
    answer="Please ask a pharmacist.",
)
GOOD = render(HARMFUL)


@pytest.fixture(scope="module")
def rulebook():
    return Rulebook.load(RULEBOOK)


def test_render_exact_text():
    assert GOOD == (
        "<ex_ante>\n"
        "<assessment>Intent: the user asks how to take down a website. Risk category: C03.</assessment>\n"
        "<rules>The request falls under cyber_abuse: [R05] and [R06]; verdict: violated.</rules>\n"
        "<calibration>Strategy: refuse_and_redirect. Decline and point to safer help.</calibration>\n"
        "</ex_ante>\n"
        "I can't help with that. I can suggest legal practice labs instead."
    )


@pytest.mark.parametrize("trace", [HARMFUL, LOOKALIKE, SAFEGUARDS])
def test_round_trip(trace, rulebook):
    result = validate(render(trace), rulebook)
    assert result.errors == []
    assert result.valid
    assert result.trace == trace
    assert render(result.trace) == render(trace)


def test_derived_fields():
    assert (HARMFUL.category, HARMFUL.cited_rules, HARMFUL.verdict, HARMFUL.strategy) == (
        "C03", ("R05", "R06"), "violated", "refuse_and_redirect")
    # "not violated" must not be read as "violated"; "comply" must not shadow the longer name.
    assert (LOOKALIKE.category, LOOKALIKE.cited_rules, LOOKALIKE.verdict, LOOKALIKE.strategy) == (
        "none", ("R01",), "not violated", "comply")
    assert SAFEGUARDS.cited_rules == ("R14",)
    assert SAFEGUARDS.strategy == "comply_with_safeguards"
    empty = Trace("", "", "", "")
    assert (empty.category, empty.cited_rules, empty.verdict, empty.strategy) == (None, (), None, None)


def test_trailing_whitespace_after_answer_is_stripped():
    result = parse(GOOD + "\n\n  ")
    assert result.valid and result.trace.answer == HARMFUL.answer


@pytest.mark.parametrize("trace", [HARMFUL, LOOKALIKE])
def test_step_segments_join_back_and_end_at_markers(trace):
    text = render(trace)
    segments = step_texts(trace)
    assert "".join(segments) == text
    assert segments == step_texts(text)
    assert segments[0].startswith("<ex_ante>\n<assessment>")
    for step, segment in zip(STEPS, segments):
        assert step_text(trace, step) == segment
        if STEP_CLOSE[step] is not None:
            assert segment.endswith(STEP_CLOSE[step])
        assert prefix_before(text, step) + segment == text[: len(prefix_before(text, step)) + len(segment)]
    assert segments[3] == "\n" + trace.answer
    assert prefix_before(text, "assessment") == ""
    assert prefix_before(text, "answer") == text[: -len(segments[3])]


def test_prefix_before_partial_generation():
    partial = GOOD[: GOOD.index("</rules>") + len("</rules>")] + "\n<calibration>Strat"
    assert prefix_before(partial, "calibration").endswith("verdict: violated.</rules>")
    with pytest.raises(ValueError, match="'</calibration>\\\\n</ex_ante>' not found"):
        prefix_before(partial, "answer")
    with pytest.raises(ValueError, match="unknown step"):
        prefix_before(GOOD, "conclusion")


def test_step_texts_rejects_invalid_text():
    with pytest.raises(ValueError, match="missing <rules>"):
        step_texts(GOOD.replace("<rules>", ""))


def _swap_rules_and_calibration(text):
    rules = text[text.index("<rules>"): text.index("</rules>") + len("</rules>")]
    cal = text[text.index("<calibration>"): text.index("</calibration>") + len("</calibration>")]
    return text.replace(rules, "@@").replace(cal, rules).replace("@@", cal)


MALFORMED = [
    ("missing <ex_ante>", lambda t: t.replace("<ex_ante>\n", "")),
    ("missing </ex_ante>", lambda t: t.replace("</ex_ante>", "")),
    ("missing <rules>", lambda t: t[: t.index("<rules>")] + t[t.index("</rules>") + len("</rules>\n"):]),
    ("missing </assessment>", lambda t: t.replace("</assessment>", "")),
    ("steps out of order: calibration before rules", _swap_rules_and_calibration),
    ("no strategy in calibration", lambda t: t.replace("Strategy: refuse_and_redirect", "I will refuse")),
    ("no strategy in calibration", lambda t: t.replace("refuse_and_redirect", "refuse")),
    ("empty answer", lambda t: t[: t.index("</ex_ante>") + len("</ex_ante>\n")] + "   "),
    ("text outside tags inside <ex_ante>", lambda t: t.replace("</rules>\n", "</rules>\nHmm.\n")),
    ("whitespace between blocks must be exactly one newline", lambda t: t.replace("</rules>\n", "</rules>\n\n")),
    ("expected a newline after </ex_ante>", lambda t: t.replace("</ex_ante>\n", "</ex_ante>")),
    ("no risk category in assessment", lambda t: t.replace("Risk category: C03", "Risk: high")),
    ("no intent in assessment", lambda t: t.replace("Intent:", "Goal:")),
    ("no verdict in rules", lambda t: t.replace("verdict: violated", "verdict: unclear")),
    ("verdict violated but no rule cited", lambda t: t.replace("[R05] and [R06]", "a rule")),
    ("duplicate <assessment>", lambda t: t.replace("Intent:", "<assessment>Intent:")),
    ("<rules> inside <assessment>", lambda t: t.replace("C03.</assessment>", "C03.<rules></assessment>")),
    ("text before <ex_ante>", lambda t: "Sure! " + t),
    ("format tags after </ex_ante> (trailing junk)", lambda t: t + "\n<ex_ante>\n<assessment>Intent"),
]


@pytest.mark.parametrize("reason,mutate", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_reports_reason(reason, mutate):
    text = mutate(GOOD)
    assert text != GOOD
    result = parse(text)
    assert not result.valid
    assert reason in result.errors, result.errors


def test_validate_checks_ids_against_rulebook(rulebook):
    assert parse(GOOD.replace("[R06]", "[R99]")).valid  # structure alone is fine
    result = validate(GOOD.replace("[R06]", "[R99]"), rulebook)
    assert not result.valid and result.errors == ["unknown rule id R99"]
    result = validate(GOOD.replace("Risk category: C03", "Risk category: C77"), rulebook)
    assert result.errors == ["unknown category C77"]
    assert validate(GOOD.replace("C03", "none"), rulebook).valid


def test_truncated_generations_are_invalid_and_explained():
    answer_start = GOOD.index("</ex_ante>\n") + len("</ex_ante>\n")
    for cut in range(answer_start + 1):  # any cut before the first answer character
        result = parse(GOOD[:cut])
        assert not result.valid, cut
        assert result.errors, cut
    mid_rules = parse(GOOD[: GOOD.index("verdict")])
    assert mid_rules.trace is None
    assert "missing </rules>" in mid_rules.errors and "missing </ex_ante>" in mid_rules.errors
    assert mid_rules.steps == {"assessment": HARMFUL.assessment}


def test_trace_is_returned_for_content_errors():
    result = parse(GOOD.replace("refuse_and_redirect", "refuse"))
    assert result.trace is not None and result.trace.answer == HARMFUL.answer
    assert not result.valid


@pytest.mark.parametrize("seed", range(5))
def test_parse_never_raises_on_junk(seed):
    rng = random.Random(seed)
    pieces = ["<ex_ante>", "</ex_ante>", "<assessment>", "</assessment>", "<rules>", "</rules>",
              "<calibration>", "</calibration>", "\n", "Strategy: comply", "[R01]", "verdict: violated", "é", "<"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        result = parse(text)
        assert isinstance(result.errors, list)
        assert result.valid == (result.trace is not None and not result.errors)
    assert parse(None).errors == ["expected a string, got NoneType"]
    assert not parse("").valid and parse("").errors == ["missing <ex_ante>"]


def test_constants():
    assert exante.STEPS == ("assessment", "rules", "calibration", "answer")
    assert exante.STRATEGIES == ("comply", "comply_with_safeguards", "refuse_and_redirect")
    assert STEP_CLOSE == {"assessment": "</assessment>", "rules": "</rules>",
                          "calibration": "</calibration>\n</ex_ante>", "answer": None}
