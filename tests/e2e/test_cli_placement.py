"""A job that cannot be placed on the Ray cluster is refused with exit code 2 before anything
starts or is written, naming what does not fit (tests/unit/test_placement.py has the rule)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command, overrides, says", [
    # 2 learners x 1 CPU on a 1-CPU in-process Ray cluster
    ("run", ["launch.num_cpus=1"], "sft: the learner placement group (learner.num_learners=2, "
                                   "learner.cpus_per_learner=1) needs {CPU=1} x 2 (PACK); the cluster has GPU=0, CPU=1 free"),
    # a GPU per learner on a machine without one
    ("sft", ["learner.gpus_per_learner=1"], "learner.gpus_per_learner=1 needs GPUs and the cluster has none"),
])
def test_an_unplaceable_job_exits_2_naming_what_does_not_fit(tmp_path, tiny_model_dir, demo_data_dir, command,
                                                             overrides, says):
    args = [f"run.output_dir={tmp_path}", "run.name=r", f"model.path={tiny_model_dir}", "model.init_preset=null",
            f"data.train={demo_data_dir / 'sft.jsonl'}", "data.generate_demo=false", "launch.device=cpu", *overrides]
    p = subprocess.run([sys.executable, "-m", "launcher", command, str(REPO / "configs" / "tiny.yaml"), *args],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert says in p.stderr
    assert not (tmp_path / "r").exists()
