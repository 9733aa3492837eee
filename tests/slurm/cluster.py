"""Helpers for the tests on the local SLURM dev cluster (slurm/dev-cluster.sh).

Every wait polls with a deadline; nothing sleeps for readiness.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEV_CLUSTER = REPO / "slurm" / "dev-cluster.sh"
SLURM_DIR = Path(os.environ.get("SAFER_SLURM_DIR", "/var/tmp/safer-slurm"))
SUBNET = os.environ.get("SAFER_SLURM_SUBNET", "10.231.0")
NODE_IPS = [f"{SUBNET}.11", f"{SUBNET}.12"]
VENV = Path(os.environ.get("SAFER_VENV", REPO / ".venv"))
PREEMPTED = 75  # EX_TEMPFAIL: the driver's "checkpointed, requeue me"
POLL_INTERVAL_S = 0.2
# Measurements the tests make, printed in pytest's terminal summary (tests/slurm/conftest.py).
TIMINGS: list[str] = []
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def skip_reason() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "SLURM dev-cluster tests need root (network namespaces, slurmd); run `make test` as root"
    if os.environ.get("SAFER_SLURM_TESTS") == "0":
        return "SAFER_SLURM_TESTS=0"
    if not (VENV / "bin" / "ray").exists():
        return f"no ray in {VENV} (set SAFER_VENV)"
    return None


def job_env() -> dict:
    """The environment for sbatch (which exports it to the job, --export=ALL): SLURM_CONF set;
    nothing that would steer the job's Ray or DeepSpeed (the job must set those itself)."""
    env = dict(os.environ, SLURM_CONF=str(SLURM_DIR / "etc" / "slurm.conf"))
    for key in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "DS_ACCELERATOR", "RANK", "WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"):
        env.pop(key, None)
    return env


def run(cmd, timeout_s=60, check=True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout_s,
                       env={**job_env(), **(extra_env or {})}, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, cmd))} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def poll(check, timeout_s, what):
    """Call check() until it returns something truthy; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()  # never set: its wait() is the poll interval
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        tick.wait(POLL_INTERVAL_S)


def job(job_id) -> dict:
    """`scontrol show job` as a dict (one line per job with -o)."""
    out = run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_finished(job_id, timeout_s, log_path: Path | None = None) -> dict:
    try:
        return poll(lambda: (j := job(job_id))["JobState"] in FINISHED_STATES and j, timeout_s,
                    f"job {job_id} to finish")
    except AssertionError as e:
        run(["scancel", str(job_id)], check=False)
        raise AssertionError(f"{e}\n{read(log_path)[-6000:]}" if log_path else str(e)) from None


def read(path: Path | None) -> str:
    return path.read_text() if path and path.exists() else f"(no {path})"


def remove_ray_tmp(run_dir: Path) -> None:
    """Remove the per-node Ray temp dirs (/tmp/ray-<job>-<node>) of the jobs that ran in run_dir."""
    for state in (run_dir / "slurm").glob("ray-*-r*"):
        job_id = state.name.split("-")[1]
        for d in Path("/tmp").glob(f"ray-{job_id}-*"):
            shutil.rmtree(d, ignore_errors=True)
