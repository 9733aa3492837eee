"""An installed (non-editable) safer runs from any directory: the rulebook, the configs and the
SLURM scripts come from its package data, and a config's relative paths from the config's
directory. The package is installed into a scratch directory (``pip install --target``) from a
copy of the sources, and the CLI runs there from an unrelated current directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "launcher", "safer_dist", "configs", "slurm")

# Runs inside the installed package: checks that it imported the installed copy, then runs the CLI.
DRIVER = """
import sys, safer_dist
assert safer_dist.__file__.startswith(sys.argv[1]), safer_dist.__file__
from launcher.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(src)], check=True, timeout=600, capture_output=True)
    return target


def safer(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(installed))
    return subprocess.run([sys.executable, "-c", DRIVER, str(installed), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_installed_package_carries_configs_and_slurm(installed):
    shipped = installed / "safer_dist" / "_shipped"
    for rel in ("configs/tiny.yaml", "configs/rules/default.yaml", "configs/synth/teacher_prompt.txt",
                "slurm/sbatch.template.sh", "slurm/ray-cluster.sh", "slurm/ray_wait.py"):
        assert (shipped / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    assert os.access(shipped / "slurm" / "ray-cluster.sh", os.X_OK)


def test_installed_cli_runs_a_config_from_another_directory(installed, tmp_path, tiny_model_dir):
    (tmp_path / "exp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config = tmp_path / "exp" / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": "data/sft.jsonl"}, "model": {"path": "models/m"}}))
    shipped = installed / "safer_dist" / "_shipped"

    p = safer(installed, tmp_path / "elsewhere", "config", str(config), "data.eval=e.jsonl")
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    assert cfg["data"]["train"] == str(tmp_path / "exp" / "data" / "sft.jsonl")
    assert cfg["data"]["eval"] == str(tmp_path / "elsewhere" / "e.jsonl")
    assert cfg["data"]["rulebook"] == str(shipped / "configs" / "rules" / "default.yaml")
    assert cfg["run"]["output_dir"] == str(tmp_path / "exp" / "runs")

    # the shipped rulebook, through `safer data demo`
    p = safer(installed, tmp_path / "elsewhere", "data", "demo", "--out", "demo", "--num-sft", "16")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "elsewhere" / "demo" / "sft.jsonl").is_file()

    # the shipped SLURM scripts, through `safer slurm submit --dry-run`; a model must be at model.path
    p = safer(installed, tmp_path / "elsewhere", "slurm", "submit", str(config), "--nodes", "1",
              "--gpus-per-node", "0", "--stage", "sft", "--mem", "4G", "--dry-run")
    assert p.returncode == 2 and "model.path=" in p.stderr and "does not exist" in p.stderr, p.stderr
    shutil.copytree(tiny_model_dir, tmp_path / "exp" / "models" / "m")
    p = safer(installed, tmp_path / "elsewhere", "slurm", "submit", str(config), "--nodes", "1",
              "--gpus-per-node", "0", "--stage", "sft", "--mem", "4G", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert f'"{shipped}/slurm/ray-cluster.sh" ' in p.stdout

    # a missing data file the config names: exit 2, naming it as written and where it points
    p = safer(installed, tmp_path / "elsewhere", "sft", str(config), f"model.path={tiny_model_dir}")
    assert p.returncode == 2
    assert f"data.train=data/sft.jsonl ({tmp_path}/exp/data/sft.jsonl): no such file" in p.stderr, p.stderr
    assert sorted(x.name for x in (tmp_path / "exp").iterdir()) == ["config.yaml", "models"]  # nothing written
