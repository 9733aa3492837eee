"""`safer sft` end to end in a subprocess: exits 0, loss falls, hf/ loads and generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from safer_dist.runtime.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def test_safer_sft_subprocess(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
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
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints" / "sft").glob("step_*")) == ["step_20", "step_25"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "hf", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(run / "hf", local_files_only=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
