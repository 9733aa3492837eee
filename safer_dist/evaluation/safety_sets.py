"""Readers for the public safety benchmark files users download themselves.

Each reader turns a file into evaluation records (the ``prompts`` record kind of
``safer_dist.data.records`` plus a few fields)::

    {id, prompt, harmful, category, strategy, kind, benchmark, source_category}

``category`` is a rulebook id when the benchmark's own category maps clearly onto one of the
rulebook's categories (by category *name*, e.g. HarmBench ``cybercrime_intrusion`` ->
``cyber_abuse``), ``"none"`` for benign prompts, else None (not scored for category accuracy);
``strategy`` is the expected one where that follows (benign -> ``comply``; a mapped harmful
category -> its ``default_strategy``), else None.

Formats (columns as published; extra columns are ignored; ``.csv``, ``.tsv`` and ``.parquet``
are accepted for every benchmark):

================  ==========================================  ==============================
name              file                                        columns used
================  ==========================================  ==============================
harmbench         behavior_datasets/harmbench_behaviors_*.csv Behavior, BehaviorID (required);
                                                              SemanticCategory, ContextString
advbench          data/advbench/harmful_behaviors.csv         goal (required); target
xstest            xstest_prompts.csv                          prompt, label safe/unsafe (or, in
                                                              the v2 file, type contrast_*); id
strongreject      strongreject_dataset.csv                    forbidden_prompt (required); category
wildjailbreak     train.tsv / eval.tsv / Parquet              data_type or label; adversarial or
                                                              vanilla
prompts           any records file (JSONL / Parquet / dir)    prompt; harmful, category, ...
================  ==========================================  ==============================

A missing column raises ``BenchmarkError`` naming the file, the benchmark, the missing
column(s) and the columns found; a bad value names the file and its line (CSV/TSV) or row.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path

from safer_dist.data.records import DataError, load_records

# Benchmark category -> rulebook category name; only the clear matches are mapped.
HARMBENCH_CATEGORIES = {
    "chemical_biological": "weapons_mass_harm",
    "cybercrime_intrusion": "cyber_abuse",
    "harassment_bullying": "hate_harassment",
    "copyright": "intellectual_property",
}
STRONGREJECT_CATEGORIES = {
    "Hate, harassment and discrimination": "hate_harassment",
    "Sexual content": "sexual_content",
    "Violence": "violent_crime",
}


class BenchmarkError(DataError):
    """A benchmark file is missing, unreadable or lacks the columns of its format."""


def read_table(path: str | Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """(columns, [(location, row)]) of a ``.csv``, ``.tsv`` or ``.parquet`` file; location is
    ``"file:line"`` (the line a CSV row ends on) or ``"file: row i"``."""
    p, name = Path(path), str(path)
    if not p.is_file():
        raise BenchmarkError(f"{name}: no such file")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(str(p))
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise BenchmarkError(f"{name}: cannot read Parquet: {e}") from None
        return list(table.column_names), [(f"{name}: row {i}", r) for i, r in enumerate(table.to_pylist())]
    if p.suffix not in (".csv", ".tsv"):
        raise BenchmarkError(f"{name}: unsupported file type {p.suffix or '(none)'!r}; expected .csv, .tsv or .parquet")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # WildJailbreak completions are long
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = [(f"{name}:{reader.line_num}", row) for row in reader]
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise BenchmarkError(f"{name}: malformed {p.suffix[1:].upper()}: {e}") from None
    if not columns:
        raise BenchmarkError(f"{name}: empty file (no header row)")
    return columns, rows


def _require(name: str, bench: str, columns: list[str], required: tuple[str, ...], any_of: tuple[str, ...] = ()) -> None:
    missing = [c for c in required if c not in columns]
    if any_of and not any(c in columns for c in any_of):
        missing.append(" or ".join(any_of))
    if missing:
        raise BenchmarkError(
            f"{name}: not a {bench} file: missing column(s) {', '.join(repr(m) for m in missing)} "
            f"(found: {', '.join(columns) or 'none'})"
        )


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value).strip()


def _nonempty(where: str, row: dict, key: str) -> str:
    value = _text(row, key)
    if not value:
        raise BenchmarkError(f"{where}: column {key!r}: empty value")
    return value


class _Labeller:
    """Rulebook ids and expected strategies for mapped category names."""

    def __init__(self, rulebook):
        self.by_name = {c.name: c for c in rulebook.categories} if rulebook is not None else {}

    def record(self, bench: str, rid: str, prompt: str, harmful: bool, source_category: str | None,
               mapped_name: str | None) -> dict:
        category = strategy = None
        if not harmful:
            category, strategy = "none", "comply"
        elif mapped_name in self.by_name:
            cat = self.by_name[mapped_name]
            category, strategy = cat.id, cat.default_strategy
        return {"id": f"{bench}-{rid}", "prompt": prompt, "harmful": harmful, "category": category,
                "strategy": strategy, "kind": "harmful" if harmful else "benign", "benchmark": bench,
                "source_category": source_category or None}


def read_harmbench(path, rulebook=None) -> list[dict]:
    columns, rows = read_table(path)
    _require(str(path), "HarmBench behaviors", columns, ("Behavior", "BehaviorID"))
    lab, out = _Labeller(rulebook), []
    for where, row in rows:
        behavior = _nonempty(where, row, "Behavior")
        context = _text(row, "ContextString")
        # HarmBench puts the context first for contextual behaviors.
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        sem = _text(row, "SemanticCategory")
        out.append(lab.record("harmbench", _nonempty(where, row, "BehaviorID"), prompt, True, sem,
                              HARMBENCH_CATEGORIES.get(sem)))
    return out


def read_advbench(path, rulebook=None) -> list[dict]:
    columns, rows = read_table(path)
    _require(str(path), "AdvBench harmful_behaviors", columns, ("goal",))
    lab = _Labeller(rulebook)
    return [lab.record("advbench", str(i), _nonempty(where, row, "goal"), True, None, None)
            for i, (where, row) in enumerate(rows)]


def read_xstest(path, rulebook=None) -> list[dict]:
    columns, rows = read_table(path)
    # xstest_prompts.csv has a safe/unsafe label; the older v2 file marks unsafe prompts by a
    # type starting with "contrast_".
    _require(str(path), "XSTest prompts", columns, ("prompt",), any_of=("label", "type"))
    lab, out = _Labeller(rulebook), []
    for i, (where, row) in enumerate(rows):
        if "label" in columns:
            label = _text(row, "label").lower()
            if label not in ("safe", "unsafe"):
                raise BenchmarkError(f"{where}: column 'label': expected safe or unsafe, got {row.get('label')!r}")
            harmful = label == "unsafe"
        else:
            harmful = _text(row, "type").startswith("contrast_")
        rid = _text(row, "id") or _text(row, "id_v2") or str(i)
        out.append(lab.record("xstest", rid, _nonempty(where, row, "prompt"), harmful, _text(row, "type"), None))
    return out


def read_strongreject(path, rulebook=None) -> list[dict]:
    columns, rows = read_table(path)
    _require(str(path), "StrongREJECT", columns, ("forbidden_prompt",))
    lab, out = _Labeller(rulebook), []
    for i, (where, row) in enumerate(rows):
        cat = _text(row, "category")
        out.append(lab.record("strongreject", str(i), _nonempty(where, row, "forbidden_prompt"), True, cat,
                              STRONGREJECT_CATEGORIES.get(cat)))
    return out


_WJ_TYPES = ("vanilla_harmful", "vanilla_benign", "adversarial_harmful", "adversarial_benign")


def read_wildjailbreak(path, rulebook=None) -> list[dict]:
    columns, rows = read_table(path)
    _require(str(path), "WildJailbreak", columns, (), any_of=("data_type", "label"))
    _require(str(path), "WildJailbreak", columns, (), any_of=("adversarial", "vanilla"))
    lab, out = _Labeller(rulebook), []
    for i, (where, row) in enumerate(rows):
        data_type = _text(row, "data_type")
        if data_type:
            if data_type not in _WJ_TYPES:
                raise BenchmarkError(f"{where}: column 'data_type': expected one of {', '.join(_WJ_TYPES)}, got {data_type!r}")
            harmful = data_type.endswith("_harmful")
        else:
            label = _text(row, "label")
            if label not in ("0", "1"):
                raise BenchmarkError(f"{where}: column 'label': expected 0 or 1 (or a data_type), got {row.get('label')!r}")
            harmful = label == "1"
        # Adversarial rows carry the jailbreak in `adversarial`; vanilla rows leave it empty.
        prompt = _text(row, "adversarial") or _text(row, "vanilla")
        if not prompt:
            raise BenchmarkError(f"{where}: columns 'adversarial' and 'vanilla' are both empty")
        out.append(lab.record("wildjailbreak", str(i), prompt, harmful, data_type or None, None))
    return out


def read_prompts(path, rulebook=None) -> list[dict]:
    recs = load_records(path, "prompts").to_list()
    return [{**r, "benchmark": r.get("benchmark") or "prompts"} for r in recs]


BENCHMARKS: dict[str, Callable[..., list[dict]]] = {
    "harmbench": read_harmbench,
    "advbench": read_advbench,
    "xstest": read_xstest,
    "strongreject": read_strongreject,
    "wildjailbreak": read_wildjailbreak,
    "prompts": read_prompts,
}


def load_benchmark(name: str, path: str | Path, rulebook=None, *, max_prompts: int = 0) -> list[dict]:
    """Records of benchmark ``name`` from ``path`` (the first ``max_prompts``; 0: all)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    records = BENCHMARKS[name](path, rulebook)
    if not records:
        raise BenchmarkError(f"{path}: no prompts in this {name} file")
    for r in records:
        r["benchmark"] = name
    return records[:max_prompts] if max_prompts else records
