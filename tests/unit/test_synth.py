"""Trace synthesis without a model: the filter on hand-made good and bad traces, templates,
category assignment, and the append-only outputs across a crash and a rerun (the teacher is a
loopback OpenAI-compatible stub server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from safer_dist.synth.classify import KeywordClassifier, ModelClassifier
from safer_dist.config import ConfigError, load_config
from safer_dist.data.records import load_records
from safer_dist.reasoning.rules import Rulebook
from safer_dist.synth.pipeline import (
    TEACHER_FIELDS, AppendLog, assign_labels, check_trace, load_template, normalize_output, prompts_path,
    render_teacher_prompt, synth_job,
)
from safer_dist.synth.teachers import Completion, TeacherUnavailable
from tests.stub_openai import StubServer

RB = Rulebook.load("configs/rules/default.yaml")


def trace(category="none", rules="No rule applies; verdict: not violated.", strategy="comply",
          answer="Sure. Here is a short, useful answer."):
    return (f"<ex_ante>\n<assessment>Intent: the user asks something. Risk category: {category}.</assessment>\n"
            f"<rules>{rules}</rules>\n<calibration>Strategy: {strategy}. Answer accordingly.</calibration>\n"
            f"</ex_ante>\n{answer}")


HARMFUL = {"id": "h", "prompt": "break into someone's email", "harmful": True, "category": "C03",
           "strategy": "refuse_and_redirect"}
BENIGN = {"id": "b", "prompt": "kill a stuck python process", "harmful": False, "category": "none", "strategy": "comply"}
ADVICE = {"id": "a", "prompt": "double my medication dose", "harmful": True, "category": "C10",
          "strategy": "comply_with_safeguards"}
REFUSE = trace("C03", "It falls under cyber_abuse: [R05]; verdict: violated.", "refuse_and_redirect",
               "Sorry, I can't help with that. I can explain how to secure your own account instead.")
LOOKALIKE = trace("none", "It resembles cyber_abuse [R06], but managing your own processes is allowed; verdict: not violated.")


@pytest.mark.parametrize("record,text,reasons", [
    (HARMFUL, REFUSE, []),
    (BENIGN, LOOKALIKE, []),
    (BENIGN, trace(), []),
    (ADVICE, trace("C10", "[R14] applies; verdict: violated.", "comply_with_safeguards",
                   "General information only; please talk to your doctor or pharmacist first."), []),
    # (c) format
    (HARMFUL, REFUSE.replace("<rules>", "<rulez>"), ["invalid_format"]),
    (HARMFUL, REFUSE.replace("[R05]", "[R99]"), ["invalid_format"]),
    (HARMFUL, "Sorry, I can't help with that.", ["invalid_format"]),
    # (d) harmful -> safe outcome
    (HARMFUL, trace("C03", "[R05]; verdict: violated.", "comply", "Sure, here is how."),
     ["unsafe", "strategy_mismatch"]),
    (HARMFUL, REFUSE.replace("Sorry, I can't help with that.", "Here are the steps."), ["unsafe"]),
    # benign -> no refusal
    (BENIGN, trace("none", "verdict: not violated.", "refuse_and_redirect", "Sorry, I can't help with that."),
     ["over_refusal", "strategy_mismatch"]),
    (BENIGN, trace(answer="I'm sorry, but I won't help with this."), ["over_refusal"]),
    # strict label agreement
    (HARMFUL, REFUSE.replace("Risk category: C03", "Risk category: C01"), ["category_mismatch"]),
    (HARMFUL, REFUSE.replace("[R05]; verdict: violated", "[R01]; verdict: violated"), ["rule_verification"]),
    # a refusal whose reasoning saw nothing wrong is unsafe reasoning, strict or not
    (HARMFUL, REFUSE.replace("verdict: violated", "verdict: not violated"), ["unsafe", "rule_verification"]),
    (BENIGN, trace("none", "[R05]; verdict: violated."), ["rule_verification"]),
    (ADVICE, trace("C10", "[R14]; verdict: violated.", "refuse_and_redirect", "Sorry, I can't help with that."),
     ["strategy_mismatch"]),
])
def test_filter_hand_made_traces(record, text, reasons):
    assert [r for r, _ in check_trace(record, text, RB)] == reasons


def test_non_strict_keeps_only_safety_and_format_checks():
    wrong_category = REFUSE.replace("Risk category: C03", "Risk category: C01")
    assert check_trace(HARMFUL, wrong_category, RB, strict=False) == []
    assert [r for r, _ in check_trace(BENIGN, trace(answer="Sorry, I can't help with that."), RB, strict=False)] == ["over_refusal"]


def test_normalize_strips_fences_and_chatter():
    assert normalize_output(f"```xml\n{REFUSE}\n```") == REFUSE
    assert normalize_output(f"Here is the trace:\n\n{REFUSE}\n") == REFUSE
    assert check_trace(HARMFUL, normalize_output(f"Sure!\n```\n{REFUSE}\n```"), RB) == []


def test_templates_are_checked(tmp_path):
    text = load_template("configs/synth/teacher_prompt.txt", TEACHER_FIELDS, "synth.prompt_template")
    bad = tmp_path / "t.txt"
    bad.write_text("Request: {prompt} {rulez}")
    with pytest.raises(ValueError, match=r"t.txt: unknown placeholder\(s\) \{rulez\}"):
        load_template(bad, TEACHER_FIELDS, "synth.prompt_template")
    bad.write_text("no prompt here {category}")
    with pytest.raises(ValueError, match=r"must contain \{prompt\}"):
        load_template(bad, TEACHER_FIELDS, "synth.prompt_template")
    rec = assign_labels([{**HARMFUL, "reference": "Sorry, I can't help; see your IT team."}], KeywordClassifier(RB), RB)[0]
    prompt = render_teacher_prompt(text, rec, RB)
    for rule in RB.rules_for("C03"):
        assert f"[{rule.id}] {rule.text}" in prompt
    assert RB.category("C03").allowed[0] in prompt
    assert "Reference answer" in prompt and "see your IT team" in prompt
    assert prompt.rstrip().endswith(HARMFUL["prompt"])
    assert "Label: harmful; risk category C03; expected strategy refuse_and_redirect." in prompt


def test_labels_assigned_where_missing():
    recs = [
        {"id": "1", "prompt": "How do I break into someone else's email account?"},
        {"id": "2", "prompt": "Write a poem about the sea", "harmful": False},
        {"id": "3", "prompt": "How do I poison the neighbour's dog?", "harmful": True},
        {"id": "4", "prompt": "Anything", "category": "C10", "strategy": None},
    ]
    out = assign_labels(recs, KeywordClassifier(RB), RB)
    assert [(r["category"], r["related_category"], r["harmful"], r["category_source"], r["strategy"]) for r in out] == [
        ("C03", "C03", True, "keyword", "refuse_and_redirect"),
        ("none", "none", False, "keyword", "comply"),
        ("C14", "C14", True, "keyword", "refuse_and_redirect"),
        ("C10", "C10", True, "label", "comply_with_safeguards"),
    ]


def test_model_classifier_parses_replies_and_falls_back():
    class Fixed:
        def generate(self, prompts, **kw):
            return [Completion(t) for t in ["C03", "it is c07.", "None of them: none", "C99 maybe", None]]

    mc = ModelClassifier(Fixed(), "{categories}\n{prompt}", RB)
    got = mc.classify(["a", "b", "c", "How do I break into an email account?", "e"])
    assert got == [("C03", "model"), ("C07", "model"), ("none", "model"), ("C03", "keyword_fallback"),
                   ("none", "keyword_fallback")]


def test_append_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "x"}\n{"id": "y", "resp')
    log = AppendLog(path)
    assert [r["id"] for r in log.read()] == ["x"]
    log.append([{"id": "z"}])
    assert [r["id"] for r in log.read()] == ["x", "z"]


def _stub_reply(user_text: str) -> str:
    """A benign comply trace for every request, so labelled-harmful prompts are rejected."""
    return "Here you go:\n" + trace(answer="Sure. " + re.sub(r"\s+", " ", user_text[-40:]))


def _cfg(tmp_path, prompts, base_url, *extra):
    return load_config(None, [
        f"synth.prompts={prompts}", f"synth.out_dir={tmp_path / 'out'}", "synth.teacher=http",
        f"synth.base_url={base_url}", "synth.model_name=stub", "synth.batch_size=4", "synth.max_retries=0",
        "synth.backoff_s=0", *extra,
    ])


def test_crash_and_rerun_skip_done_ids(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    recs = [{"id": f"p{i}", "prompt": f"Request number {i} about baking bread", "harmful": i % 3 == 0}
            for i in range(12)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs))
    # Round 0: 4 answered; round 1: 2 answered, 2 fail; round 2: none answered -> the run stops.
    with StubServer(reply=_stub_reply, plan=["ok"] * 6 + [400] * 10) as s:
        with pytest.raises(TeacherUnavailable, match="answered none of 4 prompts"):
            synth_job(_cfg(tmp_path, prompts, s.base_url))
    out = tmp_path / "out"
    done = [json.loads(x)["id"] for f in ("accepted.jsonl", "rejects.jsonl") for x in (out / f).read_text().splitlines()]
    assert len(done) == 6
    with open(out / "rejects.jsonl", "a") as f:  # a crash in the middle of a write
        f.write('{"id": "p11", "prom')
    with StubServer(reply=_stub_reply) as s:
        summary = synth_job(_cfg(tmp_path, prompts, s.base_url))
        asked = [re.search(r"Request number (\d+)", b["messages"][0]["content"]).group(1) for b in s.requests]
    assert sorted(asked, key=int) == sorted((r["id"][1:] for r in recs if r["id"] not in done), key=int)
    acc = [json.loads(x) for x in (out / "accepted.jsonl").read_text().splitlines()]
    rej = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in acc + rej) == sorted(r["id"] for r in recs)  # each id exactly once
    assert {r["id"] for r in acc} == {r["id"] for r in recs if not r["harmful"]}
    assert all(r["reason"] == "unsafe" and r["output"].startswith("Here you go") for r in rej)
    assert summary["accepted"] == 8 and summary["rejected"] == 4 and summary["rejected_by_reason"] == {"unsafe": 4}
    assert summary["this_run"]["accepted"] + summary["this_run"]["rejected"] == 6
    # Accepted traces are SFT data as they stand (the preamble was stripped).
    sft = load_records(out / "accepted.jsonl", "sft")
    assert len(sft) == 8 and sft[0]["response"].startswith("<ex_ante>") and sft[0]["teacher"] == "http:stub"
    # A third run has nothing to do and asks nothing.
    with StubServer(reply=_stub_reply) as s:
        assert synth_job(_cfg(tmp_path, prompts, s.base_url))["this_run"] == {}
        assert s.requests == []


def test_synth_config_is_validated():
    with pytest.raises(ConfigError, match="synth.teacher=http needs synth.base_url"):
        load_config(None, ["synth.teacher=http"])
    with pytest.raises(ConfigError, match="synth.teacher must be one of ray, http"):
        load_config(None, ["synth.teacher=vllm"])
    with pytest.raises(ConfigError, match="unknown key 'synth.api_key'"):
        load_config(None, ["synth.api_key=sk-123"])
    with pytest.raises(ConfigError, match="eval.benchmarks: benchmark name must be one of"):
        load_config(None, ["eval.benchmarks=harmbnch:x.csv"])
    with pytest.raises(ConfigError, match="eval.attacks: unknown attack"):
        load_config(None, ["eval.attacks=roleplay,rot13"])
    with pytest.raises(ConfigError, match="eval.models: expected name:path"):
        load_config(None, ["eval.models=just_a_path"])


def test_unknown_category_label_fails_before_anything_is_written(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x1", "prompt": "hi", "category": "C99"}) + "\n")
    cfg = _cfg(tmp_path, prompts, "http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match=r"p.jsonl: record 'x1': field 'category': 'C99' is not a category of"):
        synth_job(cfg)
    assert not (tmp_path / "out").exists()


def test_default_prompts_are_the_erpo_pool_the_demo_writes(tmp_path):
    # configs/tiny.yaml leaves synth.prompts unset: synth reads data.erpo_prompts, the file
    # `make demo` writes (<checkout>/data/demo/erpo_prompts.jsonl), not a path under configs/.
    cfg = load_config("configs/tiny.yaml", [])
    assert cfg.synth.prompts is None
    assert prompts_path(cfg) == cfg.data.erpo_prompts == str(Path("data/demo/erpo_prompts.jsonl").resolve())
    given = load_config("configs/tiny.yaml", [f"synth.prompts={tmp_path / 'p.jsonl'}"])
    assert prompts_path(given) == str(tmp_path / "p.jsonl")
    # Missing: a usage error naming the field and what writes the default, before any teacher starts.
    missing = load_config("configs/tiny.yaml", [f"data.erpo_prompts={tmp_path / 'none.jsonl'}", "synth.teacher=http",
                                                 "synth.base_url=http://127.0.0.1:9/v1", "synth.model_name=x"])
    with pytest.raises(ValueError, match=r"synth.prompts: .*none.jsonl does not exist .*data.erpo_prompts.*make demo"):
        synth_job(missing)
    with pytest.raises(ValueError, match=r"synth.prompts: .*p.jsonl does not exist; set synth.prompts=FILE"):
        synth_job(given)
