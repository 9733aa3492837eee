"""Each benchmark in bench/ runs end to end with its smallest settings (``--smoke``) and prints
its table and ratio line. Measures nothing; the figures are in docs/BENCHMARKS.md. TRL, the
peer of several benchmarks, is in the ``dev`` extra, so these run wherever ``make test`` does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_smoke(script: str, workdir: Path, *extra: str) -> list[str]:
    """Run ``bench/<script> --smoke`` on CPU; check its table and final ratio line; return its stdout lines."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke", "--workdir", str(workdir), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio: \d+\.\d\d \(>1 means safer is faster\)( .*)?", lines[-1]), lines[-1]
    assert any(line.startswith("| ") for line in lines)  # the table
    return lines


@pytest.mark.parametrize("script", ["packed_attention.py", "sft_vs_trl.py", "dpo_vs_trl.py", "rollout.py"])
def test_benchmark_smoke(script, tmp_path):
    run_smoke(script, tmp_path)


def test_gpu_benchmark_smoke_rows(tmp_path):
    """bench/gpu.py on CPU: every row measured, the plain loop and the learner fed the same
    batches, MFU and ratios computed from the rates as documented."""
    out = tmp_path / "rows.json"
    run_smoke("gpu.py", tmp_path / "work", "--json", str(out), "--peak-tflops", "1")
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["shape"]["name"] == "smoke"
    # Parameters besides the input embedding, smoke shape (hidden 64, 2 layers, 4 q / 2 kv heads
    # of 16, ffn 128, untied vocab 3000): per layer q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128
    # + 2 norms of 64 = 4096 + 4096 + 4096 + 24576 + 128 = 36992; 2 layers 73984, + final norm 64
    # + LM head 3000*64 = 192000 -> 266048.
    assert report["non_embedding_params"] == 266048
    rows = {r["row"]: r for r in report["rows"]}
    assert sorted(rows) == sorted(["TRL SFTTrainer SFT", "plain PyTorch SFT", "plain PyTorch DPO",
                                   "safer Learner SFT", "safer Learner DPO"])
    for r in rows.values():
        assert "error" not in r and r["tokens_per_s"] > 0 and r["window_tokens"][0] > 0
        assert r["mfu"] == pytest.approx(6 * 266048 * r["tokens_per_s"] / 1e12)  # --peak-tflops 1
        assert r["peak_memory_gib"] is None  # CUDA memory only
        plain = rows[f"plain PyTorch {r['kind'].upper()}"]
        assert r["vs_plain"] == pytest.approx(r["tokens_per_s"] / plain["tokens_per_s"])
    # Same packed batches: the learner and the plain loop train on the same tokens, window by window.
    assert rows["safer Learner SFT"]["window_tokens"] == rows["plain PyTorch SFT"]["window_tokens"]
    assert rows["safer Learner DPO"]["window_tokens"] == rows["plain PyTorch DPO"]["window_tokens"]
