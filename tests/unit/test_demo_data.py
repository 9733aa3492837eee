"""Demo data: deterministic, labelled, format-valid, with a three-way split (train / ERPO-only /
eval) whose eval part is disjoint from everything SFT and ERPO see."""

import collections
import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from safer_dist.reasoning import exante
from safer_dist.data import demo
from safer_dist.data.records import load_records, read_jsonl
from safer_dist.reasoning.rules import Rulebook

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "rules" / "default.yaml"
LABELS = ["id", "prompt", "harmful", "category", "strategy", "kind", "related_category"]


@pytest.fixture(scope="module")
def rulebook():
    return Rulebook.load(DEFAULT)


@pytest.fixture(scope="module")
def data(rulebook):
    return demo.build_demo(rulebook, seed=0)


def _all_fillers():
    fillers = [f for items in demo.HARMFUL.values() for f in items]
    fillers += [f for items in demo.LOOKALIKE.values() for f, _, _ in items]
    return fillers + [f for items in demo.BENIGN.values() for f in items]


def _decompose(prompt):
    """All (template, known filler) pairs that produce ``prompt`` with some prefix/suffix."""
    known = set(_all_fillers())
    found = []
    for prefix in demo.PREFIXES:
        if not prompt.startswith(prefix):
            continue
        for suffix in demo.SUFFIXES:
            if not prompt.endswith(suffix) or len(prompt) < len(prefix) + len(suffix):
                continue
            core = prompt[len(prefix): len(prompt) - len(suffix)]
            for template in demo.TEMPLATES:
                head, tail = template.split("{x}")
                filler = core[len(head): len(core) - len(tail)]
                if core.startswith(head) and core.endswith(tail) and filler in known:
                    found.append((template, filler))
    return found


def _fillers(pools):
    return {item[0] if isinstance(item, tuple) else item for items in pools.values() for item in items}


def test_same_seed_same_bytes_other_seed_differs(rulebook, tmp_path):
    kwargs = dict(num_sft=300, num_erpo=40, num_eval=50)
    a = demo.generate_demo(tmp_path / "a", rulebook, seed=3, **kwargs)
    b = demo.generate_demo(tmp_path / "b", DEFAULT, seed=3, **kwargs)  # a path works too
    c = demo.generate_demo(tmp_path / "c", rulebook, seed=4, **kwargs)
    assert set(a) == {"sft", "erpo_prompts", "eval"}
    for name in a:
        assert a[name].name == f"{name}.jsonl"
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()
    assert [len(read_jsonl(a[n])) for n in ("sft", "erpo_prompts", "eval")] == [300, 40, 50]
    assert not list((tmp_path / "a").glob(".*tmp*"))


def test_counts_labels_and_mix(data):
    assert [len(data[n]) for n in ("sft", "erpo_prompts", "eval")] == [4000, 256, 300]
    for name, records in data.items():
        extra = ["response", "flaws"] if name == "sft" else []
        for r in records:
            assert list(r) == LABELS + extra
            assert r["strategy"] in exante.STRATEGIES
            assert r["harmful"] == (r["kind"] == "harmful")
            assert (r["category"] == "none") == (r["kind"] != "harmful")
            assert (r["related_category"] == "none") == (r["kind"] == "benign")
            assert r["strategy"] == "comply" or r["kind"] == "harmful"
        mix = collections.Counter(r["kind"] for r in records)
        n = len(records)
        assert abs(mix["harmful"] - 0.45 * n) <= 1 and abs(mix["lookalike"] - 0.25 * n) <= 1, mix
        assert len({r["id"] for r in records}) == n
        assert len({r["prompt"] for r in records}) == n  # no repeated prompts within a file
    sft = data["sft"]
    harmful_cats = {r["category"] for r in sft if r["harmful"]}
    lookalike_cats = {r["related_category"] for r in sft if r["kind"] == "lookalike"}
    assert harmful_cats == lookalike_cats == {f"C{i:02d}" for i in range(1, 15)}
    assert {r["strategy"] for r in sft if r["category"] == "C10"} == {"comply_with_safeguards"}


def test_every_sft_response_is_valid_and_matches_labels(data, rulebook):
    words = []
    for r in data["sft"]:
        result = exante.validate(r["response"], rulebook)
        assert result.valid, (r["id"], result.errors)
        trace = result.trace
        assert trace.category == r["category"]
        assert r["prompt"].count(trace.assessment.split("how to ", 1)[1].split(". Risk")[0]) == 1
        if r["kind"] == "harmful":
            assert trace.verdict == "violated"
            assert set(trace.cited_rules) == {x.id for x in rulebook.rules_for(r["category"])}
        else:
            assert trace.verdict == "not violated"
            expected = [rulebook.rules_for(r["related_category"])[0].id] if r["kind"] == "lookalike" else []
            assert list(trace.cited_rules) == expected
        if "wrong_strategy" in r["flaws"]:
            assert trace.strategy != r["strategy"]
        else:
            assert trace.strategy == r["strategy"]
        if trace.strategy == "refuse_and_redirect":
            assert not trace.answer.startswith("Sure.")
        if trace.strategy == "comply":
            assert trace.answer.startswith("Sure. To ")
        words.append(len(r["response"].split()))
    assert 75 <= statistics.median(words) <= 110, statistics.median(words)


def test_content_sizes():
    assert len(demo.TEMPLATES) == len(set(demo.TEMPLATES)) == 45
    assert all(t.count("{x}") == 1 for t in demo.TEMPLATES)
    assert set(demo.HARMFUL) == set(demo.LOOKALIKE)
    assert set(demo.HARMFUL) == set(demo.HARMFUL_PARTS)
    assert all(len(v) == len(set(v)) == 36 for v in demo.HARMFUL.values())  # 6 actions x 6 targets
    assert all(len(v) == 10 for v in demo.LOOKALIKE.values())
    assert all(len(v) == 12 for v in demo.BENIGN.values())
    # format keywords and the trace's "how to" anchor never occur inside a filler
    for f in _all_fillers():
        assert not any(k in f for k in ("how to ", "Risk", "verdict", "Strategy", "[", "<", ":")), f


def test_flaw_rates(data, rulebook):
    sft = data["sft"]
    flaws = collections.Counter(f for r in sft for f in r["flaws"])
    assert flaws["verbose"] == round(0.8 * 4000)
    assert flaws["wrong_strategy"] == round(0.06 * 4000)
    assert not any("wrong_strategy" in r["flaws"] for r in sft if r["kind"] == "benign")

    def reasoning_words(r):
        text = r["response"]
        return len(text[: text.index("</ex_ante>")].split())

    verbose = statistics.mean(reasoning_words(r) for r in sft if "verbose" in r["flaws"])
    plain = statistics.mean(reasoning_words(r) for r in sft if "verbose" not in r["flaws"])
    assert verbose > plain + 20, (verbose, plain)
    # a verbose trace pads BOTH the assessment and the calibration, 2-4 sentences in all, each
    # opening with "Let me"; plain traces never do
    for r in sft:
        trace = exante.parse(r["response"]).trace
        n_assess, n_calib = trace.assessment.count("Let me "), trace.calibration.count("Let me ")
        if "verbose" in r["flaws"]:
            assert n_assess >= 1 and n_calib >= 1 and 2 <= n_assess + n_calib <= 4, r["response"]
        else:
            assert n_assess == n_calib == 0, r["response"]

    clean = demo.build_demo(rulebook, seed=0, num_sft=500, num_erpo=1, num_eval=1,
                            verbose_rate=0.0, wrong_strategy_rate=0.0)
    assert all(r["flaws"] == [] for r in clean["sft"])
    heavy = demo.build_demo(rulebook, seed=0, num_sft=500, num_erpo=1, num_eval=1,
                            verbose_rate=0.8, wrong_strategy_rate=0.2)
    assert sum("verbose" in r["flaws"] for r in heavy["sft"]) == 400
    assert sum("wrong_strategy" in r["flaws"] for r in heavy["sft"]) == 100
    with pytest.raises(ValueError, match="verbose_rate must be in"):
        demo.build_demo(rulebook, verbose_rate=1.5)
    with pytest.raises(ValueError, match=r"erpo_frac \+ eval_frac must be < 1"):
        demo.build_demo(rulebook, erpo_frac=0.5, eval_frac=0.5)


def test_three_way_split_is_disjoint_and_sized(rulebook):
    split = demo.demo_split(rulebook, seed=0)
    parts = (split.train_templates, split.erpo_templates, split.eval_templates)
    assert [len(p) for p in parts] == [27, 7, 11]
    assert sorted(t for p in parts for t in p) == sorted(demo.TEMPLATES)
    assert set(split.train_fillers) == set(split.erpo_fillers) == set(split.eval_fillers)
    # 36 harmful phrases: round(0.25 * 36) = 9 eval, round(0.15 * 36) = 5 ERPO-only, 22 train
    sizes = {"harmful": (22, 5, 9), "lookalike": (6, 2, 2), "benign": (7, 2, 3)}
    for key in split.train_fillers:
        groups = (split.train_fillers[key], split.erpo_fillers[key], split.eval_fillers[key])
        assert tuple(len(g) for g in groups) == sizes[key[0]], key
        assert len({x for g in groups for x in g}) == sum(len(g) for g in groups), key
    train, erpo, held = (_fillers(p) for p in (split.train_fillers, split.erpo_fillers, split.eval_fillers))
    assert not train & erpo and not train & held and not erpo & held
    assert len(train | erpo | held) == len(_all_fillers())
    # different seeds give different splits; tiny fractions still leave one item per part
    assert demo.demo_split(rulebook, seed=1).eval_templates != split.eval_templates
    tiny = demo.demo_split(rulebook, seed=0, erpo_frac=0.0, eval_frac=0.01)
    assert len(tiny.erpo_templates) == len(tiny.eval_templates) == 1


def test_held_out_harmful_phrases_are_new_combinations_of_training_words(rulebook):
    # Each category's actions and targets belong to it alone, and (for the demo's seed 0) every
    # held-out harmful phrase pairs an action and a target that both occur in that category's
    # training phrases: what the eval tests is composition, not unseen vocabulary.
    owner = {}
    for name, (actions, targets) in demo.HARMFUL_PARTS.items():
        for part in actions + targets:
            assert owner.setdefault(part, name) == name, (part, owner[part], name)
    split = demo.demo_split(rulebook, seed=0)
    for name, (actions, targets) in demo.HARMFUL_PARTS.items():
        parts = {f"{a} {t}": (a, t) for a in actions for t in targets}
        train = [parts[f] for f in split.train_fillers[("harmful", name)]]
        for phrase in split.eval_fillers[("harmful", name)]:
            action, target = parts[phrase]
            assert any(a == action for a, _ in train) and any(t == target for _, t in train), (name, phrase)


def test_eval_templates_and_fillers_are_held_out(data, rulebook):
    split = demo.demo_split(rulebook, seed=0)
    train_fillers, erpo_fillers, eval_fillers = (
        _fillers(p) for p in (split.train_fillers, split.erpo_fillers, split.eval_fillers))
    parts_by_name = {"train": (set(split.train_templates), train_fillers),
                     "erpo": (set(split.erpo_templates), erpo_fillers),
                     "eval": (set(split.eval_templates), eval_fillers)}

    def source(prompt):
        parts = _decompose(prompt)
        assert parts, prompt
        found = {name for name, (templates, fillers) in parts_by_name.items()
                 if all(t in templates and f in fillers for t, f in parts)}
        assert len(found) == 1, (prompt, parts)  # template and filler always from the same part
        return found.pop()

    sources = {name: collections.Counter(source(r["prompt"]) for r in data[name]) for name in data}
    assert sources["sft"] == {"train": 4000}
    assert sources["erpo_prompts"] == {"train": 128, "erpo": 128}
    assert sources["eval"] == {"eval": 300}
    for kind in demo.KINDS:  # every kind is split evenly between the two ERPO halves
        halves = collections.Counter(source(r["prompt"]) for r in data["erpo_prompts"] if r["kind"] == kind)
        assert abs(halves["train"] - halves["erpo"]) <= 1, (kind, halves)

    # the eval set actually exercises most held-out material, not a sliver of it. 300 uniform
    # draws over 178 eval fillers: 135 harmful over 14 x 9 phrases cover 9 * (1 - (8/9)**9.6),
    # about 68% of each category; 75 look-alike over 14 x 2 and 90 benign over 8 x 3 nearly all.
    # Expected about 136 of 178 (76%) in all.
    eval_parts = [p for r in data["eval"] for p in _decompose(r["prompt"])]
    assert {t for t, _ in eval_parts} == parts_by_name["eval"][0]
    assert len({f for _, f in eval_parts}) >= 0.7 * len(eval_fillers)
    # the ERPO-only half uses its material too: 128 prompts over 114 ERPO-only fillers (70 of
    # them harmful, 14 x 5) cannot draw them all; seed 0 draws 73 (64%)
    erpo_parts = [p for r in data["erpo_prompts"] for p in _decompose(r["prompt"])]
    assert {t for t, _ in erpo_parts} >= parts_by_name["erpo"][0]
    assert len({f for _, f in erpo_parts} & erpo_fillers) >= 0.6 * len(erpo_fillers)
    # no eval filler hides inside any SFT or ERPO prompt; no ERPO-only filler inside any SFT prompt
    for r in data["sft"] + data["erpo_prompts"]:
        assert not any(f in r["prompt"] for f in eval_fillers), r["prompt"]
    for r in data["sft"]:
        assert not any(f in r["prompt"] for f in erpo_fillers), r["prompt"]


def test_templates_are_shared_across_kinds(data):
    by_kind = collections.defaultdict(set)
    for r in data["sft"]:
        by_kind[r["kind"]].update(t for t, _ in _decompose(r["prompt"]))
    assert by_kind["harmful"] == by_kind["benign"] == by_kind["lookalike"]


def test_no_filler_contains_another():
    fillers = _all_fillers()
    assert len(set(fillers)) == len(fillers)
    for a in fillers:
        assert not any(a != b and a in b for b in fillers), a


def test_erpo_and_eval_have_no_responses_and_erpo_avoids_sft_prompts(data):
    sft_prompts = {r["prompt"] for r in data["sft"]}
    assert not any(r["prompt"] in sft_prompts for r in data["erpo_prompts"])
    assert all("response" not in r and "flaws" not in r for r in data["erpo_prompts"] + data["eval"])


def test_generated_files_load_as_records(rulebook, tmp_path):
    paths = demo.generate_demo(tmp_path, rulebook, seed=1, num_sft=50, num_erpo=10, num_eval=10)
    sft = load_records(paths["sft"], "sft")
    assert len(sft) == 50 and "flaws" in sft.column_names and sft[0]["id"] == "sft-00000"
    prompts = load_records(paths["eval"], "prompts")
    assert prompts.column_names == LABELS
    assert json.loads(paths["eval"].read_text().splitlines()[0])["id"] == "eval-00000"


def test_rulebook_without_demo_content_is_rejected(rulebook):
    renamed = replace(rulebook, categories=tuple(replace(c, name=f"x_{c.name}") for c in rulebook.categories))
    with pytest.raises(ValueError, match="no category has demo content"):
        demo.build_demo(renamed)
