"""`safer sft` end to end in a subprocess: exits 0, loss falls, validation loss every 10 steps,
every metric also in TensorBoard and W&B (offline), report.md with the loss plot, hf/ loads and
generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from safer_dist.runtime.metrics import read_metrics
from safer_dist.runtime.tracking import scalars
from tests.checks import tensorboard_scalars, wandb_history, wandb_records

REPO = Path(__file__).resolve().parents[2]


def test_safer_sft_subprocess(tmp_path):
    (tmp_path / "wandb").mkdir()
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"),
               WANDB_SILENT="true")
    # The config names the model and data as its own paths, so `safer sft` creates them (the
    # demo set, a tiny model): a path from an override would have to exist.
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["model"]["path"] = "model"
    cfg["data"].update(train="data/sft.jsonl", demo_num_sft=400, rulebook=str(REPO / "configs" / "rules" / "default.yaml"))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable, "-m", "launcher", "sft", str(tmp_path / "tiny.yaml"),
        f"run.output_dir={tmp_path / 'runs'}", "run.name=e2e", "train.max_steps=25", "train.warmup_steps=5",
        "checkpoint.every_steps=10",
        "train.eval_every_steps=10", "data.valid_fraction=0.05",
        "track.tensorboard=true", "track.wandb=true", "track.wandb_project=e2e", "track.wandb_tags=cpu,tiny",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "e2e"
    metrics = read_metrics(run / "metrics.jsonl", "sft")
    assert [m["step"] for m in metrics] == list(range(1, 26))
    for key in ("loss", "lr", "num_tokens", "tokens_per_s", "grad_norm"):
        assert all(key in m for m in metrics)
    first = sum(m["loss"] for m in metrics[:3]) / 3
    last = sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert all(m1["time"] <= m2["time"] for m1, m2 in zip(metrics, metrics[1:]))  # wall clock, unix seconds
    valid = {m["step"]: m["valid_loss"] for m in metrics if "valid_loss" in m}
    assert sorted(valid) == [10, 20, 25]  # every 10 steps and the last
    assert valid[25] < valid[10] < 1.5 * metrics[0]["loss"]
    assert all(m["num_valid_tokens"] == metrics[-1]["num_valid_tokens"] > 0 for m in metrics if "valid_loss" in m)
    # Every scalar of every row went to TensorBoard and to the W&B run, at its step.
    tb = tensorboard_scalars(run / "tensorboard" / "sft")
    history = [h for h in wandb_history(tmp_path / "wandb") if "sft/step" in h]
    assert [h["sft/step"] for h in history] == list(range(1, 26))
    for m, h in zip(metrics, history):
        for key, value in scalars(m).items():
            assert dict((s, v) for s, v, _ in tb[key])[m["step"]] == pytest.approx(value, rel=1e-6), key  # float32
            assert h[f"sft/{key}"] == pytest.approx(value), key
    (info,) = [r.run for r in wandb_records(tmp_path / "wandb") if r.WhichOneof("record_type") == "run"]
    assert (info.project, info.display_name, list(info.tags)) == ("e2e", "e2e", ["cpu", "tiny"])
    report = (run / "report.md").read_text()
    assert "![training](training.png)" in report and (run / "training.png").stat().st_size > 0
    assert f"valid loss {valid[25]:.4f} at step 25" in report
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints" / "sft").glob("step_*")) == ["step_20", "step_25"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "hf", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(run / "hf", local_files_only=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
