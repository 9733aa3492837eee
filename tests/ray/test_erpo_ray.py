"""ERPO parts on real Ray actors: step sampling stops at the closing tag, weight sync makes a
rollout worker's logits equal the learner's (ZeRO-2 and ZeRO-3), reference log-probs from
a rollout worker equal the learner's log-probs before any update, and an iteration's pairs and a
sampled evaluation's answers do not depend on how many rollout workers sampled them."""

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


class ParityJudge:
    """Safety 1 for a response with an even number of "e"s, else 0: the untrained test model
    writes no Ex-Ante trace the rule judge would rank, and pairs need a gap."""

    def score_many(self, items):
        from safer_dist.judging.judge import Score

        return [Score(float(resp.count("e") % 2 == 0), 1.0, -float(n), "parity", valid=True) for _, resp, n in items]


def _pairs_with(tiny_model_dir, data_dir, out_dir, *overrides) -> list[dict]:
    from safer_dist.erpo.controller import Sampler, sample_iteration
    from safer_dist.data.records import load_records, read_jsonl

    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", f"data.erpo_prompts={data_dir / 'erpo_prompts.jsonl'}", "launch.device=cpu",
        "erpo.prompts_per_iteration=7", "erpo.num_candidates=3", "erpo.step_max_new_tokens=8",
        "erpo.answer_max_new_tokens=8", "erpo.max_new_tokens=12", "rollout.temperature=1.0", *overrides,
    ])
    rollout = RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu")
    try:
        sampler = Sampler(cfg, rollout, ParityJudge())
        path = sample_iteration(cfg, sampler, list(load_records(cfg.data.erpo_prompts, "prompts")), 0, out_dir)
    finally:
        rollout.shutdown()
    return read_jsonl(path)


def test_pairs_do_not_depend_on_the_number_of_rollout_workers(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    # 1, 2 and 3 workers get other shards of every call (interleaved), and another batch size mixes
    # other rows in a batch: the pairs file is the same.
    runs = [_pairs_with(tiny_model_dir, demo_data_dir, tmp_path / f"w{w}", f"rollout.num_workers={w}", *extra)
            for w, extra in ((1, ()), (2, ("rollout.batch_size=5",)), (3, ()))]
    one = runs[0]
    texts = [c["text"] for r in one for c in r["candidates"]]
    assert len(one) >= 7 and len(set(texts)) > len(texts) // 2, "seeded candidates must differ"
    assert sum(r["chosen"] is not None for r in one) >= 3, "pairs (and their reference log-probs) must be made"
    for other in runs[1:]:
        assert len(other) == len(one)
        # Reference log-probs too, bit for bit: a prefix's items go to one worker, which packs
        # them as one tree (RolloutGroup.logprobs).
        assert other == one
    # The seed matters: another run seed draws other candidates.
    reseeded = _pairs_with(tiny_model_dir, demo_data_dir, tmp_path / "seed1", "run.seed=1")
    assert [c["text"] for r in reseeded for c in r["candidates"]] != texts


def _eval_answers(tiny_model_dir, workers: int, seed: int) -> list[str]:
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"rollout.num_workers={workers}", "launch.device=cpu"])
    rollout = RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu")
    prompts = ["bake bread", "How do I write a poem about python code, number 7?", "tax", "a cat story", "why?"]
    try:
        gens = rollout.generate(prompts, max_new_tokens=10, temperature=1.0, batch_size=2, seed=seed)
    finally:
        rollout.shutdown()
    return [g["text"] for g in gens]


def test_sampled_evaluation_does_not_depend_on_the_number_of_rollout_workers(ray_local, tiny_model_dir):
    # The workers get other shards of the prompts (dealt out in turn), batched two at a time.
    one = _eval_answers(tiny_model_dir, 1, seed=0)
    assert len(set(one)) == len(one), one
    assert _eval_answers(tiny_model_dir, 2, seed=0) == one
    assert _eval_answers(tiny_model_dir, 3, seed=0) == one
    assert _eval_answers(tiny_model_dir, 2, seed=1) != one


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
