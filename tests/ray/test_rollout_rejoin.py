"""A rollout worker that Ray restarts after a weight sync rejoins the sync group and gets the
current weights again, whether it died just before a call or between calls (real Ray actors, a
real DeepSpeed learner, gloo, tiny test model); one that cannot get them (the learners trained
since) is refused with RolloutFailure."""

from __future__ import annotations

import os
import time

import pytest
import torch

from safer_dist.cluster.group import LearnerGroup
from safer_dist.cluster.rollout import RolloutGroup
from safer_dist.rollout.worker import RolloutFailure
from safer_dist.config import load_config


def _pid(worker, ray) -> int:
    return ray.get(worker.__ray_call__.remote(lambda self: os.getpid()))


def _wait_restarted(worker, ray, old_pid: int, timeout_s: float = 120.0) -> int:
    """Poll until Ray has ``worker`` running in a new process; its pid."""
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid = _pid(worker, ray)
        except RayActorError:  # dead or restarting
            pid = old_pid
        if pid != old_pid:
            return pid
        time.sleep(0.05)
    raise AssertionError(f"the worker was not restarted within {timeout_s:.0f} s")


def test_restarted_rollout_worker_rejoins_the_weight_sync(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", f"data.train={demo_data_dir / 'sft.jsonl'}", "data.max_seq_len=256",
        f"run.output_dir={tmp_path}", "train.warmup_steps=0", "train.lr=5e-3", "train.global_batch_size=4",
        "train.micro_batch_size=4", "learner.num_learners=1", "learner.zero_stage=2", "rollout.num_workers=2",
        "rollout.max_restarts=3", "launch.device=cpu",
    ])
    learners = LearnerGroup(cfg)
    rollout = RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu")
    try:
        learners.connect_weight_sync(rollout)
        for step in range(2):  # move the learner away from the weights the workers loaded
            learners.sft_step(step)
        ids = list(range(5, 25))
        want = learners.logits(ids)
        loaded = ray_local.get(rollout.workers[0].logits.remote(ids))  # version 0, what a restart loads
        assert not torch.allclose(loaded, want), "training must have changed the weights"
        learners.push_weights(rollout, version=1)
        items = [(f"How do I bake bread number {i}?", "<ex_ante>\n<assessment>") for i in range(4)]
        kwargs = dict(n=2, stop_strings=None, max_new_tokens=8, temperature=1.0, seed=3)
        expected = rollout.sample(items, **kwargs)  # both workers on version 1

        # Worker 1 is killed right before a call (the call finds it dead or restarting); Ray
        # restarts it from the model path (version 0). It rejoins and its shard runs on version 1.
        ray_local.kill(rollout.workers[1], no_restart=False)
        assert rollout.sample(items, **kwargs) == expected, "same samples: the retry ran on version 1"
        assert rollout.num_retries == 1

        # Worker 0 dies between calls and is back, with version 0, before the next call, which
        # it answers: that answer is discarded, it rejoins, and its shard runs again.
        old_pid = _pid(rollout.workers[0], ray_local)
        ray_local.kill(rollout.workers[0], no_restart=False)
        new_pid = _wait_restarted(rollout.workers[0], ray_local, old_pid)
        assert ray_local.get(rollout.workers[0].weights_version.remote()) == 0
        assert rollout.sample(items, **kwargs) == expected, "same samples: the retry ran on version 1"
        assert rollout.num_retries == 2, "the restarted worker's stale answer was discarded once"
        assert _pid(rollout.workers[0], ray_local) == new_pid, "it rejoined; it did not die again"
        for w in rollout.workers:
            assert ray_local.get(w.weights_version.remote()) == 1
            torch.testing.assert_close(ray_local.get(w.logits.remote(ids)), want, rtol=0, atol=0)

        # The learners train on without pushing: version 1 is gone, and a worker restarted now
        # (killed right before the call, so the call finds it dead or restarting) is refused.
        learners.sft_step(2)
        ray_local.kill(rollout.workers[1], no_restart=False)
        with pytest.raises(RolloutFailure, match=(
            r"rollout worker 1 was restarted with weights version 0, but the policy is at version 1: the learners "
            r"no longer hold weights version 1 \(they hold weights trained or restored since it was sent\)"
        )):
            rollout.sample(items, **kwargs)
    finally:
        rollout.shutdown()
        learners.shutdown()
