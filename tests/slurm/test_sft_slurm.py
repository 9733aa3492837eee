"""`safer slurm submit` on the local two-node SLURM cluster: SFT across two hosts, and preemption.

(a) A tiny SFT job on 2 nodes: 2 learners, one per node (learner.placement=STRICT_SPREAD),
    DeepSpeed ZeRO-2 over gloo between the nodes' network namespaces. It completes and its loss
    falls. It is also the uninterrupted reference for (b).
(b) The same job again, sent SIGUSR1 (`scancel --signal=USR1 --batch`, what SLURM sends
    --grace-s before the time limit) once its first checkpoint exists: the driver finishes the
    step, checkpoints and exits 75, the batch script requeues the job, and the requeued job
    resumes (checkpoint.resume=auto) and finishes. Its per-step losses equal (a)'s bit for bit.

(c) Two small jobs (4 steps) at once, sharing both nodes (one CPU of each per job): each node
    runs both jobs' Ray on their own ports (both heads on n1), and both complete.

Measured and printed in the terminal summary: bring-up (sbatch -> Ray ready on both nodes),
preempt-to-resumed (signal -> first training step of the requeued run) and the two-job run.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm import cluster
from tests.slurm.cluster import NODE_IPS, PREEMPTED, REPO, VENV, poll, read, run, wait_finished

if (_reason := cluster.skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

MAX_STEPS = 30
CKPT_EVERY = 5
JOB_TIMEOUT_S = 300  # one job; ~30 s on an idle 2-core machine, ~90 s under load
PLACED = re.compile(r"learner ranks placed \((\w+)\) on nodes 0:([\d.]+), 1:([\d.]+); MASTER_ADDR ([\d.]+):(\d+)")


@dataclass
class Job:
    job_id: int
    submitted_at: float
    run_dir: Path

    @property
    def log_path(self) -> Path:
        return self.run_dir / "slurm" / f"job-{self.job_id}.log"

    def log(self) -> str:
        return read(self.log_path)

    def ready_at(self, restart: int) -> float:
        """When Ray was ready on every node (written by slurm/ray-cluster.sh)."""
        ready = self.run_dir / "slurm" / f"ray-{self.job_id}-r{restart}" / "ready.json"
        return json.loads(ready.read_text())["ready_at"]


# Recorded by the script and exported to the job again (docs/slurm.md "Environment"); the token is not.
SUBMIT_ENV = {"NCCL_DEBUG": "WARN", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "not-in-the-script"}


def _submit(root: Path, name: str, data_dir: Path, model_dir: Path, *, max_steps: int = MAX_STEPS,
            cpus_per_node: int = 2) -> Job:
    """`safer slurm submit` the tiny SFT job; the same config for every run but its name (and
    the shorter runs of (c)). --mem is left to the estimate (4G here: 2 GiB + 1 learner x ~1.7 GiB)."""
    overrides = [
        f"run.output_dir={root}", f"run.name={name}",
        f"model.path={model_dir}", "model.init_preset=null",
        f"data.train={data_dir / 'sft.jsonl'}", "data.generate_demo=false", "data.max_seq_len=256",
        f"train.max_steps={max_steps}", f"train.warmup_steps={min(5, max_steps // 2)}", "train.global_batch_size=8", "train.micro_batch_size=4",
        "learner.num_learners=2", "learner.zero_stage=2", "learner.placement=STRICT_SPREAD",
        f"checkpoint.every_steps={CKPT_EVERY}",
    ]
    submitted_at = time.time()
    out = run([
        VENV / "bin" / "python", "-m", "launcher", "slurm", "submit", REPO / "configs" / "tiny.yaml", *overrides,
        "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-node", str(cpus_per_node), "--partition", "debug",
        "--time", "00:10:00", "--stage", "sft",
    ], timeout_s=120, extra_env=SUBMIT_ENV).stdout
    m = re.search(r"^submitted job (\d+)", out, re.M)
    assert m, out
    run_dir = root / name
    assert (run_dir / "slurm" / "sft.sbatch.sh").is_file(), out
    return Job(int(m.group(1)), submitted_at, run_dir)


def _metrics(run_dir: Path) -> list[dict]:
    """SFT records of metrics.jsonl, tolerating a last line still being written."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().split("\n")[:-1]:  # only lines that ended with a newline
        rec = json.loads(line)
        if rec.get("stage") == "sft":
            out.append(rec)
    return out


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory, demo_data_dir, tiny_model_dir):
    """The uninterrupted 2-node run: (job, its `scontrol show job`)."""
    root = tmp_path_factory.mktemp("slurm-runs")
    job = _submit(root, "reference", demo_data_dir, tiny_model_dir)
    info = wait_finished(job.job_id, JOB_TIMEOUT_S, job.log_path)
    yield job, info
    cluster.remove_ray_tmp(job.run_dir)


def test_sft_two_nodes_one_learner_per_node(reference):
    job, info = reference
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-6000:])

    # One learner on each node; rank 0 published its node's (namespace's) address, and the
    # ZeRO-2 gloo group formed across the namespaces (the job trained and finished).
    m = PLACED.search(log)
    assert m, log[-6000:]
    placement, ip0, ip1, master, _port = m.groups()
    assert placement == "STRICT_SPREAD"
    assert sorted([ip0, ip1]) == NODE_IPS, m.group(0)
    assert master == ip0, m.group(0)
    assert "2 learner(s) ready: ZeRO-2, cpu, float32" in log
    # the submitting shell's NCCL_*/HF_* variables: recorded in the script, echoed by the job
    script = (job.run_dir / "slurm" / "sft.sbatch.sh").read_text()
    assert "export HF_HUB_OFFLINE=1" in script and "export NCCL_DEBUG=WARN" in script
    assert "not-in-the-script" not in script and "(not recorded: HF_TOKEN)" in script
    assert "safer: env: NCCL_DEBUG=WARN" in log and "safer: env: HF_HUB_OFFLINE=1" in log, log[:3000]

    metrics = _metrics(job.run_dir)
    assert [r["step"] for r in metrics] == list(range(1, MAX_STEPS + 1))
    first = sum(r["loss"] for r in metrics[:3]) / 3
    last = sum(r["loss"] for r in metrics[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    assert (job.run_dir / "hf" / "config.json").is_file()

    bringup_s = job.ready_at(0) - job.submitted_at
    cluster.TIMINGS.append(f"bring-up, `safer slurm submit` -> Ray ready on 2 nodes: {bringup_s:.1f} s")


def test_preempted_sft_requeues_and_resumes_exactly(reference, tmp_path, demo_data_dir, tiny_model_dir):
    ref_job, ref_info = reference
    assert ref_info["JobState"] == "COMPLETED", "the reference run failed (see the test above)"
    job = _submit(tmp_path, "preempted", demo_data_dir, tiny_model_dir)
    try:
        _preempt_and_check(job, _metrics(ref_job.run_dir))
    finally:
        run(["scancel", str(job.job_id)], check=False)
        cluster.remove_ray_tmp(job.run_dir)


def _preempt_and_check(job: Job, ref_metrics: list[dict]) -> None:
    ckpts = job.run_dir / "checkpoints" / "sft"
    poll(lambda: (ckpts / f"step_{CKPT_EVERY}" / "COMPLETE").exists()
         or cluster.job(job.job_id)["JobState"] in cluster.FINISHED_STATES,
         JOB_TIMEOUT_S, "the first checkpoint")
    signalled_at = time.time()
    run(["scancel", "--signal=USR1", "--batch", str(job.job_id)])

    poll(lambda: "requeueing job" in job.log() or cluster.job(job.job_id)["JobState"] in cluster.FINISHED_STATES,
         JOB_TIMEOUT_S, "the driver to checkpoint and the job to requeue")
    requeued_at = time.time()
    log = job.log()
    assert f"driver was preempted (exit {PREEMPTED}); requeueing job {job.job_id}" in log, log[-6000:]
    stopped = re.search(r"stopped at step (\d+); run the same command to resume", log)
    assert stopped, log[-6000:]
    stop_step = int(stopped.group(1))
    assert CKPT_EVERY <= stop_step < MAX_STEPS, f"the signal came too late to stop mid-run (step {stop_step})"
    # The graceful stop wrote a checkpoint at the step it stopped at: nothing is lost.
    manifest = json.loads((ckpts / f"step_{stop_step}" / "COMPLETE").read_text())
    assert manifest["step"] == stop_step and manifest["world_size"] == 2

    poll(lambda: any(r["step"] == stop_step + 1 for r in _metrics(job.run_dir)), JOB_TIMEOUT_S,
         f"the requeued job's first step ({stop_step + 1})")
    resumed_at = time.time()
    info = wait_finished(job.job_id, JOB_TIMEOUT_S, job.log_path)
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-6000:])
    assert info["Restarts"] == "1", info
    assert f"job {job.job_id} (restart 1)" in log
    assert "SIGUSR1 received" in log
    assert f"resumed from {ckpts / f'step_{stop_step}'} (step {stop_step})" in log, log[-6000:]

    # Exact resume: every step's loss and gradient norm, before and after the preemption, equal
    # the uninterrupted run's (CPU fp32, same world size and ZeRO stage: bit for bit).
    metrics = _metrics(job.run_dir)
    assert [r["step"] for r in metrics] == list(range(1, MAX_STEPS + 1))
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in metrics]
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in ref_metrics]
    assert got == want, [(g, w) for g, w in zip(got, want) if g != w][:5]

    cluster.TIMINGS.append(
        f"preempt-to-resumed, SIGUSR1 -> first step of the requeued run: {resumed_at - signalled_at:.1f} s "
        f"(signal -> checkpointed and requeued {requeued_at - signalled_at:.1f} s; -> Ray ready again "
        f"{job.ready_at(1) - signalled_at:.1f} s; stopped at step {stop_step} of {MAX_STEPS})"
    )


PAIR_STEPS = 4


def test_two_jobs_share_both_nodes_at_once(slurm_cluster, tmp_path, demo_data_dir, tiny_model_dir):
    """Both jobs' Ray heads run on n1 and workers on n2 at the same time: with one fixed Ray port
    the second head could not start. Each job takes 1 CPU of each 2-CPU node, so SLURM runs them
    together."""
    jobs = [_submit(tmp_path, f"pair-{i}", demo_data_dir, tiny_model_dir, max_steps=PAIR_STEPS, cpus_per_node=1)
            for i in (0, 1)]
    try:
        infos = [wait_finished(j.job_id, JOB_TIMEOUT_S, j.log_path) for j in jobs]
        _check_pair(jobs, infos)
    finally:
        for j in jobs:
            run(["scancel", str(j.job_id)], check=False)
            cluster.remove_ray_tmp(j.run_dir)


def _check_pair(jobs: list[Job], infos: list[dict]) -> None:
    for job, info in zip(jobs, infos):
        log = job.log()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-6000:])
        assert info["NodeList"] == "n[1-2]" and "#SBATCH --mem=4G" in (job.run_dir / "slurm" / "sft.sbatch.sh").read_text()
        m = PLACED.search(log)
        assert m and sorted(m.group(2, 3)) == NODE_IPS, log[-6000:]
        manifest = json.loads((job.run_dir / "checkpoints" / "sft" / f"step_{PAIR_STEPS}" / "COMPLETE").read_text())
        assert manifest["step"] == PAIR_STEPS
        assert [r["step"] for r in _metrics(job.run_dir)] == list(range(1, PAIR_STEPS + 1))
    # They ran at the same time: each job's Ray was up before the other job ended (EndTime is in
    # whole seconds; the overlap is tens of seconds).
    ends = [_epoch(info["EndTime"]) for info in infos]
    ready = [job.ready_at(0) for job in jobs]
    assert ready[0] < ends[1] and ready[1] < ends[0], (ready, ends)
    # ... both heads on n1, each on a GCS port of its own
    heads = [(job.run_dir / "slurm" / f"ray-{job.job_id}-r0" / "head.address").read_text().strip() for job in jobs]
    (ip0, port0), (ip1, port1) = (h.rsplit(":", 1) for h in heads)
    assert ip0 == ip1 == NODE_IPS[0] and port0 != port1, heads
    start = min(j.submitted_at for j in jobs)
    cluster.TIMINGS.append(f"two {PAIR_STEPS}-step jobs sharing both nodes, submit -> both finished: "
                           f"{max(ends) - start:.0f} s")


def _epoch(slurm_time: str) -> float:
    """scontrol's local time, e.g. 2026-11-26T15:20:01, as epoch seconds."""
    return time.mktime(time.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S"))
