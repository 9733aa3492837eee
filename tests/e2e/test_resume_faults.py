"""`safer sft` killed for real and resumed: exact resume, crash during save, graceful stop,
a learner that dies, and a corrupted checkpoint (CPU, fp32, 2 learners, tiny test model).

Every job is its own process session; "SIGKILL the whole job" kills every process of that
session (driver, Ray daemons, Ray workers) and each test checks that nothing outlives a job.
The reference for exactness is an uninterrupted run of the same config in the same test.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from safer_dist.checkpointing.checkpoint import COMPLETE, TEST_HANG_IN_SAVE
from safer_dist.runtime.metrics import read_metrics
from tests.checks import overlong_counts
from tests.e2e.jobctl import (
    assert_session_gone, kill_job, listening_ports, reap_all, run_job, session_pids, start_job, wait_for,
)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""

MAX_STEPS = 12
EVERY = 4
STOP_GRACE_S = 60


@pytest.fixture(autouse=True)
def _reap_jobs():
    yield
    reap_all()


def sft_args(out: Path, name: str, model_dir: Path, data_dir: Path, stage: int, *extra: str) -> list[str]:
    return [
        "sft", "configs/tiny.yaml", f"run.output_dir={out}", f"run.name={name}",
        f"model.path={model_dir}", "model.init_preset=null", f"data.train={data_dir / 'sft.jsonl'}",
        "data.generate_demo=false", "data.max_seq_len=256", f"train.max_steps={MAX_STEPS}", "train.warmup_steps=2",
        "train.global_batch_size=8", "train.micro_batch_size=4", "learner.num_learners=2",
        f"learner.zero_stage={stage}", f"checkpoint.every_steps={EVERY}", "launch.device=cpu",
        f"launch.stop_grace_s={STOP_GRACE_S}", *extra,
    ]


def ckpt_dir(out: Path, name: str, step: int) -> Path:
    return out / name / "checkpoints" / "sft" / f"step_{step}"


def assert_same_run(base: Path, resumed: Path, first_step: int) -> None:
    """Per-step metrics from ``first_step`` on and the final fp32 weights are bit-identical."""
    from safer_dist.checkpointing.export import consolidated_state_dict

    a = {m["step"]: m for m in read_metrics(base / "metrics.jsonl", "sft")}
    b = {m["step"]: m for m in read_metrics(resumed / "metrics.jsonl", "sft")}
    assert sorted(b) == list(range(1, MAX_STEPS + 1)), sorted(b)
    for step in range(first_step, MAX_STEPS + 1):
        for key in ("loss", "lr", "grad_norm", "num_tokens"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    wa = consolidated_state_dict(base / "checkpoints" / "sft" / f"step_{MAX_STEPS}")
    wb = consolidated_state_dict(resumed / "checkpoints" / "sft" / f"step_{MAX_STEPS}")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_crash_in_save_then_sigterm_then_exact_resume_zero2(tmp_path, tiny_model_dir, demo_data_dir):
    """ZeRO-2: SIGKILL the job while step 8 is being saved (after checkpoint 4); resume=auto
    skips the incomplete step 8 and says so; SIGTERM stops it after one step with a checkpoint
    and exit 75; a third launch finishes. Steps 5..12 and the final weights equal an
    uninterrupted run bit for bit. Then a truncated shard fails the next resume cleanly."""
    args = lambda name, *x: sft_args(tmp_path, name, tiny_model_dir, demo_data_dir, 2, "data.max_seq_len=400", *x)  # noqa: E731
    assert run_job(args("base"), tmp_path / "base.log") == 0
    # Over-long examples (data.overlong=truncate) are counted per step in metrics.jsonl.
    counted = [(m["truncated"], m["dropped"]) for m in read_metrics(tmp_path / "base" / "metrics.jsonl", "sft")]
    assert counted == overlong_counts(tmp_path / "base", MAX_STEPS)
    assert 0 < sum(t for t, _ in counted) < 8 * MAX_STEPS

    # 1. SIGKILL the whole job while it hangs in the save of step 8 (test hook), shards written.
    log1 = tmp_path / "kill.log"
    job = start_job(args("run"), log1, env={TEST_HANG_IN_SAVE: "8"})
    wait_for(lambda: "test hook hanging in the save of step 8" in log1.read_text(), 240, "the save of step 8", job, log1)
    # The Ray dashboard UI is off: nothing listens on its port; Ray's API server (which runs
    # regardless) is bound to loopback.
    assert 8265 not in [port for _, port in listening_ports(job.pid)]
    api = [_cmdline(p) for p in session_pids(job.pid) if "dashboard/dashboard.py" in _cmdline(p)]
    assert all("--host=127.0.0.1" in c for c in api), api
    kill_job(job)
    step8 = ckpt_dir(tmp_path, "run", 8)
    assert (ckpt_dir(tmp_path, "run", 4) / COMPLETE).is_file()
    assert (step8 / "trainer_state.json").is_file() and not (step8 / COMPLETE).exists()
    step8_files = tree_digest(step8)

    # 2. Relaunch: resumes from step 4, reports the incomplete step 8; SIGTERM -> step 5, exit 75.
    log2 = tmp_path / "stop.log"
    job = start_job(args("run"), log2)
    wait_for(lambda: "resumed from" in log2.read_text(), 240, "the resume", job, log2)
    t_signal = time.monotonic()
    job.send_signal(signal.SIGTERM)
    rc = job.wait(timeout=STOP_GRACE_S + 30)
    stop_s = time.monotonic() - t_signal
    text = log2.read_text()
    assert rc == 75, text[-3000:]
    assert stop_s < STOP_GRACE_S, stop_s
    assert_session_gone(job.pid)
    assert re.search(r"skipping incomplete checkpoint \S*step_8 \(no COMPLETE\); left in place", text), text[-3000:]
    assert re.search(r"resumed from \S*step_4 ", text)
    assert (ckpt_dir(tmp_path, "run", 5) / COMPLETE).is_file(), "the graceful stop writes a checkpoint"
    assert tree_digest(step8) == step8_files, "the incomplete checkpoint is left as it was"

    # 3. Relaunch: resumes from the stop checkpoint and finishes. Saving step 8 again moves the
    # incomplete directory aside; it is never deleted.
    log3 = tmp_path / "finish.log"
    assert run_job(args("run"), log3) == 0, log3.read_text()[-3000:]
    text = log3.read_text()
    assert re.search(r"resumed from \S*step_5 ", text)
    assert "moving incomplete checkpoint" in text
    (aside,) = (tmp_path / "run" / "checkpoints" / "sft").glob("step_8.incomplete-*")
    assert tree_digest(aside) == step8_files
    assert_same_run(tmp_path / "base", tmp_path / "run", first_step=5)

    # 4. A truncated optimizer shard: the next resume fails naming the file, before anything runs.
    shard = ckpt_dir(tmp_path, "run", MAX_STEPS) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-100])
    before = tree_digest(tmp_path / "run")
    log4 = tmp_path / "corrupt.log"
    rc = run_job(args("run", f"train.max_steps={MAX_STEPS + 4}"), log4)
    assert rc == 2, log4.read_text()[-3000:]
    assert f"{shard}: truncated" in log4.read_text()
    assert "started Ray" not in log4.read_text()
    assert tree_digest(tmp_path / "run") == before


def test_sigkill_resume_exact_and_learner_death_zero3(tmp_path, tiny_model_dir, demo_data_dir):
    """ZeRO-3: SIGKILL the whole job after checkpoint 4; the relaunch resumes from it. SIGKILL
    one learner of the relaunched job: the driver exits 1 promptly, naming the rank and the last
    complete checkpoint, and nothing is left running. The next relaunch gets a Ctrl-C (SIGINT to
    its process group): it checkpoints the step it is in, says so and exits 130. A final
    relaunch resumes from that checkpoint and finishes, and steps 5..12 and the final weights
    equal an uninterrupted run bit for bit."""
    args = lambda name: sft_args(tmp_path, name, tiny_model_dir, demo_data_dir, 3)  # noqa: E731
    assert run_job(args("base"), tmp_path / "base.log") == 0

    log1 = tmp_path / "kill.log"
    job = start_job(args("run"), log1)
    wait_for(lambda: (ckpt_dir(tmp_path, "run", 4) / COMPLETE).is_file(), 240, "checkpoint 4", job, log1)
    kill_job(job)

    log2 = tmp_path / "learner.log"
    job = start_job(args("run"), log2)
    text = wait_for(lambda: t if "resumed from" in (t := log2.read_text()) else "", 240, "the resume", job, log2)
    pids = dict(x.split(":") for x in re.search(r"learner pids by rank: ([\d: ]+)", text).group(1).split())
    t_kill = time.monotonic()
    os.kill(int(pids["1"]), signal.SIGKILL)
    rc = job.wait(timeout=120)
    died_s = time.monotonic() - t_kill
    text = log2.read_text()
    assert rc == 1, text[-3000:]
    assert died_s < 60, died_s  # learner.call_timeout_s is 1800: the death itself ended the job
    assert_session_gone(job.pid)
    m = re.search(r"learner rank 1 \(Ray actor \w+, pid (\d+)\) died during sft_step: .*last complete checkpoint: (\S+)", text)
    assert m, text[-3000:]
    assert m.group(1) == pids["1"] and (Path(m.group(2)) / COMPLETE).is_file()

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group (driver, the Ray
    # daemons it started). The driver finishes the step, checkpoints and exits 130; the learners
    # live to write their shards.
    log3 = tmp_path / "interrupt.log"
    job = start_job(args("run"), log3)
    text = wait_for(lambda: t if "resumed from" in (t := log3.read_text()) else "", 240, "the resume", job, log3)
    resumed = int(re.search(r"resumed from \S*step_(\d+) ", text).group(1))
    assert resumed <= 4 + EVERY
    os.killpg(job.pid, signal.SIGINT)
    rc = job.wait(timeout=STOP_GRACE_S + 30)
    text = log3.read_text()
    assert rc == 130, text[-3000:]
    assert_session_gone(job.pid)
    stopped = int(re.search(r"stopped at step (\d+); run the same command to resume", text).group(1))
    assert stopped == resumed + 1, text[-3000:]
    assert (ckpt_dir(tmp_path, "run", stopped) / COMPLETE).is_file()

    log4 = tmp_path / "finish.log"
    assert run_job(args("run"), log4) == 0, log4.read_text()[-3000:]
    assert re.search(rf"resumed from \S*step_{stopped} ", log4.read_text())
    assert_same_run(tmp_path / "base", tmp_path / "run", first_step=5)
