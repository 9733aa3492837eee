"""LoRA weight sync on real Ray actors: learners send the adapters alone; rollout workers merge
them into the weights they loaded and then hold the merged export's weights (ZeRO-2 and ZeRO-3,
two syncs in a row)."""

from __future__ import annotations

import pytest
import torch

from safer_dist.cluster.group import LearnerGroup
from safer_dist.cluster.rollout import RolloutGroup
from safer_dist.rollout.worker import RolloutWorker
from tests.ray.test_erpo_ray import cfg_for

RANK = 8
# The test model: 2 blocks of 4 attention linears (64 -> 64) and 3 MLP linears (64 <-> 128),
# each adapted by r * (in + out) parameters; they travel in fp32.
ADAPTER_BYTES = 4 * 2 * (4 * RANK * (64 + 64) + 3 * RANK * (64 + 128))


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_sync_sends_adapters_and_workers_hold_the_merged_export(ray_local, tiny_model_dir, demo_data_dir,
                                                                      tmp_path, stage):
    cfg = cfg_for(tiny_model_dir, demo_data_dir, tmp_path, f"learner.zero_stage={stage}", f"model.lora.rank={RANK}",
                  "train.lr=2e-2")
    learners = LearnerGroup(cfg)
    rollout = RolloutGroup(cfg.model, cfg.rollout, path=str(tiny_model_dir), device="cpu")
    ids = list(range(5, 25))
    prompts = ["How do I bake bread?", "Explain tax code."]
    try:
        learners.connect_weight_sync(rollout)
        before = ray_local.get(rollout.workers[0].logits.remote(ids))
        for version, steps in ((1, range(0, 3)), (2, range(3, 5))):
            for step in steps:
                learners.sft_step(step)
            refs = [a.send_weights.remote(version) for a in learners.actors]
            refs += [w.receive_weights.remote(version) for w in rollout.workers]
            sent = ray_local.get(refs)[0]
            assert sent == ADAPTER_BYTES
            out = tmp_path / f"hf{version}"
            learners.export_hf(str(out))
            merged = RolloutWorker(cfg.model, cfg.rollout, path=str(out), device="cpu")
            want = merged.logits(ids)
            assert (want - before).abs().max() > 1e-3, "training must have changed the weights"
            assert (want - learners.logits(ids)).abs().max() < 1e-5, "the merge is the adapted model"
            expected = merged.generate(prompts, max_new_tokens=12, temperature=1.0, seed=3)
            for w in rollout.workers:
                torch.testing.assert_close(ray_local.get(w.logits.remote(ids)), want, rtol=0, atol=0)
                got = ray_local.get(w.generate.remote(prompts, max_new_tokens=12, temperature=1.0, seed=3))
                assert [g["text"] for g in got] == [e["text"] for e in expected]
    finally:
        rollout.shutdown()
        learners.shutdown()
