"""The learner group as real Ray actors: train a few steps, write a complete checkpoint."""

from __future__ import annotations

import json

import torch

from safer_dist.checkpointing.checkpoint import COMPLETE, Checkpointer
from safer_dist.config import load_config
from safer_dist.cluster.group import LearnerGroup
from safer_dist.runtime.metrics import read_metrics
from safer_dist.train.models import load_model
from safer_dist.train.sft import train_sft
from safer_dist.train.throughput import non_embedding_params


def test_learner_actors_train_and_checkpoint(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", f"data.train={demo_data_dir / 'sft.jsonl'}", "data.max_seq_len=256",
        f"run.output_dir={tmp_path}", "run.name=r", "train.max_steps=6", "train.warmup_steps=0", "train.lr=3e-3",
        "train.global_batch_size=8", "train.micro_batch_size=4", "learner.num_learners=2",
        "learner.zero_stage=2", "checkpoint.every_steps=3", "launch.device=cpu", "learner.peak_tflops=0.5",
    ])
    group = LearnerGroup(cfg)
    try:
        pids = ray_local.get([a.__ray_call__.remote(lambda self: __import__("os").getpid()) for a in group.actors])
        assert len(set(pids)) == 2, "each rank is its own actor process"
        state = train_sft(cfg, group, cfg.run.dir)
    finally:
        group.shutdown()
    assert state.step == 6
    ckpts = Checkpointer(cfg.checkpoint, cfg.run.dir / "checkpoints" / "sft")
    latest = ckpts.latest_complete()
    assert latest is not None and latest.name == "step_6" and (latest / COMPLETE).is_file()
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == 6
    # Both ranks wrote their optimizer shard and RNG state.
    for rank in (0, 1):
        assert (latest / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert (latest / f"rng_rank{rank}.pt").is_file()
    rows = read_metrics(cfg.run.dir / "metrics.jsonl", "sft")
    losses = [m["loss"] for m in rows]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # Throughput: MFU = 6 * non-embedding params * tokens/s / (2 learners x 0.5 TFLOP/s).
    n_params = non_embedding_params(load_model(tiny_model_dir, dtype=torch.float32))
    assert [info["num_params_non_embedding"] for info in group.infos] == [n_params, n_params]
    for m in rows:
        assert m["tokens_per_s"] > 0
        assert abs(m["mfu"] - 6 * n_params * m["tokens_per_s"] / 1e12) < 1e-12
