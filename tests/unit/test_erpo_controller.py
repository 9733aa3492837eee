"""``train_erpo`` end to end with in-process fake groups (no Ray, no DeepSpeed): the iteration
loop, what it hands the learners and rollout workers, checkpoints, and resume."""

from __future__ import annotations

import json
import math
import os

import pytest
from test_erpo_sampler import HARMFUL, RB, ScriptedRollout

from safer_dist.checkpointing.checkpoint import CheckpointError
from safer_dist.config import Config
from safer_dist.data.records import write_jsonl
from safer_dist.erpo.controller import train_erpo
from safer_dist.judging.judge import RuleJudge


class FakeLearners:
    """Records the controller's calls; checkpoints are one file per rank."""

    world_size = 2
    # what each rank reports at set-up: 1000 non-embedding parameters, 1 TFLOP/s peak
    infos = [{"num_params_non_embedding": 1000, "peak_flops": 1e12}] * 2

    def __init__(self):
        self.calls: list[tuple] = []
        self.last_checkpoint = None
        self.pairs = 0

    def connect_weight_sync(self, rollout):
        self.calls.append(("connect",))

    def push_weights(self, rollout, version):
        self.calls.append(("push", version))

    def load_pairs(self, path, seed, safety_repeats):
        rows = [json.loads(x) for x in open(path)]
        chosen = [r for r in rows if r["chosen"] is not None]
        self.pairs = sum(safety_repeats if r["why"] == "safety" else 1 for r in chosen)
        self.calls.append(("load_pairs", path, safety_repeats))
        return self.pairs

    def dpo_step(self, step):
        self.calls.append(("dpo_step", step))
        return {"loss": 0.5, "reward_margin": 0.1, "preference_accuracy": 1.0, "num_tokens": 100}

    def save_checkpoint(self, root, tag, client_state, hash_files=True):
        for rank in range(self.world_size):
            path = f"{root}/{tag}/rank{rank}.bin"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(client_state, f)
        self.calls.append(("save", tag))

    def load_checkpoint(self, root, tag, **kwargs):
        self.calls.append(("load", tag))
        return {}


def _cfg(tmp_path) -> Config:
    cfg = Config()
    cfg.run.output_dir, cfg.run.name = str(tmp_path), "r"
    cfg.data.erpo_prompts = str(write_jsonl(tmp_path / "prompts.jsonl", [HARMFUL, {**HARMFUL, "id": "p1"}]))
    cfg.rollout.temperature = 0.9
    cfg.erpo.iterations, cfg.erpo.epochs, cfg.erpo.safety_pair_repeats = 2, 3, 2
    cfg.erpo.optim.global_batch_size, cfg.erpo.optim.micro_batch_size = 2, 1
    cfg.learner.num_learners = 2
    cfg.validate()
    return cfg


def test_train_erpo_iterates_trains_syncs_and_checkpoints(tmp_path):
    cfg = _cfg(tmp_path)
    learners = FakeLearners()
    state = train_erpo(cfg, learners, ScriptedRollout(0.0), RuleJudge(RB), cfg.run.dir)

    assert state.extra == {"iteration": 2, "iter_step": 0}
    # per iteration: 2 prompts x 1 assessment safety pair (see test_erpo_sampler), each twice
    # (safety_pair_repeats=2) -> 4 pairs; 3 epochs / 2 pairs a step -> ceil(3 * 4 / 2) = 6 steps
    steps = math.ceil(3 * 4 / 2)
    assert learners.pairs == 4 and state.step == 2 * steps
    expected = [("connect",)]
    for t in range(2):
        pairs = str(cfg.run.dir / "erpo" / f"iter_{t}" / "pairs.jsonl")
        expected += [("load_pairs", pairs, 2), *[("dpo_step", s) for s in range(steps)], ("push", t + 1),
                     ("save", f"step_{(t + 1) * steps}")]
    assert learners.calls == expected
    ckpt = cfg.run.dir / "checkpoints" / "erpo" / f"step_{2 * steps}"
    assert (ckpt / "COMPLETE").is_file()
    assert "erpo:" in (ckpt / "config.yaml").read_text() and "max_steps: 1073741824" not in (ckpt / "config.yaml").read_text()
    rows = [json.loads(x) for x in (cfg.run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "erpo"] == list(range(1, 2 * steps + 1))
    for r in (r for r in rows if r["stage"] == "erpo"):  # MFU = 6 N tokens/s / (2 ranks x 1e12)
        assert r["mfu"] == pytest.approx(6 * 1000 * r["tokens_per_s"] / 2e12)
    assert [(r["iteration"], r["pairs"], r["dpo_steps"]) for r in rows if r["stage"] == "erpo_iter"] == [(0, 2, 6), (1, 2, 6)]


def test_train_erpo_resumes_without_sampling_or_training_again(tmp_path):
    cfg = _cfg(tmp_path)
    train_erpo(cfg, FakeLearners(), ScriptedRollout(0.0), RuleJudge(RB), cfg.run.dir)
    learners, rollout = FakeLearners(), ScriptedRollout(0.0)
    state = train_erpo(cfg, learners, rollout, RuleJudge(RB), cfg.run.dir)
    # restored at iteration 2: the rollout workers get the learners' weights again, nothing else runs
    assert learners.calls == [("load", "step_12"), ("connect",), ("push", 2)]
    assert rollout.calls == [] and state.step == 12
    # a setting that changes the optimisation refuses the resume, naming it
    cfg.erpo.loss.beta = 0.5
    with pytest.raises(CheckpointError, match=r"erpo\.loss\.beta: 0\.1 -> 0\.5"):
        train_erpo(cfg, FakeLearners(), rollout, RuleJudge(RB), cfg.run.dir)
