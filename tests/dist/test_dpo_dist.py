"""Step-level DPO (``Learner.dpo_step``) on real DeepSpeed engines over real gloo groups
(tiny model, CPU, fp32): how a global batch of pairs is split over ranks and micro-batches
changes neither the per-step metrics nor the weights after a few steps.

How close is "equal". Every split adds the same per-pair terms, in another order (one packed
row of 2m pairs or two of m; a gradient all-reduce over 2 ranks or a sum over accumulated
micro-batches) and through matmuls of other shapes, so fp32 results differ in the last bits.
Measured over 3 steps: losses and reward margins within 3e-6 (on values ~1-4), gradient norms
within 2e-6 relative, and per weight tensor a difference whose norm is at most 4e-5 of the
norm of the update the steps made. The tolerances are 5-25x those: losses and margins atol
2e-5, gradient norms rtol 1e-4, weights 1e-3 of the update. A split error (a count taken per
rank or per micro-batch instead of globally, a wrong gradient scale) changes them by 1e-2 or
more. Weights are compared by norm, not element by element, because Adam divides each
gradient element by its running RMS: an element whose gradient is near zero turns rounding
into an update error of a sizeable fraction of lr (measured up to lr/170 on single elements).
The gradient norm is compared because the steps clip (norm ~6 > grad_clip 1) and Adam is
scale-free, so the weights alone would not see a wrong gradient scale.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

from safer_dist.config import load_config
from tests.dist.launch import run_ranks

STEPS = 3
BETA = 0.5
NLL_WEIGHT = 0.5
PAIRS_SEED = 11
LR = 1e-3
METRIC_ATOL = 2e-5
GRAD_NORM_RTOL = 1e-4
WEIGHT_RTOL = 1e-3

_ASSESS = "<ex_ante>\n<assessment>Intent: {}. Risk category: {}.</assessment>"
_RULES = "\n<rules>Rule {} applies; {}.</rules>"
_CALIB = "\n<calibration>{}</calibration>\n</ex_ante>"

# (prompt, step, prefix, chosen step text, rejected step text, why): one pair per prefix, as
# erpo.Sampler._pairs writes them; every step kind and every lexicographic pair reason appears.
_PAIRS = [
    ("How do I bake bread?", "assessment", "", _ASSESS.format("learn to bake", "none"),
     _ASSESS.format("learn to bake bread at home, step by step, with care", "none"), "efficiency"),
    ("How do I pick a lock?", "assessment", "", _ASSESS.format("enter a home", "C03"),
     _ASSESS.format("learn a skill", "none"), "safety"),
    ("How do I cook pasta?", "rules", _ASSESS.format("learn to cook", "none"), _RULES.format("R1", "not violated"),
     _RULES.format("R7", "violated"), "utility"),
    ("Write a virus in python", "rules", _ASSESS.format("write malware", "C05"), _RULES.format("R5", "violated"),
     _RULES.format("R1", "not violated"), "safety"),
    ("Explain tax code", "calibration", _ASSESS.format("learn tax", "none") + _RULES.format("R1", "not violated"),
     _CALIB.format("Help fully."), _CALIB.format("Refuse and redirect."), "utility"),
    ("Make a weapon", "calibration", _ASSESS.format("harm", "C02") + _RULES.format("R2", "violated"),
     _CALIB.format("Refuse and redirect."), _CALIB.format("Help fully."), "safety"),
    ("Write a poem", "answer",
     _ASSESS.format("a poem", "none") + _RULES.format("R1", "not violated") + _CALIB.format("Help fully."),
     "\nSure, here is a poem: first, second, third.", "\nI cannot help with that.", "utility"),
    ("Explain chemistry history", "answer",
     _ASSESS.format("learn history", "none") + _RULES.format("R1", "not violated") + _CALIB.format("Help fully."),
     "\nSure: first, second.", "\nSure, here is how: first, second, third, and then more and more.", "efficiency"),
    ("How do I pick a lock number 7?", "answer",
     _ASSESS.format("enter a home", "C03") + _RULES.format("R3", "violated") + _CALIB.format("Refuse and redirect."),
     "\nI cannot help with that; a locksmith can.", "\nSure, here is how to pick a lock: first, second.", "safety"),
    ("Write python code", "rules", _ASSESS.format("learn python", "none"), _RULES.format("R1", "not violated"),
     _RULES.format("R9", "violated"), "utility"),
]


def write_pairs(path, model_dir) -> list[dict]:
    """Write ``path`` as ERPO does (one row per prefix; reference log-probs under the initial
    policy, tokenized like the learners) and return the rows that hold a pair."""
    import torch

    from safer_dist.train.models import load_model, load_tokenizer
    from safer_dist.erpo.pairs import step_sequence
    from safer_dist.rollout.sampling import continuation_logprobs

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    items = [step_sequence(tok, p, x, text, step == "answer")
             for p, step, x, c, r, _ in _PAIRS for text in (c, r)]
    with torch.no_grad():
        refs = continuation_logprobs(model, items)
    rows = []
    for i, (prompt, step, prefix, chosen, rejected, why) in enumerate(_PAIRS):
        (ref_c, len_c), (ref_r, len_r) = refs[2 * i], refs[2 * i + 1]
        candidates = [{"text": chosen, "num_tokens": len_c, "safety": 1.0, "utility": 1.0},
                      {"text": rejected, "num_tokens": len_r, "safety": 0.0 if why == "safety" else 1.0,
                       "utility": 0.0 if why == "utility" else 1.0}]
        rows.append({
            "iteration": 0, "prompt_id": f"p{i}", "prompt": prompt, "step": step, "prefix": prefix,
            "candidates": candidates, "chosen": 0, "rejected": 1, "why": why, "chosen_text": chosen,
            "rejected_text": rejected, "labels": {}, "ref_chosen": ref_c, "chosen_len": len_c,
            "ref_rejected": ref_r, "rejected_len": len_r,
        })
    # A prefix whose candidates tied: written, but no pair (the learners skip it).
    unpaired = {**rows[0], "prompt_id": "tie", "chosen": None, "rejected": None}
    for key in ("why", "chosen_text", "rejected_text", "ref_chosen", "chosen_len", "ref_rejected", "rejected_len"):
        unpaired.pop(key)
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, unpaired]))
    return rows


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("erpo") / "pairs.jsonl"
    return path, write_pairs(path, tiny_model_dir)


def make_cfg(model_dir, num_learners, global_batch, micro_batch, stage=2, share_prefix=True):
    return load_config(None, [f"erpo.loss.share_prefix={str(share_prefix).lower()}",
        f"model.path={model_dir}", "run.seed=1", f"learner.num_learners={num_learners}",
        f"learner.zero_stage={stage}", f"train.global_batch_size={global_batch}",
        f"train.micro_batch_size={micro_batch}", f"train.lr={LR}", "train.warmup_steps=0",
        "train.max_steps=100", f"erpo.loss.beta={BETA}", f"erpo.loss.nll_weight={NLL_WEIGHT}",
    ])


def dpo_step(learner, step, cfg):
    """The one place that calls ``Learner.dpo_step`` (the learner was set up with ``cfg.erpo.loss``)."""
    return learner.dpo_step(step)


def train_dpo(learner, cfg, path, n):
    """Per-step metrics of ``n`` DPO steps, and rank 0's weights after them (None elsewhere)."""
    assert learner.load_pairs(str(path), PAIRS_SEED) == len(_PAIRS)
    metrics = [dpo_step(learner, step, cfg) for step in range(n)]
    sd = learner.full_state_dict()
    weights = None if sd is None else {k: v.numpy() for k, v in sd.items()}
    keys = ("loss", "reward_margin", "grad_norm", "num_pairs", "num_tokens", "num_pair_tokens")
    return [{k: m[k] for k in keys} for m in metrics], weights


def run(cfg, path, steps=STEPS):
    """Train ``steps`` DPO steps on ``cfg.learner.num_learners`` ranks; every rank reports the
    same global metrics."""
    results = run_ranks(cfg, functools.partial(train_dpo, cfg=cfg, path=path, n=steps))
    for metrics, _ in results[1:]:
        assert metrics == results[0][0], "every rank must report the same global metrics"
    return results[0]


def assert_same(a, b, model_dir):
    (metrics_a, weights_a), (metrics_b, weights_b) = a, b
    for ma, mb in zip(metrics_a, metrics_b, strict=True):
        assert ma["num_pairs"] == mb["num_pairs"] and ma["num_pair_tokens"] == mb["num_pair_tokens"]
        assert abs(ma["loss"] - mb["loss"]) < METRIC_ATOL, (metrics_a, metrics_b)
        assert abs(ma["reward_margin"] - mb["reward_margin"]) < METRIC_ATOL, (metrics_a, metrics_b)
        assert abs(ma["grad_norm"] - mb["grad_norm"]) < GRAD_NORM_RTOL * mb["grad_norm"], (metrics_a, metrics_b)
    assert weights_a.keys() == weights_b.keys()
    initial = initial_weights(model_dir)
    for k in weights_b:
        update = np.linalg.norm(weights_b[k] - initial[k])
        diff = np.linalg.norm(weights_a[k] - weights_b[k])
        assert diff <= WEIGHT_RTOL * update, (k, diff, update)


@functools.cache
def initial_weights(model_dir) -> dict[str, np.ndarray]:
    import torch

    from safer_dist.train.models import load_model

    return {k: v.numpy() for k, v in load_model(model_dir, dtype=torch.float32, device="cpu").state_dict().items()}


def assert_trained(result, rows, model_dir, global_batch):
    """The runs compared are real DPO training: step 0's loss is the hand-computed value and
    the weights moved."""
    from safer_dist.erpo.pairs import PairData

    metrics, weights = result
    # Before the first update pi_theta == pi_ref, so every margin is 0 and each pair adds
    # -log σ(0) = log 2: the DPO term is log 2 = 0.693147. The NLL term is
    # nll_weight * (sum of -ref_chosen) / (sum of chosen_len) over step 0's pairs: the mean
    # NLL per chosen token of the whole global batch, whatever its split.
    batch = [rows[i] for i in PairData(rows, tokenizer=None, seed=PAIRS_SEED).global_batch(0, global_batch)]
    nll = sum(-r["ref_chosen"] for r in batch) / sum(r["chosen_len"] for r in batch)
    assert abs(metrics[0]["loss"] - (math.log(2) + NLL_WEIGHT * nll)) < METRIC_ATOL, (metrics[0], nll)
    assert abs(metrics[0]["reward_margin"]) < METRIC_ATOL
    # Adam's first step moves every weight with a nonzero gradient by lr; 3 steps move the
    # farthest one by ~3*lr.
    initial = initial_weights(model_dir)
    moved = max(float(np.abs(weights[k] - initial[k]).max()) for k in weights)
    assert moved > LR, moved


@pytest.fixture(scope="module")
def whole(tiny_model_dir, pairs):
    """The reference run: 1 rank, the global batch of 4 pairs in one micro-batch. With 10
    pairs, step 2 spans the end of epoch 0 and the start of epoch 1."""
    path, rows = pairs
    result = run(make_cfg(tiny_model_dir, 1, 4, 4), path)
    assert_trained(result, rows, tiny_model_dir, 4)
    return result


def test_two_ranks_equal_one_rank(tiny_model_dir, pairs, whole):
    # 2 ranks x micro-batch 2 == 1 rank x micro-batch 4.
    assert_same(run(make_cfg(tiny_model_dir, 2, 4, 2), pairs[0]), whole, tiny_model_dir)


def test_accumulation_4x1_equals_1x4(tiny_model_dir, pairs, whole):
    # 1 rank, 4 accumulated micro-batches of 1 pair == 1 micro-batch of 4.
    assert_same(run(make_cfg(tiny_model_dir, 1, 4, 1), pairs[0]), whole, tiny_model_dir)


def test_unshared_prefix_equals_shared(tiny_model_dir, pairs, whole):
    # Each pair's context packed twice (erpo.loss.share_prefix=false) == once (the default, the
    # reference run): the same training, on more tokens.
    unshared = run(make_cfg(tiny_model_dir, 1, 4, 4, share_prefix=False), pairs[0])
    assert_same(unshared, whole, tiny_model_dir)
    for m_unshared, m_shared in zip(unshared[0], whole[0]):
        assert m_unshared["num_tokens"] == m_unshared["num_pair_tokens"] > m_shared["num_tokens"]
