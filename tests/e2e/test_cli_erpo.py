"""`safer erpo` end to end: two iterations on a briefly trained tiny model, and a job killed
(whole process group, SIGKILL) during sampling and during training that resumes without
re-sampling anything already written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from safer_dist.runtime.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def _args(root):
    """The config and overrides of every command here. The config file names the model and data
    as its own paths (root/model, root/data/), so `safer sft` creates them there when missing."""
    config = root / "config.yaml"
    if not config.exists():
        cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        cfg["model"].update(path="model", init_preset="test")
        cfg["data"].update(train="data/sft.jsonl", eval="data/eval.jsonl", erpo_prompts="data/erpo_prompts.jsonl",
                           demo_num_sft=400, rulebook=str(REPO / "configs" / "rules" / "default.yaml"))
        config.write_text(yaml.safe_dump(cfg))
    return [str(config), f"run.output_dir={root}", "run.name=r"]


ERPO = [
    "erpo.iterations=2", "erpo.prompts_per_iteration=8", "erpo.chunk_size=4", "erpo.max_new_tokens=160",
    "erpo.step_max_new_tokens=64", "erpo.answer_max_new_tokens=64", "erpo.optim.global_batch_size=4",
    "erpo.optim.micro_batch_size=2", "checkpoint.every_steps=1",
    # 10x the tiny config's rate: a few steps must move the rewards far above rounding noise.
    "erpo.optim.lr=2.5e-4",
]


def safer(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, DS_ACCELERATOR="cpu", **(env or {})), start_new_session=True,
    )


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("erpo")
    p = safer("sft", *_args(root), "train.max_steps=250", "train.lr=5e-3", "train.warmup_steps=10",
              "checkpoint.every_steps=0")
    assert p.returncode == 0, p.stderr[-3000:]
    return root


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_erpo_two_iterations_write_pairs_and_metrics(sft_run):
    p = safer("erpo", *_args(sft_run), *ERPO, f"erpo.init_from={sft_run / 'r' / 'hf'}", "run.name=clean")
    assert p.returncode == 0, p.stderr[-3000:]
    run = sft_run / "clean"
    for t in (0, 1):
        rows = [json.loads(x) for x in (run / "erpo" / f"iter_{t}" / "pairs.jsonl").read_text().splitlines()]
        assert rows and all({"prompt_id", "step", "prefix", "candidates", "chosen", "rejected"} <= set(r) for r in rows)
        assert all(len(r["candidates"]) == 4 for r in rows)
        for r in rows:
            for c in r["candidates"]:
                assert {"text", "num_tokens", "safety", "utility", "efficiency", "reason"} <= set(c)
            if r["chosen"] is not None:
                assert r["chosen"] != r["rejected"] and "ref_chosen" in r and "ref_rejected" in r
    iters = read_metrics(run / "metrics.jsonl", "erpo_iter")
    assert [m["iteration"] for m in iters] == [0, 1]
    for key in ("pairs", "mean_candidate_tokens", "judge_safety", "judge_utility", "reward_margin", "preference_accuracy"):
        assert all(key in m for m in iters)
    steps = read_metrics(run / "metrics.jsonl", "erpo")
    assert steps and [m["step"] for m in steps] == list(range(1, len(steps) + 1))
    # Before the first update the policy equals the reference: rewards are zero up to the fp32
    # rounding of differently packed batches (rollout workers pack many items, learners a
    # pair's two sequences) summed over ~60-token steps (tests/ray/test_erpo_ray.py checks
    # this at 1e-6 on short steps).
    assert abs(steps[0]["reward_chosen"]) < 1e-4 and abs(steps[0]["reward_rejected"]) < 1e-4
    assert_training_moved_and_weights_pushed(steps, sft_run / "r" / "hf", run / "hf_erpo")


def assert_training_moved_and_weights_pushed(steps: list[dict], start: Path, exported: Path) -> None:
    """Fails when ERPO trains nothing (``erpo.optim.lr=1e-12``; the config rejects 0) or when the
    weight push leaves the rollout workers on the old weights. Checked by breaking both once:
    at lr=1e-12 every step's |reward_chosen| + |reward_rejected| stayed under 8e-5; with this
    test's lr they reach 0.02 to 4 within iteration 0; with a push that received but copied
    nothing, iteration 1's first step had 1.48.

    Rewards are beta * (policy - reference) log-probs. Within an iteration the reference is
    fixed, so training moves the rewards of later steps away from 0. Each iteration's first
    step sees the policy before its first update and reference log-probs that the rollout
    workers computed on the pushed weights: the two are the same model, so the rewards are 0
    (up to the packing rounding above) — unless the push failed and iteration 1's reference is
    still iteration 0's model, which the learners have trained away from."""
    moved = lambda m: abs(m["reward_chosen"]) + abs(m["reward_rejected"])  # noqa: E731
    for t in (0, 1):
        it = [m for m in steps if m["iteration"] == t]
        assert len(it) >= 2, it
        assert moved(it[0]) < 2e-4, f"iteration {t} starts with a reference that is not the policy: {it[0]}"
        assert max(moved(m) for m in it[1:]) > 1e-2, f"iteration {t}: rewards did not move: {it}"
    from safetensors.torch import load_file

    before, after = load_file(start / "model.safetensors"), load_file(exported / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before), "hf_erpo holds the weights ERPO started from"


def test_erpo_killed_during_sampling_and_training_resumes(sft_run):
    common = ["erpo", *_args(sft_run), *ERPO, f"erpo.init_from={sft_run / 'r' / 'hf'}", "run.name=killed"]
    run = sft_run / "killed"
    p = safer(*common, env={"SAFER_TEST_DIE_AT": "erpo_sample:1:0"})
    assert p.returncode == -9
    chunk = run / "erpo" / "iter_1" / "chunks" / "chunk_00000.jsonl"
    assert chunk.is_file() and not (run / "erpo" / "iter_1" / "pairs.jsonl").exists()
    chunk_before = (digest(chunk), chunk.stat().st_mtime_ns)
    it0_before = digest(run / "erpo" / "iter_0" / "pairs.jsonl")

    p = safer(*common, env={"SAFER_TEST_DIE_AT": "erpo_train:1:2"})
    assert p.returncode == -9, p.stderr[-3000:]
    assert (digest(chunk), chunk.stat().st_mtime_ns) == chunk_before, "a written chunk was sampled again"
    pairs1 = run / "erpo" / "iter_1" / "pairs.jsonl"
    pairs1_before = (digest(pairs1), pairs1.stat().st_mtime_ns)

    p = safer(*common)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (digest(pairs1), pairs1.stat().st_mtime_ns) == pairs1_before, "pairs were sampled again"
    assert digest(run / "erpo" / "iter_0" / "pairs.jsonl") == it0_before
    assert "resumed from" in p.stderr
    iters = read_metrics(run / "metrics.jsonl", "erpo_iter")
    assert [m["iteration"] for m in iters] == [0, 1]
    steps = read_metrics(run / "metrics.jsonl", "erpo")
    assert [m["step"] for m in steps] == list(range(1, len(steps) + 1)), "steps lost or repeated"
    it1 = [m["iter_step"] for m in steps if m["iteration"] == 1]
    assert it1 == list(range(1, len(it1) + 1)) and len(it1) > 2


def test_lora_erpo_with_the_sft_reference_uses_the_learners_adapters_off(sft_run):
    """`model.lora.rank=8 erpo.reference=sft`: no SFT-reference rollout group is started; the
    learners, adapters off, give the reference. Iteration 0 starts with the adapters at B = 0,
    so policy == reference and the first step's rewards are 0 (both from the learners' loss
    head, up to packing rounding); iteration 1 starts from the trained adapters against the
    same SFT reference, so its first rewards are not 0 (with erpo.reference=iteration they
    would be: tests above)."""
    p = safer("erpo", *_args(sft_run), *ERPO, "erpo.optim.lr=2e-3", "model.lora.rank=8", "erpo.reference=sft",
              f"erpo.init_from={sft_run / 'r' / 'hf'}", "run.name=lora_sft_ref")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SFT-reference rollout" not in p.stderr
    run = sft_run / "lora_sft_ref"
    steps = read_metrics(run / "metrics.jsonl", "erpo")
    moved = lambda m: abs(m["reward_chosen"]) + abs(m["reward_rejected"])  # noqa: E731
    first = [next(m for m in steps if m["iteration"] == t) for t in (0, 1)]
    assert moved(first[0]) < 2e-4, first[0]
    assert moved(first[1]) > 1e-2, first[1]
    assert (run / "hf_erpo" / "adapter" / "adapter_config.json").is_file()
