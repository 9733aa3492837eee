"""judge.kind=classifier on real Ray rollout workers: a sequence-classification judge's labels come
back through ``RolloutGroup.classify`` in the order of the items, whatever worker held them."""

from __future__ import annotations

from safer_dist.cluster.rollout import RolloutGroup
from safer_dist.config import load_config
from safer_dist.judging.classifier import ClassifierJudge
from safer_dist.reasoning.rules import Rulebook
from tests.judge_models import constant_sequence_guard


def test_a_sequence_classifier_judges_on_rollout_workers(ray_local, tmp_path):
    path = constant_sequence_guard(tmp_path, 1)  # always "unsafe"
    cfg = load_config(None, [f"model.path={path}", "rollout.num_workers=2", "launch.device=cpu"])
    workers = RolloutGroup(cfg.model, cfg.rollout, path=str(path), device="cpu", head="sequence")
    try:
        judge = ClassifierJudge(workers, Rulebook.load("configs/rules/default.yaml"), head="sequence")
        items = [({"prompt": f"request {i}", "harmful": i % 2 == 0}, f"answer {i}", 10 + i) for i in range(5)]
        scores = judge.score_many(items)
    finally:
        workers.shutdown()
    # harmful (even) items: the classifier's "unsafe"; benign ones: the rule judge's (an invalid trace)
    assert [s.reason.split(";")[0] for s in scores[::2]] == ["classifier: unsafe"] * 3
    assert all(s.safety == 0.0 for s in scores)
    assert [s.efficiency for s in scores] == [-10.0, -11.0, -12.0, -13.0, -14.0]
    assert not any(s.reason.startswith("classifier") for s in scores[1::2])
