"""The Ex-Ante reasoning format: render, parse, validate, and split into steps.

A response is three reasoning blocks inside ``<ex_ante>`` followed by the answer::

    <ex_ante>
    <assessment>Intent: {free text}. Risk category: {C01..C14 | none}.</assessment>
    <rules>{free text citing rule ids like [R07]}; verdict: {violated | not violated}.</rules>
    <calibration>Strategy: {comply | comply_with_safeguards | refuse_and_redirect}. {free text}</calibration>
    </ex_ante>
    {answer text}

Blocks are separated by exactly one ``\\n``; ``</ex_ante>`` is followed by one ``\\n`` and the
answer, which is everything after it, stripped.

Step segments (what a rollout worker samples for each step) put the boundary newline at the
*start* of the next step, so every segment but the answer ends at its closing marker
(``STEP_CLOSE``) and ``"".join(step_texts(text)) == text`` for a rendered trace::

    assessment  "<ex_ante>\\n<assessment>...</assessment>"
    rules       "\\n<rules>...</rules>"
    calibration "\\n<calibration>...</calibration>\\n</ex_ante>"
    answer      "\\n..."                                     (ends at EOS)

Pure Python, no torch, no token counts. ``parse`` never raises on arbitrary text: it reports
every reason a text is not a valid trace in ``ParseResult.errors``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # avoid an import cycle: rules imports STRATEGIES from here
    from safer_dist.reasoning.rules import Rulebook

STEPS = ("assessment", "rules", "calibration", "answer")
STRATEGIES = ("comply", "comply_with_safeguards", "refuse_and_redirect")
VERDICTS = ("violated", "not violated")
REASONING_STEPS = STEPS[:3]

# What ends a step while sampling; the answer ends at EOS.
STEP_CLOSE = {
    "assessment": "</assessment>",
    "rules": "</rules>",
    "calibration": "</calibration>\n</ex_ante>",
    "answer": None,
}
# What starts a step segment (the boundary newline belongs to the step that follows it).
STEP_OPEN = {
    "assessment": "<ex_ante>\n<assessment>",
    "rules": "\n<rules>",
    "calibration": "\n<calibration>",
    "answer": "\n",
}

_CATEGORY_RE = re.compile(r"Risk category:\s*(C\d+|none)\b")
_INTENT_RE = re.compile(r"Intent:\s*\S")
_RULE_ID_RE = re.compile(r"\[(R\d+)\]")
_VERDICT_RE = re.compile(r"verdict:\s*(not violated|violated)\b")
_STRATEGY_RE = re.compile(r"Strategy:\s*(comply_with_safeguards|refuse_and_redirect|comply)\b")
_ANY_TAG_RE = re.compile(r"</?(?:ex_ante|assessment|rules|calibration)>")


@dataclass(frozen=True)
class Trace:
    """One Ex-Ante response. Reasoning fields hold the exact text between their tags;
    ``answer`` is the stripped text after ``</ex_ante>``."""

    assessment: str
    rules: str
    calibration: str
    answer: str

    @property
    def category(self) -> str | None:
        """``"C03"``-style id or ``"none"``; None when the assessment names no category."""
        m = _CATEGORY_RE.search(self.assessment)
        return m.group(1) if m else None

    @property
    def cited_rules(self) -> tuple[str, ...]:
        """Rule ids cited as ``[R07]`` in the rules step, in order, without repeats."""
        return tuple(dict.fromkeys(_RULE_ID_RE.findall(self.rules)))

    @property
    def verdict(self) -> str | None:
        """``"violated"``, ``"not violated"`` (the last one stated), or None."""
        found = _VERDICT_RE.findall(self.rules)
        return found[-1] if found else None

    @property
    def strategy(self) -> str | None:
        """One of ``STRATEGIES`` (the first one stated in calibration), or None."""
        m = _STRATEGY_RE.search(self.calibration)
        return m.group(1) if m else None


@dataclass
class ParseResult:
    """``trace`` is set whenever all four steps could be cut out of the text, even if their
    content is invalid; ``valid`` means no errors at all. ``steps`` holds the inner text of
    every step that was found (useful for judging truncated generations)."""

    trace: Trace | None
    errors: list[str] = field(default_factory=list)
    steps: dict[str, str] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.trace is not None and not self.errors


def render(trace: Trace) -> str:
    """The exact response text for ``trace``."""
    return "".join(_segments(trace))


def _segments(trace: Trace) -> list[str]:
    return [
        f"<ex_ante>\n<assessment>{trace.assessment}</assessment>",
        f"\n<rules>{trace.rules}</rules>",
        f"\n<calibration>{trace.calibration}</calibration>\n</ex_ante>",
        f"\n{trace.answer}",
    ]


def step_texts(trace: Trace | str) -> list[str]:
    """The four step segments of a trace (or of a valid trace's text); they join back to
    ``render(trace)``. Raises ``ValueError`` for text that is not a valid trace."""
    if isinstance(trace, str):
        result = parse(trace)
        if not result.valid:
            raise ValueError(f"not a valid Ex-Ante trace: {'; '.join(result.errors)}")
        trace = result.trace
    return _segments(trace)


def step_text(trace: Trace | str, step: str) -> str:
    """The exact segment of ``step`` as it appears in the rendered text (see module doc)."""
    return step_texts(trace)[_step_index(step)]


def prefix_before(trace_text: str, step: str) -> str:
    """The text before ``step`` begins, i.e. up to and including the previous step's closing
    marker (``""`` for the assessment). Works on partial generations as long as the previous
    steps are closed; raises ``ValueError`` otherwise. ``prefix_before(t, s) + step_text(t, s)``
    is a prefix of ``t``."""
    index = _step_index(step)
    end = 0
    for previous in STEPS[:index]:
        marker = STEP_CLOSE[previous]
        found = trace_text.find(marker, end)
        if found < 0:
            raise ValueError(f"cannot find the start of step {step!r}: {marker!r} not found")
        end = found + len(marker)
    return trace_text[:end]


def _step_index(step: str) -> int:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
    return STEPS.index(step)


def parse(text: str) -> ParseResult:
    """Parse a response (e.g. a raw model generation). Never raises on a string; every reason
    the text is not a valid trace is listed in ``errors``. Leading whitespace is ignored."""
    if not isinstance(text, str):
        return ParseResult(None, [f"expected a string, got {type(text).__name__}"])
    errors: list[str] = []
    text = text.lstrip()

    start = text.find("<ex_ante>")
    if start < 0:
        return ParseResult(None, ["missing <ex_ante>"])
    if start > 0:
        errors.append("text before <ex_ante>")
    if text.count("<ex_ante>") > 1:
        errors.append("duplicate <ex_ante>")
    body_start = start + len("<ex_ante>")
    end = text.find("</ex_ante>", body_start)
    if end < 0:
        errors.append("missing </ex_ante>")
        body_end = len(text)
    else:
        body_end = end
    body = text[body_start:body_end]

    spans, steps = _find_blocks(body, errors)
    if len(spans) == len(REASONING_STEPS):  # with a block missing, stray text is expected
        _check_between(body, spans, errors)

    answer: str | None = None
    if end >= 0:
        after = text[end + len("</ex_ante>"):]
        if not after.startswith("\n"):
            errors.append("expected a newline after </ex_ante>")
        answer = after.strip()
        if not answer:
            errors.append("empty answer")
        elif _ANY_TAG_RE.search(answer):
            errors.append("format tags after </ex_ante> (trailing junk)")
        steps["answer"] = answer

    trace = None
    if answer is not None and all(s in steps for s in REASONING_STEPS):
        trace = Trace(steps["assessment"], steps["rules"], steps["calibration"], answer)
        _check_content(trace, errors)
    return ParseResult(trace, errors, steps)


def validate(text: str, rulebook: Rulebook | None = None) -> ParseResult:
    """``parse`` plus, when a rulebook is given, checks that the cited rule ids and the
    risk category exist in it."""
    result = parse(text)
    if rulebook is None or result.trace is None:
        return result
    known_rules = set(rulebook.rule_ids)
    for rid in result.trace.cited_rules:
        if rid not in known_rules:
            result.errors.append(f"unknown rule id {rid}")
    category = result.trace.category
    if category not in (None, "none") and category not in set(rulebook.category_ids):
        result.errors.append(f"unknown category {category}")
    return result


def _find_blocks(body: str, errors: list[str]) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """Locate each reasoning block in the ``<ex_ante>`` body. Returns the (start, end) span
    of every block found, in text order, and the inner texts."""
    spans: list[tuple[int, int, str]] = []
    steps: dict[str, str] = {}
    for name in REASONING_STEPS:
        open_tag, close_tag = f"<{name}>", f"</{name}>"
        count = body.count(open_tag)
        if count == 0:
            errors.append(f"missing <{name}>")
            continue
        if count > 1:
            errors.append(f"duplicate <{name}>")
        open_at = body.find(open_tag)
        close_at = body.find(close_tag, open_at)
        if close_at < 0:
            errors.append(f"missing </{name}>")
            continue
        inner = body[open_at + len(open_tag):close_at]
        nested = _ANY_TAG_RE.search(inner)
        if nested:
            errors.append(f"{nested.group(0)} inside <{name}>")
        spans.append((open_at, close_at + len(close_tag), name))
        steps[name] = inner
    order = [name for _, _, name in sorted(spans)]
    expected = [name for name in REASONING_STEPS if name in order]
    if order != expected:
        # Report the first adjacent pair that is inverted, in the words a human would use.
        for earlier, later in zip(order, order[1:]):
            if REASONING_STEPS.index(earlier) > REASONING_STEPS.index(later):
                errors.append(f"steps out of order: {earlier} before {later}")
                break
    return [(s, e) for s, e, _ in sorted(spans)], steps


def _check_between(body: str, spans: list[tuple[int, int]], errors: list[str]) -> None:
    """Everything in the body outside the blocks must be exactly one newline per gap."""
    edges = [0] + [p for span in spans for p in span] + [len(body)]
    gaps = [body[edges[i]:edges[i + 1]] for i in range(0, len(edges), 2)]
    if any(gap.strip() for gap in gaps):
        errors.append("text outside tags inside <ex_ante>")
    elif any(gap != "\n" for gap in gaps):
        errors.append("whitespace between blocks must be exactly one newline")


def _check_content(trace: Trace, errors: list[str]) -> None:
    if not _INTENT_RE.search(trace.assessment):
        errors.append("no intent in assessment")
    if trace.category is None:
        errors.append("no risk category in assessment")
    if trace.verdict is None:
        errors.append("no verdict in rules")
    elif trace.verdict == "violated" and not trace.cited_rules:
        errors.append("verdict violated but no rule cited")
    if trace.strategy is None:
        errors.append("no strategy in calibration")
