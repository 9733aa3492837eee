"""Placement on a real local Ray cluster (4 CPUs): colocated rollout workers (CPU bundles shared
with the learners) give the same ERPO run as separate ones, and what cannot be placed or does not
answer fails within its deadline, naming the resource or the worker."""

from __future__ import annotations

import json
import time

import pytest

from safer_dist.cluster.placement import Cluster, PlacementError, placement
from safer_dist.cluster.rollout import RolloutGroup
from safer_dist.rollout.worker import RolloutFailure
from safer_dist.config import load_config
from safer_dist.runtime.metrics import read_metrics


def _erpo_cfg(model_dir, data_dir, tmp_path, name, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"erpo.init_from={model_dir}", f"data.train={data_dir / 'sft.jsonl'}",
        f"data.erpo_prompts={data_dir / 'erpo_prompts.jsonl'}", "data.max_seq_len=256", f"run.output_dir={tmp_path}",
        f"run.name={name}", "launch.device=cpu", "learner.num_learners=1", "rollout.num_workers=1",
        "erpo.iterations=2", "erpo.prompts_per_iteration=4", "erpo.chunk_size=4", "erpo.num_candidates=3",
        "erpo.steps=assessment", "erpo.step_max_new_tokens=12", "erpo.answer_max_new_tokens=12",
        "erpo.epochs=1", "erpo.optim.global_batch_size=2", "erpo.optim.micro_batch_size=1",
        "checkpoint.every_steps=0", *extra,
    ])


class LengthParityJudge:
    """Safety 1 for a candidate of an even number of tokens, else 0: an untrained model's output
    is never a valid trace (the rule judge scores it all 0, so there would be no pairs), and this
    makes pairs that depend on the sampled candidates alone."""

    def __init__(self, rulebook):
        pass

    def score_many(self, items):
        from safer_dist.judging.judge import Score

        return [Score(float(n % 2 == 0), 0.0, -float(n), "length parity") for _, _, n in items]


def test_colocated_and_separate_erpo_give_identical_pairs_and_losses(ray_local, tiny_model_dir, demo_data_dir,
                                                                     tmp_path, monkeypatch):
    from safer_dist import jobs
    from safer_dist.jobs import erpo_job

    monkeypatch.setattr(jobs, "RuleJudge", LengthParityJudge)
    runs = {}
    for mode in ("separate", "colocate"):
        cfg = _erpo_cfg(tiny_model_dir, demo_data_dir, tmp_path, mode, f"rollout.placement={mode}")
        # colocate: one shared placement group, its bundles {CPU: 2} holding a learner and a worker
        assert [len(g.bundles) for g in placement(cfg, "erpo", Cluster.from_ray()).phase("erpo").groups] == \
            ([1, 1] if mode == "separate" else [1])
        erpo_job(cfg, keep_ray=True)
        run = tmp_path / mode
        pairs = [(run / "erpo" / f"iter_{t}" / "pairs.jsonl").read_text() for t in (0, 1)]
        losses = [(m["step"], m["loss"]) for m in read_metrics(run / "metrics.jsonl", "erpo")]
        runs[mode] = pairs, losses
    pairs, losses = runs["separate"]
    # iteration 1 samples with the weights the learners sent after iteration 0: the weight sync
    # to colocated workers (gloo on CPU) delivered the same weights
    assert any(json.loads(r)["chosen"] is not None for r in pairs[1].splitlines()), "no pairs: nothing was compared"
    assert losses, "no step-DPO steps: nothing was compared"
    assert runs["colocate"] == (pairs, losses)


def test_a_placement_group_that_cannot_be_placed_fails_within_its_deadline(ray_local, tiny_model_dir):
    # 2 workers x 3 CPUs on a 4-CPU cluster: the second bundle never fits
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "rollout.num_workers=2", "rollout.cpus_per_worker=3",
                             "rollout.placement_timeout_s=2", "launch.device=cpu"])
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu", name="policy rollout")
    assert time.monotonic() - t0 < 30
    assert str(err.value) == (
        "the policy rollout placement group needs {CPU=3} x 2 (PACK) and was not ready within "
        "rollout.placement_timeout_s=2 s; the Ray cluster has GPU=0, CPU=4 free"
    )


def test_a_rollout_call_that_does_not_answer_fails_within_its_deadline(ray_local, tiny_model_dir):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "rollout.num_workers=2", "rollout.call_timeout_s=2",
                             "launch.device=cpu"])
    group = RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu")
    try:
        ray_local.get([w.weights_version.remote() for w in group.workers])  # both loaded the model

        def hang(worker, shard):  # worker 1 hangs (a stand-in for a stuck generate), worker 0 answers
            wait_s = 60 if shard == [1] else 0
            return worker.__ray_call__.remote(lambda self, n: (time.sleep(n), [0] * len(shard))[1], wait_s)

        t0 = time.monotonic()
        with pytest.raises(RolloutFailure, match=r"rollout worker\(s\) \[1\] did not answer hang within "
                                                 r"rollout.call_timeout_s=2 s"):
            group._map("hang", hang, [0, 1])
        assert time.monotonic() - t0 < 30
    finally:
        group.shutdown()


def test_a_job_that_cannot_be_placed_is_refused_before_the_run_dir_is_written(ray_local, tiny_model_dir,
                                                                              demo_data_dir, tmp_path):
    from safer_dist.jobs import erpo_job

    # 1 learner x 3 CPUs + 1 worker x 3 CPUs: 6 CPUs on a 4-CPU cluster
    cfg = _erpo_cfg(tiny_model_dir, demo_data_dir, tmp_path, "refused", "learner.cpus_per_learner=3",
                    "rollout.cpus_per_worker=3")
    with pytest.raises(PlacementError, match=r"the erpo stage cannot be placed on the Ray cluster .* erpo: the "
                                             r"policy rollout placement group .* the cluster has GPU=0, CPU=1 free"):
        erpo_job(cfg, keep_ray=True)
    assert not (tmp_path / "refused").exists()
