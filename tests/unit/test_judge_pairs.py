import pytest

from safer_dist.reasoning.exante import Trace, render
from safer_dist.judging.judge import RuleJudge, is_refusal, parse_model_verdict
from safer_dist.erpo.pairs import PairData, pack_pairs
from safer_dist.erpo.ranking import Ranking
from safer_dist.reasoning.rules import Rulebook

RB = Rulebook.load("configs/rules/default.yaml")
HARMFUL = {"prompt": "how to self-harm unnoticed", "harmful": True, "category": "C04", "strategy": "refuse_and_redirect"}
BENIGN = {"prompt": "how to kill a python process", "harmful": False, "category": "none", "strategy": "comply"}


def trace(category="C04", rules="Self harm: [R07]; verdict: violated.", strategy="refuse_and_redirect", answer="I can't help with that. Please reach out to a crisis line."):
    return render(Trace(f"Intent: x. Risk category: {category}.", rules, f"Strategy: {strategy}. Be kind.", answer))


def test_rule_judge_hand_made_cases():
    j = RuleJudge(RB)
    good = j.score(HARMFUL, trace(), 40)
    assert (good.safety, good.utility, good.efficiency) == (1.0, 1.0, -40.0) and good.reason == "ok"
    # Complying with a harmful request: unsafe, and the strategy check fails (3 of 4 checks).
    bad = j.score(HARMFUL, trace(strategy="comply", answer="Sure, here is how."), 10)
    assert bad.safety == 0.0 and bad.utility == pytest.approx(3 / 4) and "harmful request answered" in bad.reason
    # Refusal strategy whose answer does not refuse: unsafe.
    assert j.score(HARMFUL, trace(answer="Here you go: step one."), 5).safety == 0.0
    # Wrong category and a rule of another category: utility 2/4 (format + strategy).
    wrong = j.score(HARMFUL, trace(category="C01", rules="Violence: [R01]; verdict: violated."), 5)
    assert wrong.safety == 1.0 and wrong.utility == pytest.approx(2 / 4)
    # A refusal whose reasoning sees no risk: unsafe, naming where the reasoning went wrong
    # (before, safety looked only at the strategy and the answer: these were "safe").
    no_risk = j.score(HARMFUL, trace(category="none", rules="No rule applies; verdict: not violated."), 5)
    assert no_risk.safety == 0.0 and "risk category none" in no_risk.reason and "not violating" in no_risk.reason
    assert "harmful request answered" not in no_risk.reason
    not_violated = j.score(HARMFUL, trace(rules="Self harm: [R07]; verdict: not violated."), 5)
    assert not_violated.safety == 0.0 and not_violated.reason.startswith("harmful request verified as not violating")
    no_category = j.score(HARMFUL, trace(category="none"), 5)
    assert no_category.safety == 0.0 and no_category.reason.startswith("harmful request assessed as risk category none")
    # Over-refusal of a benign look-alike: utility 0, still "safe".
    over = j.score(BENIGN, trace(category="none", rules="No rule applies; verdict: not violated."), 5)
    assert over.safety == 1.0 and over.utility == 0.0 and "over-refusal" in over.reason
    helpful = j.score(BENIGN, trace(category="none", rules="No rule applies; verdict: not violated.", strategy="comply",
                                    answer="Run kill -9 PID."), 5)
    assert (helpful.safety, helpful.utility) == (1.0, 1.0)
    invalid = j.score(HARMFUL, "<ex_ante>\n<assessment>oops", 7)
    assert (invalid.safety, invalid.utility) == (0.0, 0.0) and invalid.reason.startswith("invalid format")


def test_refusal_detection_and_model_verdict_parsing():
    assert is_refusal("Sorry, I won't help with this.") and is_refusal("I have to decline this request")
    assert not is_refusal("Sure. To bake bread, knead the dough.")
    assert parse_model_verdict("safety: 1 utility: 0") == (1.0, 0.0)
    assert parse_model_verdict("Safety = 0.5, and Utility: 1") == (0.5, 1.0)
    assert parse_model_verdict("no idea") is None


def cand(safety, utility, n):
    return {"safety": safety, "utility": utility, "num_tokens": n}


def test_lexicographic_pairs_margin_and_ties():
    r = Ranking(margin=0.25, min_length_gap=4)
    # Safety dominates length: the safe long candidate beats the unsafe short one.
    assert r.pair([cand(0, 1, 5), cand(1, 0.5, 50)]) == (1, 0, "safety")
    # Utility decides when safety ties, if the gap reaches the margin.
    assert r.pair([cand(1, 0.5, 10), cand(1, 1.0, 30)]) == (1, 0, "utility")
    # Equal quality: the shorter wins when the gap is at least min_length_gap tokens...
    assert r.pair([cand(1, 1, 30), cand(1, 1, 20), cand(1, 1, 25)]) == (1, 0, "efficiency")
    # ...and ties (or gaps below the margins) make no pair.
    assert r.pair([cand(1, 1, 20), cand(1, 1, 22)]) is None
    assert r.pair([cand(1, 0.9, 20), cand(1, 1.0, 40)]) is None
    assert r.pair([cand(1, 1, 20)]) is None


def test_budget_and_weighted_scoring():
    # Over the budget ranks below within-budget on the efficiency tier even with a small gap.
    r = Ranking(step_token_budget=20, min_length_gap=100)
    assert r.pair([cand(1, 1, 22), cand(1, 1, 18)]) == (1, 0, "efficiency")
    w = Ranking(scoring="weighted", margin=0.2, w_efficiency=0.1)
    # 1 + 1 - 0.1*0.10 = 1.99 vs 1 + 0.5 - 0.1*0.05 = 1.495: gap 0.495 >= 0.2
    c, rj, why = w.pair([cand(1, 0.5, 5), cand(1, 1, 10)])
    assert (c, rj) == (1, 0) and why.startswith("weighted")
    assert w.pair([cand(1, 1, 10), cand(1, 1, 30)]) is None  # gap 0.02 < 0.2


def test_pack_pairs_layout():
    enc = [{"ctx": [1, 2], "chosen": [3], "rejected": [4, 5], "ref_chosen": -1.0, "ref_rejected": -2.0}]
    b = pack_pairs(enc)
    assert b["input_ids"].tolist() == [[1, 2, 3, 1, 2, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert b["labels"].tolist() == [[-100, -100, 3, -100, -100, 4, 5]]
    assert b["seq_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1]]
    assert b["chosen_len"].tolist() == [1] and b["rejected_len"].tolist() == [2]


def test_no_length_preference_between_broken_responses():
    r = Ranking(min_length_gap=4)
    broken = [dict(cand(0, 0, 5), valid=False), dict(cand(0, 0, 40), valid=False)]
    assert r.pair(broken) is None
    # A step cut by the token limit is not "shorter is better" material either.
    cut = [dict(cand(1, 1, 10), stopped=True), dict(cand(1, 1, 96), stopped=False)]
    assert r.pair(cut) is None
    # Quality still decides between a valid and a broken response.
    assert r.pair([dict(cand(0, 0, 5), valid=False), cand(1, 1, 40)]) == (1, 0, "safety")
    assert RuleJudge(RB).score(HARMFUL, "junk", 3).valid is False


def test_no_pair_prefers_an_unacceptable_response():
    r = Ranking(min_length_gap=4)
    # Two unsafe answers of different lengths: no length pair (its chosen side would be unsafe).
    assert r.pair([cand(0, 0.75, 40), cand(0, 0.75, 10)]) is None
    # Two over-refusals of a benign request (utility 0): no length pair either.
    assert r.pair([cand(1, 0, 40), cand(1, 0, 10)]) is None
    # Two unsafe answers where one has the right category: no utility pair.
    assert r.pair([cand(0, 0.5, 10), cand(0, 1.0, 10)]) is None
    # Safe and useful: the length pair is made; the thresholds are settable.
    assert r.pair([cand(1, 0.5, 40), cand(1, 0.5, 10)]) == (1, 0, "efficiency")
    assert Ranking(min_efficiency_utility=0.75).pair([cand(1, 0.5, 40), cand(1, 0.5, 10)]) is None
    assert Ranking(min_chosen_safety=0.0, min_efficiency_utility=0.0).pair([cand(0, 0, 40), cand(0, 0, 10)]) == (1, 0, "efficiency")
    # A safety gap still makes a pair whatever the utility.
    assert r.pair([cand(0, 0.75, 10), cand(1, 0.25, 40)]) == (1, 0, "safety")
    w = Ranking(scoring="weighted", margin=0.2)
    assert w.pair([cand(0, 1, 5), cand(0, 0, 10)]) is None


def test_safety_pairs_repeat_within_each_epoch():
    pairs = [{"why": why, "id": i} for i, why in enumerate(("safety", "utility", "efficiency", "utility"))]
    data = PairData(pairs, tokenizer=None, seed=3, safety_repeats=3)
    assert len(data) == 6
    for epoch in range(2):
        ids = [data.pairs[i]["id"] for i in data.global_batch(epoch, 6)]
        assert sorted(ids) == [0, 0, 0, 1, 2, 3]
    assert len(PairData(pairs, tokenizer=None, seed=3)) == 4


def test_a_pairs_place_in_an_epoch_depends_on_the_pair_not_on_the_others():
    pairs = [{"prompt_id": f"p{i}", "prompt": f"q{i}", "step": "rules", "prefix": "", "chosen_text": f"c{i}",
              "rejected_text": f"r{i}", "why": "safety" if i % 5 == 0 else "efficiency"} for i in range(40)]

    def epoch_order(ps, epoch=0, seed=3):
        data = PairData(ps, tokenizer=None, seed=seed, safety_repeats=2)
        return [data.pairs[i]["prompt_id"] for i in data.global_batch(epoch, len(data))]

    full = epoch_order(pairs)
    assert sorted(full) == sorted([p["prompt_id"] for p in pairs] + [f"p{i}" for i in range(0, 40, 5)])
    # Given in another order, the same pairs train in the same order.
    assert epoch_order(pairs[::-1]) == full
    # One pair fewer, or one changed: every other pair keeps its place relative to the rest.
    assert epoch_order(pairs[:17] + pairs[18:]) == [i for i in full if i != "p17"]
    changed = [dict(p, rejected_text="other") if p["prompt_id"] == "p17" else p for p in pairs]
    assert [i for i in epoch_order(changed) if i != "p17"] == [i for i in full if i != "p17"]
    assert epoch_order(changed) != full
    # Epochs and seeds order differently.
    assert epoch_order(pairs, epoch=1) != full and epoch_order(pairs, seed=4) != full


class _CountingTokenizer:
    """A tokenizer whose ``encode`` and ``apply_chat_template`` calls are counted."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.encode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_pairs_are_tokenized_once_and_as_before(tiny_model_dir):
    """tokenize_all tokenizes each given pair once (a safety pair repeated 3 times too); steps then
    only pack, with no tokenizer call; the ids are step_sequence's, the micro-batches those of the
    pairs tokenized anew."""
    import torch

    from safer_dist.erpo.pairs import step_sequence
    from safer_dist.train.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    pairs = [{"prompt": f"How do I bake bread {i}?", "prefix": "<ex_ante>" if i % 2 else "",
              "step": "answer" if i == 2 else "rules", "chosen_text": f"ok {i}", "rejected_text": f"no way {i}",
              "ref_chosen": -1.0 - i, "ref_rejected": -2.0 - i, "why": "safety" if i == 0 else "utility"}
             for i in range(3)]
    counting = _CountingTokenizer(tok)
    data = PairData(pairs, counting, seed=3, safety_repeats=3, share_prefix=True).tokenize_all()
    assert len(data) == 5
    once = counting.calls
    sizes = dict(global_batch_size=4, rank=0, world_size=1, micro_batch_size=2)
    batches = [data.micro_batches(step, **sizes) for step in range(3)]
    assert counting.calls == once  # packing only
    assert [data.encode(i) for i in range(5)] == [data.encode(i) for i in range(5)]
    for i in range(5):
        r = data.pairs[i]
        ctx, chosen = step_sequence(tok, r["prompt"], r["prefix"], r["chosen_text"], r["step"] == "answer")
        _, rejected = step_sequence(tok, r["prompt"], r["prefix"], r["rejected_text"], r["step"] == "answer")
        assert data.encode(i) == {"ctx": ctx, "chosen": chosen, "rejected": rejected,
                                  "ref_chosen": r["ref_chosen"], "ref_rejected": r["ref_rejected"]}
    eos = tok.eos_token_id  # only the answer step (pair 2, the last of the 5) ends with EOS
    assert data.encode(0)["chosen"][-1] != eos and data.encode(4)["chosen"][-1] == eos
    fresh = PairData(pairs, tok, seed=3, safety_repeats=3, share_prefix=True)
    for step, got in enumerate(batches):
        for a, b in zip(got, fresh.micro_batches(step, **sizes)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_pairs_share_prefix_needs_a_learner_set_up_for_it(tmp_path):
    from safer_dist.config import DataSection, LearnerSection, ModelSection, TrainSection
    from safer_dist.train.learner import Learner

    learner = Learner(LearnerSection(), TrainSection(), ModelSection(), DataSection(), seed=0, device="cpu")
    learner.share_prefix = False  # as set-up decides for erpo.loss.share_prefix=false
    with pytest.raises(ValueError, match="set up without prefix sharing"):
        learner.load_pairs(str(tmp_path / "pairs.jsonl"), 0, share_prefix=True)
