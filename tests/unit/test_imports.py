"""The CLI and the core import without the heavy stacks (docs/design.md §2): `safer --help`,
`safer plan` and `safer data` stay fast, and the format, data and config modules test without
Ray or DeepSpeed installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIGHT = [
    "launcher.cli", "safer_dist.config",
    "safer_dist.runtime.io", "safer_dist.runtime.log", "safer_dist.runtime.metrics", "safer_dist.runtime.stop",
    "safer_dist.reasoning.exante", "safer_dist.reasoning.rules",
    "safer_dist.data.records", "safer_dist.data.demo",
    "safer_dist.checkpointing.checkpoint", "safer_dist.checkpointing.export", "safer_dist.checkpointing.universal",
    "safer_dist.cluster.plan", "safer_dist.cluster.slurm",
    "safer_dist.evaluation.evaluate", "safer_dist.evaluation.report", "safer_dist.synth.pipeline",
]
HEAVY = ("ray", "deepspeed", "torch", "transformers", "datasets", "matplotlib")


def test_light_modules_import_no_heavy_stack():
    # A fresh interpreter: this test process has imported torch already.
    code = (
        "import importlib, json, sys\n"
        f"for m in {LIGHT!r}: importlib.import_module(m)\n"
        f"print(json.dumps([h for h in {HEAVY!r} if h in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
