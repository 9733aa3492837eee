"""LoRA checkpoints resume at another learner count (2 -> 1) through DeepSpeed's universal
checkpoint: the restored adapters and frozen base equal the saved ones, and training goes on."""

from __future__ import annotations

import math

from safer_dist.cluster.group import LearnerGroup
from safer_dist.runtime.metrics import read_metrics
from safer_dist.train.lora import is_adapter_name
from safer_dist.train.sft import train_sft
from tests.ray.test_checkpoint_faults import make_cfg, restore_and_check


def test_lora_resume_at_another_learner_count(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    run = tmp_path / "r"
    lora = ("model.lora.rank=4", "train.lr=1e-2")
    cfg2 = make_cfg(tmp_path, tiny_model_dir, demo_data_dir, 2, "train.max_steps=4", "checkpoint.every_steps=4", *lora)
    group = LearnerGroup(cfg2)
    try:
        train_sft(cfg2, group, run)
    finally:
        group.shutdown()
    cfg1 = make_cfg(tmp_path, tiny_model_dir, demo_data_dir, 1, "train.max_steps=6", "checkpoint.every_steps=6", *lora)
    group = LearnerGroup(cfg1)
    try:
        restore_and_check(cfg1, group, run / "checkpoints" / "sft")
        assert any(is_adapter_name(k) for k in group.full_state_dict())
        state = train_sft(cfg1, group, run)
    finally:
        group.shutdown()
    assert state.step == 6 and state.world_size == 1
    metrics = read_metrics(run / "metrics.jsonl", "sft")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(m["loss"]) for m in metrics)
