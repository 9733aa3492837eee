"""The README's "Layout" tree names every module of ``safer_dist/`` and ``launcher/``, and
nothing else; every repository path and ``safer_dist.*`` name the docs mention exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("safer_dist", "launcher")
# Paths the docs show as examples (an error message's file name), not files of the repository.
EXAMPLE_PATHS = {"configs/rules/x.yaml"}


def layout_tree(readme: str) -> list[str]:
    """Paths named by the first fenced block after ``## Layout``: one entry a line, nested by
    two spaces, directories ending in ``/`` (``safer_dist/`` then ``  runtime/`` then
    ``    io.py`` is ``safer_dist/runtime/io.py``). A line indented deeper than a child of the
    entry above continues that entry's description."""
    section = readme.split("\n## Layout\n", 1)[1]
    block = section.split("```\n", 2)[1]
    stack: list[str] = []  # directories open at each depth
    paths = []
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        depth, rem = divmod(len(line) - len(line.lstrip(" ")), 2)
        if not name or rem or depth > len(stack):
            continue
        del stack[depth:]
        paths.append("/".join([*stack, name.rstrip("/")]))
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return paths


def test_layout_tree_parser():
    text = "x\n## Layout\n\n```\na/  the a\n  b.py  b\n          more about b\n  c/\n    d.py\ne.py  e\n```\n"
    assert layout_tree(text) == ["a", "a/b.py", "a/c", "a/c/d.py", "e.py"]


def _modules_on_disk() -> set[str]:
    return {
        p.relative_to(REPO).as_posix()
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }


def _packages_on_disk() -> set[str]:
    return {p.parent.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("__init__.py")}


def test_readme_layout_names_every_module():
    named = set(layout_tree((REPO / "README.md").read_text()))
    listed = {p for p in named if p.split("/")[0] in PACKAGES}
    modules, packages = _modules_on_disk(), _packages_on_disk()
    assert modules - listed == set(), "modules missing from the README's Layout"
    assert {p for p in listed if p.endswith(".py")} - modules == set(), "README's Layout names modules that do not exist"
    assert {p for p in listed if not p.endswith(".py")} == packages, "README's Layout and the packages differ"


_PATH = re.compile(r"(?<![\w/.-])((?:safer_dist|launcher|tests|bench|configs|docs|slurm)/[\w./-]*[\w/])(?![\w*<])")
_DOTTED = re.compile(r"(?<![\w/.])(safer_dist(?:\.\w+)+)")


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute path inside the longest importable module."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))])
def test_doc_references_exist(doc):
    text = (REPO / doc).read_text()
    paths = {m.group(1) for m in _PATH.finditer(text)} - EXAMPLE_PATHS
    assert sorted(p for p in paths if not (REPO / p).exists()) == []
    names = {m.group(1) for m in _DOTTED.finditer(text)}
    assert sorted(n for n in names if not _resolves(n)) == []
