"""A real two-node SLURM cluster on this machine (slurm/dev-cluster.sh), and Ray on top.

Needs root (network namespaces, daemons); skipped otherwise, or with SAFER_SLURM_TESTS=0.
One session fixture (conftest.py) brings the cluster up and tears it down; the jobs here run one
at a time because each takes all CPUs of both nodes (test_sft_slurm.py also runs two jobs that
share the nodes). Every wait polls with a deadline. The batch script's
preemption path (USR1 forwarded, exit 75, requeue) is tested with a real training job in
test_sft_slurm.py.
"""

import json
import shlex
import time
from pathlib import Path

import pytest

from safer_dist.cluster.slurm import environment_values, render_template
from tests.slurm import cluster
from tests.slurm.cluster import NODE_IPS, REPO, VENV, read, run, wait_finished

if (_reason := cluster.skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

JOB_TIMEOUT_S = 180


def _submit(run_dir: Path, driver: str, name: str) -> tuple[int, float]:
    """sbatch the real template around a Python driver (rendered by safer_dist.cluster.slurm)."""
    script = render_template(dict(
        stage="test",
        submit_dir=REPO,
        script_path=run_dir / "job.sh",
        job_name=name,
        nodes=2,
        gpus_per_node="",
        cpus_per_task=2,
        mem="",
        mem_note="",
        partition="debug",
        account="",
        exclusive="",
        time="00:10:00",
        grace_s=30,
        output=run_dir / "slurm.log",
        run_dir=run_dir,
        repo_dir=REPO,
        venv_dir=VENV,
        command=shlex.join([str(VENV / "bin" / "python"), "-c", driver]),
        time_note="",
        **environment_values({}),
    ))
    (run_dir / "job.sh").write_text(script)
    submitted_at = time.time()
    job_id = int(run(["sbatch", "--parsable", str(run_dir / "job.sh")]).stdout.strip())
    return job_id, submitted_at


def _log(run_dir: Path) -> str:
    return read(run_dir / "slurm.log")


def test_srun_runs_one_task_per_node_namespace(slurm_cluster):
    out = run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c", 'echo "$SLURMD_NODENAME $(hostname -I)"'])
    rows = sorted(line.split() for line in out.stdout.strip().splitlines())
    assert [r[0] for r in rows] == ["n1", "n2"], out.stdout
    addrs = [r[1] for r in rows]
    assert addrs == NODE_IPS, out.stdout


DRIVER_TWO_NODES = """
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address="auto")
nodes = [n for n in ray.nodes() if n["Alive"]]
assert len(nodes) == 2, nodes

@ray.remote(num_cpus=1)
def where():
    return ray.util.get_node_ip_address()

ips = ray.get([
    where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
    for n in nodes
])
with open(os.path.join(os.environ["SAFER_RUN_DIR"], "result.json"), "w") as f:
    json.dump({"alive_nodes": len(nodes), "task_ips": ips,
               "node_ips": [n["NodeManagerAddress"] for n in nodes]}, f)
"""


def test_sbatch_ray_cluster_spans_two_nodes(slurm_cluster, run_dir):
    job_id, submitted_at = _submit(run_dir, DRIVER_TWO_NODES, "safer-test-ray")
    job = wait_finished(job_id, JOB_TIMEOUT_S, run_dir / "slurm.log")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, _log(run_dir))

    result = json.loads((run_dir / "result.json").read_text())
    assert result["alive_nodes"] == 2
    assert sorted(result["task_ips"]) == sorted(result["node_ips"]) == NODE_IPS

    ready = json.loads((run_dir / "slurm" / f"ray-{job_id}-r0" / "ready.json").read_text())
    cluster.TIMINGS.append(
        f"bring-up, sbatch -> Ray ready on 2 nodes (stub driver): {ready['ready_at'] - submitted_at:.1f} s "
        f"(ray-cluster.sh alone {ready['bringup_s']:.1f} s)"
    )
