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


def test_every_package_and_shipped_directory_is_listed():
    """The package list is explicit (pyproject.toml says why): a new sub-package must join it,
    and configs/ and slurm/ (with their sub-directories) ship as safer_dist/_shipped/."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("launcher", "safer_dist")
               for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    shipped = {"safer_dist._shipped." + ".".join(d.relative_to(ROOT).parts) for top in ("configs", "slurm")
               for d in [ROOT / top, *(ROOT / top).rglob("*")] if d.is_dir() and "__pycache__" not in d.parts}
    assert set(setuptools["packages"]) == on_disk | shipped
    assert setuptools["package-dir"] == {"safer_dist._shipped.configs": "configs", "safer_dist._shipped.slurm": "slurm"}
    assert set(setuptools["package-data"]) == shipped


def _pins() -> dict[str, str]:
    """constraints.txt: canonical package name -> pinned version."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_requirement_inside_its_range():
    """`make` installs with ``-c constraints.txt``: every requirement of pyproject.toml (the
    flash-attn GPU extra aside, which `make` never installs) is pinned there, and the pin is
    inside the range pyproject.toml gives users. A range changed without `make lock` fails here."""
    from packaging.utils import canonicalize_name

    pins = _pins()
    for req in _requirements():
        if req.name == "flash-attn":
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {req.name}=={pins[name]}, outside {req}"


def test_makefile_installs_with_the_constraints():
    (spec,) = re.findall(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert _pins()["torch"] == spec.removeprefix("torch==")
    installs = [line for line in (ROOT / "Makefile").read_text().splitlines() if "$(PY) -m pip install" in line
                and "--upgrade pip" not in line]
    assert installs and all("-c $(CONSTRAINTS)" in line for line in installs), installs
