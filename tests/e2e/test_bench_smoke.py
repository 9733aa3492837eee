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
    lines = run_smoke(script, tmp_path)
    if script == "rollout.py":  # no bandwidth on CPU without --hbm-gbps: no bound, no fractions
        assert any(line.startswith("decode bound: n/a = ") for line in lines)
        # safer and HF on the reordered weights, and both on nn.Linear
        assert sum(line.endswith(": n/a of the decode bound") for line in lines) == 4
        assert sum(line.startswith("time per window (") and " + decode " in line for line in lines) == 4
        assert any(line.startswith("on nn.Linear: ") for line in lines)


def test_rollout_smoke_decode_bound(tmp_path):
    """bench/rollout.py with a bench/gpu.py shape: the decode bound and each contestant's
    fraction of it computed as documented."""
    out = tmp_path / "rollout.json"
    run_smoke("rollout.py", tmp_path / "work", "--shape", "smoke", "--hbm-gbps", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["model"] == "smoke" and report["dtype"] == "torch.float32"
    # Weights read per step: the 266048 parameters besides the input embedding of the smoke shape
    # (see test_gpu_benchmark_smoke_rows) x 4 bytes (fp32) = 1064192. KV per token: keys and
    # values x 2 layers x 2 kv heads x head dim 16 x 4 bytes = 512.
    assert report["weight_bytes"] == 1064192 and report["kv_bytes_per_token"] == 512
    # --smoke: 4 prefixes x 2 candidates in batches of 4 rows, 4 new tokens.
    assert report["rows_in_flight"] == 4 and report["max_new_tokens"] == 4
    context = report["mean_prefix_tokens"] + 4 / 2
    assert report["mean_context_tokens"] == pytest.approx(context)
    bound = 4 * 1e9 / (1064192 + 4 * 512 * context)  # rows x 1 GB/s / bytes per step
    assert report["hbm_gbps"] == 1.0 and report["bound_tokens_per_s"] == pytest.approx(bound)
    assert len(report["rows"]) == 4  # safer, HF (same weights path); both on nn.Linear (CPU only)
    for r in report["rows"]:
        assert r["tokens_per_s"] > 0 and r["fraction_of_bound"] == pytest.approx(r["tokens_per_s"] / bound)
    # Work per window: 8 rows (4 prefixes x 2) in two rounds of 4 rows; each row's first token comes
    # from the prefill, the other 3 from 3 decode steps per round: 6 steps of 4 positions each. safer
    # prefills each prefix once, packed (2 calls, one per round); generate encodes each prefix twice,
    # left-padded to its batch's longest (2 calls of 2 prefixes).
    lens = report["prefix_tokens"]
    hf_prefill = sum(2 * 2 * max(lens[i : i + 2]) for i in (0, 2))
    work = report["forward_time_per_window"]
    assert report["positions_per_window"] == {"safer": sum(lens) + 24, "nn_linear": sum(lens) + 24,
                                              "hf": hf_prefill + 24, "hf_linear": hf_prefill + 24}
    for key in ("safer", "nn_linear", "hf", "hf_linear"):
        assert work[key]["prefill_calls"] == 2 and work[key]["decode_calls"] == 6
        assert 0 < work[key]["prefill_s"] + work[key]["decode_s"] < work[key]["window_s"]
    # Work per window: HF encodes each prefix once per candidate (2 x the prefix tokens, padding
    # aside) and decodes 4 rows x 3 steps per batch at most; safer encodes each prefix once.
    work, prefix_tokens = report["positions_per_window"], sum(report["prefix_tokens"])
    assert 2 * prefix_tokens <= work["hf"] <= 2 * 4 * max(report["prefix_tokens"]) + 2 * 4 * 3
    assert prefix_tokens <= work["safer"] < work["hf"]


def test_gpu_benchmark_smoke_rows(tmp_path):
    """bench/gpu.py on CPU: every row measured (the LoRA learner's too), the plain loop and the
    learners fed the same batches, MFU and ratios computed from the rates as documented."""
    out = tmp_path / "rows.json"
    lines = run_smoke("gpu.py", tmp_path / "work", "--json", str(out), "--peak-tflops", "1", "--lora-rank", "4",
                      "--profile", str(tmp_path / "prof"))
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["shape"]["name"] == "smoke"
    # Parameters besides the input embedding, smoke shape (hidden 64, 2 layers, 4 q / 2 kv heads
    # of 16, ffn 128, untied vocab 3000): per layer q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128
    # + 2 norms of 64 = 4096 + 4096 + 4096 + 24576 + 128 = 36992; 2 layers 73984, + final norm 64
    # + LM head 3000*64 = 192000 -> 266048.
    assert report["non_embedding_params"] == 266048
    rows = {r["row"]: r for r in report["rows"]}
    assert sorted(rows) == sorted(["TRL SFTTrainer SFT", "plain PyTorch SFT", "plain PyTorch DPO",
                                   "safer Learner SFT", "safer Learner DPO", "safer Learner DPO-SHARED",
                                   "safer Learner LoRA SFT", "safer Learner LoRA DPO", "safer Learner LoRA DPO-SHARED"])
    # LoRA rank 4 on every linear layer of the 2 blocks: r x (in + out) per layer, q 64+64, k and v
    # 64+32, o 64+64, gate and up 64+128, down 128+64 = 1024 per block and rank -> 2 x 1024 x 4 = 8192.
    assert any(line.startswith("# safer Learner LoRA: LoRA rank 4, alpha 8 on 14 layers (all-linear): 8,192 trainable")
               for line in lines), lines
    for r in rows.values():
        assert "error" not in r and r["tokens_per_s"] > 0 and r["window_tokens"][0] > 0
        # --peak-tflops 1; with adapters 4 N + 2 x the adapters per token (frozen weights get no weight gradient)
        trained = 8192 if r["contestant"] == "safer Learner LoRA" else 266048
        assert r["num_params_trained"] == trained
        assert r["mfu"] == pytest.approx((4 * 266048 + 2 * trained) * r["tokens_per_s"] / 1e12)
        assert r["peak_memory_gib"] is None  # CUDA memory only
        plain = rows[f"plain PyTorch {r['kind'].removesuffix('-shared').upper()}"]
        assert r["vs_plain"] == pytest.approx(r["tokens_per_s"] / plain["tokens_per_s"])
    # Same packed batches: the learner and the plain loop train on the same tokens, window by window;
    # the prefix-shared row on the same pairs, counted as their unshared tokens.
    for learner in ("safer Learner", "safer Learner LoRA"):
        assert rows[f"{learner} SFT"]["window_tokens"] == rows["plain PyTorch SFT"]["window_tokens"]
        assert rows[f"{learner} DPO"]["window_tokens"] == rows["plain PyTorch DPO"]["window_tokens"]
        assert rows[f"{learner} DPO-SHARED"]["window_tokens"] == rows["plain PyTorch DPO"]["window_tokens"]
    # --profile: one more step per safer and plain row, its three phases nested in the step.
    phases = json.loads((tmp_path / "prof" / "phases.json").read_text())
    assert sorted(phases) == sorted(n for n in rows if not n.startswith("TRL"))
    for name, p in phases.items():
        assert sorted(p["phases"]) == ["safer.backward", "safer.forward_loss", "safer.optimizer_step"], name
        assert all(v["calls"] == 1 and v["cpu_ms"] > 0 for v in p["phases"].values()), name
        assert sum(v["cpu_ms"] for v in p["phases"].values()) <= p["step_ms"], name
        assert (tmp_path / "prof" / f"{name.replace(' ', '-')}.txt").read_text().count("aten::mm") == 1
