"""pyproject.toml keeps a GPU user's torch: its torch requirement admits the GPU image's 2.11
and the CPU pin 2.13, and nothing else in it pins torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for reqs in project["optional-dependencies"].values() for r in reqs]
    return [Requirement(r) for r in project["dependencies"] + extras]


def _torch_requirement() -> Requirement:
    (req,) = [r for r in _requirements() if r.name == "torch"]
    return req


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0+cu130", "2.13.0", "2.13.0+cpu"])
def test_torch_requirement_admits_gpu_image_and_cpu_pin(version):
    # 2.11.0+cu130: the GPU image's torch; 2.13.0+cpu: what `make` installs first
    assert _torch_requirement().specifier.contains(version), version


def test_torch_requirement_admits_makefile_pin():
    """`make demo` / `make test` install TORCH_SPEC first; the package must accept it."""
    (spec,) = re.findall(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    pinned = Requirement(spec)
    assert pinned.name == "torch" and str(pinned.specifier).startswith("==")
    assert _torch_requirement().specifier.contains(str(pinned.specifier).removeprefix("=="))


def test_only_one_torch_requirement():
    assert [r.name for r in _requirements()].count("torch") == 1
