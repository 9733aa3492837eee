"""The CLI and the core import without the heavy stacks (docs/design.md §2): `safer --help`,
`safer plan` and `safer data` stay fast, and the format, data and config modules test without
Ray or DeepSpeed installed. The library's import graph has no circle through the driver, the
weight sync or the actors' code, its imports go downwards, and the learner's and rollout
worker's modules import the library at the top."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIGHT = [
    "launcher.cli", "safer_dist.config",
    "safer_dist.runtime.io", "safer_dist.runtime.log", "safer_dist.runtime.metrics", "safer_dist.runtime.stop",
    "safer_dist.reasoning.exante", "safer_dist.reasoning.rules",
    "safer_dist.data.records", "safer_dist.data.demo",
    "safer_dist.checkpointing.checkpoint", "safer_dist.checkpointing.export", "safer_dist.checkpointing.universal",
    "safer_dist.cluster.gpu_memory", "safer_dist.cluster.plan", "safer_dist.cluster.slurm",
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


# -- the library's import graph (every import statement, at any depth, TYPE_CHECKING ones included) ---------
def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "safer_dist") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, read from the source: a function-level or
    ``if TYPE_CHECKING:`` import counts like one at the top (it is how a circle gets hidden)."""
    paths = {_module_name(p): p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circles_finds_a_hidden_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


# Packages in no import circle: the driver (cluster, erpo), the actors' code (rollout, weights, the
# learner) and the judge's users. Circles elsewhere (reasoning, checkpointing with train.lora and
# train.models) predate this list.
ACYCLIC = ("safer_dist.cluster", "safer_dist.rollout", "safer_dist.weights", "safer_dist.erpo", "safer_dist.judging",
           "safer_dist.evaluation", "safer_dist.synth", "safer_dist.jobs", "safer_dist.train.learner",
           "safer_dist.train.step_dpo")


def _in(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_import_circle_through_the_groups_weight_sync_and_workers():
    bad = [c for c in circles(import_graph()) if any(_in(m, ACYCLIC) for m in c)]
    assert bad == []


# (importer, imported): imports that would go upwards. Rollout workers and the weight sync never
# import the driver's groups; the rollout group never calls back into the learner group; the judge
# and its users (evaluation, synthesis) do not import the ERPO driver.
UPWARDS = [
    ("safer_dist.rollout", "safer_dist.cluster"), ("safer_dist.weights", "safer_dist.cluster"),
    ("safer_dist.weights", "safer_dist.rollout"), ("safer_dist.weights", "safer_dist.erpo"),
    ("safer_dist.weights", "safer_dist.train.learner"), ("safer_dist.cluster.rollout", "safer_dist.cluster.group"),
    ("safer_dist.judging", "safer_dist.erpo"), ("safer_dist.evaluation", "safer_dist.erpo"),
    ("safer_dist.synth", "safer_dist.erpo"), ("safer_dist.rollout", "safer_dist.erpo.controller"),
]


def test_imports_go_downwards():
    graph = import_graph()
    bad = sorted((a, b) for a, deps in graph.items() for b in deps for hi, lo in UPWARDS if _in(a, [hi]) and _in(b, [lo]))
    assert bad == []


@pytest.mark.parametrize("module", ["safer_dist/train/learner.py", "safer_dist/train/step_dpo.py",
                                    "safer_dist/rollout/worker.py", "safer_dist/rollout/tensor_parallel.py"])
def test_actor_modules_import_the_library_at_the_top(module):
    """The learner's and the rollout worker's modules import ``safer_dist`` at module level only
    (heavy third-party stacks, deepspeed and ray, may still be imported where they are used)."""
    tree = ast.parse((REPO / module).read_text())
    top = set(map(id, tree.body))
    nested = [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top
        and any(n.startswith("safer_dist") for n in ([node.module or ""] if isinstance(node, ast.ImportFrom)
                                                      else [a.name for a in node.names]))
    ]
    assert nested == [], f"function-level safer_dist imports in {module} at lines {nested}"
