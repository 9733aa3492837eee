"""An SFT step on CUDA: NCCL, bf16 and a flash attention path are selected automatically."""

from __future__ import annotations

import functools

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _steps(learner, n):
    out = [learner.sft_step(s) for s in range(n)]
    return {
        "losses": [m["loss"] for m in out], "dtype": str(learner.dtype), "attn": learner.attn_implementation,
        "backend": torch.distributed.get_backend(),
    }


def test_sft_steps_on_cuda(tiny_model_dir, demo_data_dir):
    from safer_dist.config import load_config
    from tests.dist.launch import run_ranks

    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", f"data.train={demo_data_dir / 'sft.jsonl'}", "learner.num_learners=1",
        "learner.zero_stage=2", "train.global_batch_size=8", "train.micro_batch_size=8", "train.lr=3e-3",
        "train.warmup_steps=0", "train.max_steps=20",
    ])
    (res,) = run_ranks(cfg, functools.partial(_steps, n=8), device="cuda")
    assert res["backend"] == "nccl" and res["dtype"] == "torch.bfloat16"
    assert res["attn"] in ("flash_attention_2", "safer_varlen", "safer_segments")  # never dense-mask sdpa
    assert res["losses"][-1] < res["losses"][0]


def _fused_steps_and_checkpoint(learner, root):
    first = [learner.sft_step(s)["loss"] for s in range(2)]
    learner.save_checkpoint(root, "step_2", {"step": 2})
    after_save = learner.sft_step(2)["loss"]
    learner.load_checkpoint(root, "step_2")
    again = learner.sft_step(2)["loss"]
    client = learner.engine.optimizer.optimizer  # the client AdamW under DeepSpeed's ZeRO optimizer
    return {"fused": client.defaults.get("fused"), "losses": first, "after_save": after_save, "again": again}


def test_fused_adamw_on_cuda_and_its_checkpoint(tiny_model_dir, demo_data_dir, tmp_path):
    """On CUDA the client optimizer is fused AdamW; its states (a step counter on the device)
    go through a DeepSpeed checkpoint: the step after loading repeats the step after saving."""
    from safer_dist.config import load_config
    from tests.dist.launch import run_ranks

    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", f"data.train={demo_data_dir / 'sft.jsonl'}", "learner.num_learners=1",
        "learner.zero_stage=2", "train.global_batch_size=8", "train.micro_batch_size=8", "train.lr=3e-3",
        "train.warmup_steps=0", "train.max_steps=20",
    ])
    (res,) = run_ranks(cfg, functools.partial(_fused_steps_and_checkpoint, root=str(tmp_path)), device="cuda")
    assert res["fused"] is True
    assert res["again"] == pytest.approx(res["after_save"], rel=1e-3)
