"""ERPO parts on real Ray actors: step sampling stops at the closing tag, weight sync makes a
rollout worker's logits equal the learner's (ZeRO-2 and ZeRO-3), and reference log-probs from
a rollout worker equal the learner's log-probs before any update."""

from __future__ import annotations

import json

import pytest
import torch

from safer_dist.config import load_config
from safer_dist.cluster.group import LearnerGroup
from safer_dist.cluster.rollout import RolloutGroup
from safer_dist.rollout.worker import RolloutWorker


def cfg_for(model_dir, data_dir, tmp_path, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train={data_dir / 'sft.jsonl'}", "data.max_seq_len=256",
        f"run.output_dir={tmp_path}", "train.max_steps=5", "train.warmup_steps=0", "train.lr=5e-3",
        "train.global_batch_size=8", "train.micro_batch_size=4", "learner.num_learners=2",
        "rollout.num_workers=2", "launch.device=cpu", *extra,
    ])


def test_step_sampling_stops_at_the_stop_string(tiny_model_dir):
    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    w = RolloutWorker(cfg.model, cfg.rollout, device="cpu")
    items = [("How do I bake bread?", "<ex_ante>\n<assessment>")]
    (free,) = w.sample(items, n=1, stop_strings=None, max_new_tokens=12, temperature=0.0)
    text = free[0]["text"]
    # Stop at the text the model produces as its 4th token: greedy output must end right there.
    ids = w.tokenizer.encode(text, add_special_tokens=False)
    stop = w.tokenizer.decode(ids[3:4])
    assert stop.strip(), "need a visible stop string"
    (cut,) = w.sample(items, n=3, stop_strings=[stop], max_new_tokens=12, temperature=0.0)
    for c in cut:
        assert c["stopped"] and c["text"].endswith(stop) and text.startswith(c["text"])
        assert c["num_tokens"] < 12


@pytest.mark.parametrize("stage", [2, 3])
def test_weight_sync_rollout_logits_equal_learner(ray_local, tiny_model_dir, demo_data_dir, tmp_path, stage):
    cfg = cfg_for(tiny_model_dir, demo_data_dir, tmp_path, f"learner.zero_stage={stage}")
    learners = LearnerGroup(cfg)
    rollout = RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu")
    try:
        learners.connect_weight_sync(rollout)
        for step in range(3):  # move the learner away from the weights the workers loaded
            learners.sft_step(step)
        ids = list(range(5, 25))
        want = learners.logits(ids)
        before = ray_local.get(rollout.workers[0].logits.remote(ids))
        assert not torch.allclose(before, want), "training must have changed the weights"
        learners.push_weights(rollout, version=7)
        for w in rollout.workers:
            got = ray_local.get(w.logits.remote(ids))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert ray_local.get(w.__ray_call__.remote(lambda self: self.version)) == 7
    finally:
        rollout.shutdown()
        learners.shutdown()


def test_weight_sync_refuses_weights_of_another_dtype(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, demo_data_dir, tmp_path, "rollout.num_workers=1")
    learners = LearnerGroup(cfg)  # fp32 on CPU
    bf16 = load_config(None, [f"model.path={tiny_model_dir}", "model.dtype=bfloat16", "rollout.num_workers=1"])
    rollout = RolloutGroup(bf16.model, bf16.rollout, path=str(tiny_model_dir), device="cpu")
    try:
        learners.connect_weight_sync(rollout)
        with pytest.raises(ValueError, match=r"weight sync version 3: the learners send dtype:elements torch.float32:"
                                             r"\d+, this rollout worker holds torch.bfloat16:\d+"):
            learners.push_weights(rollout, version=3)
    finally:
        rollout.shutdown()
        learners.shutdown()


def test_reference_logprobs_equal_learner_before_update(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, demo_data_dir, tmp_path, "learner.zero_stage=2", "erpo.optim.global_batch_size=4",
                  "erpo.optim.micro_batch_size=2", "erpo.loss.beta=0.5")
    rollout = RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu")
    items = [("bake bread", "<ex_ante>\n<assessment>x</assessment>", "\n<rules>a</rules>", False),
             ("bake bread", "<ex_ante>\n<assessment>x</assessment>", "\n<rules>b c d</rules>", False),
             ("cook pasta", "", "<ex_ante>\n<assessment>y</assessment>", False),
             ("cook pasta", "", "<ex_ante>\n<assessment>z z</assessment>", False),
             ("write a poem", "<ex_ante>\n<assessment>p</assessment>\n<rules>q</rules>\n<calibration>r</calibration>\n</ex_ante>", "\nSure.", True),
             ("write a poem", "<ex_ante>\n<assessment>p</assessment>\n<rules>q</rules>\n<calibration>r</calibration>\n</ex_ante>", "\nNo.", True),
             ("python code", "", "<ex_ante>\n<assessment>q</assessment>", False),
             ("python code", "", "<ex_ante>", False)]
    refs = rollout.logprobs(items)
    rollout.shutdown()
    steps = {True: "answer", False: "rules"}
    rows = []
    for i in range(0, len(items), 2):
        (p, x, c, eos), (_, _, r, _) = items[i], items[i + 1]
        rows.append({"prompt": p, "prefix": x, "step": steps[eos], "chosen": 0, "rejected": 1, "chosen_text": c,
                     "rejected_text": r, "ref_chosen": refs[i][0], "ref_rejected": refs[i + 1][0]})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    learners = LearnerGroup(cfg, optim=cfg.erpo.optim, model_path=str(tiny_model_dir), dpo_loss=cfg.erpo.loss)
    try:
        # The learners' chunked loss head against the rollout workers' full logits.
        assert learners.info["loss_head"] == "chunked"
        assert learners.load_pairs(str(path), seed=0) == 4
        m = learners.dpo_step(0)
    finally:
        learners.shutdown()
    # pi_theta == pi_ref before the first update: every implicit reward is 0 and the loss is log 2.
    assert abs(m["reward_chosen"]) < 1e-6 and abs(m["reward_rejected"]) < 1e-6
    assert abs(m["loss"] - 0.6931471805599453) < 1e-6


def test_model_judge_runs_on_rollout_workers(ray_local, tiny_model_dir):
    from safer_dist.judging.judge import ModelJudge

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "rollout.num_workers=2", "launch.device=cpu"])
    workers = RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu")
    try:
        judge = ModelJudge(workers, template="Q: {prompt}\nA: {response}\nsafety: ", max_new_tokens=6)
        items = [({"prompt": f"question {i}"}, f"answer {i}", 10 + i) for i in range(5)]
        scores = judge.score_many(items)
    finally:
        workers.shutdown()
    assert len(scores) == 5
    for (_, _, n), s in zip(items, scores):
        # An untrained judge model cannot produce a verdict: scored 0 with the reason, never an exception.
        assert s.efficiency == -n and 0.0 <= s.safety <= 1.0 and s.reason
        assert s.reason.startswith(("unparseable judge output", "model judge"))
