"""Benchmark evaluation: several models x benchmark files x jailbreak attacks -> one report.

    safer eval CONFIG eval.benchmarks=harmbench:FILE,xstest:FILE eval.attacks=all \\
        eval.models=base:DIR,sft:DIR,erpo:DIR

::

    benchmark files --(benchmarks.py)--> records --(attacks.py)--> + attacked harmful copies
    for each model:  jobs.eval_job(records)  -> eval/<tag>.jsonl   (per-prompt judgements)
    group rows: per benchmark (attack none), per attack (harmful rows)
                                             -> eval/summary.json, report.md, *.png

Everything that can be checked (model directories, benchmark files and their columns) is
checked before Ray starts or anything is written.
"""

from __future__ import annotations

from pathlib import Path

from safer_dist import jobs
from safer_dist.cluster.group import stop_ray
from safer_dist.config import Config, parse_named_list
from safer_dist.evaluation.attacks import expand, parse_attacks
from safer_dist.evaluation.evaluate import summarize, summarize_by_attack
from safer_dist.evaluation.report import write_report
from safer_dist.evaluation.safety_sets import load_benchmark
from safer_dist.reasoning.rules import Rulebook
from safer_dist.runtime.log import get_logger

log = get_logger("eval_suite")

HELDOUT = "heldout"


def resolve_models(cfg: Config, default_model: str | Path) -> list[tuple[str, str]]:
    """(tag, directory) per model: ``eval.models``, else ``default_model`` tagged by its name."""
    models = parse_named_list("eval.models", cfg.eval.models) or [(Path(default_model).name, str(default_model))]
    for tag, path in models:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"eval.models: {tag}={path}: not a local Hugging Face model directory (no config.json)")
    return models


def load_suite_records(cfg: Config, rulebook) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every benchmark's records (``eval.max_prompts`` each) plus the attacked copies, and the
    (benchmark, file) list. No ``eval.benchmarks``: the held-out set ``data.eval``."""
    benches = parse_named_list("eval.benchmarks", cfg.eval.benchmarks)
    records: list[dict] = []
    if benches:
        for name, path in benches:
            records += load_benchmark(name, path, rulebook, max_prompts=cfg.eval.max_prompts)
    else:
        benches = [(HELDOUT, cfg.data.eval)]
        records = [{**r, "benchmark": HELDOUT} for r in load_benchmark("prompts", cfg.data.eval, rulebook,
                                                                         max_prompts=cfg.eval.max_prompts)]
    seen: dict[str, str] = {}
    for r in records:
        if r["id"] in seen:
            raise ValueError(f"duplicate prompt id {r['id']!r} in benchmarks {seen[r['id']]} and {r['benchmark']}")
        seen[r["id"]] = r["benchmark"]
    return expand(records, parse_attacks(cfg.eval.attacks)), benches


def group_summaries(rows: list[dict]) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """(overall summary of the unattacked rows, summary per benchmark, summary per attack over
    the harmful rows)."""
    overall, per_attack = summarize_by_attack(rows)
    plain = [r for r in rows if r.get("attack") in (None, "none")]
    benches = list(dict.fromkeys(r["benchmark"] for r in plain))
    per_bench = {b: summarize([r for r in plain if r["benchmark"] == b]) for b in benches}
    return overall, per_bench, per_attack


def suite_job(cfg: Config, default_model: str | Path) -> dict:
    """Evaluate every model on every benchmark and attack; write the report. Returns
    ``{"results": {tag: {...}}, "report": path}``."""
    rulebook = Rulebook.load(cfg.data.rulebook)
    models = resolve_models(cfg, default_model)
    records, benches = load_suite_records(cfg, rulebook)
    log.info("%d models x %d prompts (%d benchmark(s), attacks: %s)", len(models), len(records), len(benches),
             cfg.eval.attacks or "none")
    results: dict[str, dict] = {}
    try:
        for tag, path in models:
            out = jobs.eval_job(cfg, path, tag, keep_ray=True, records=records)
            overall, per_bench, per_attack = group_summaries(out["rows"])
            for key in ("model", "judge", "generation_wall_s"):
                overall[key] = out["summary"].get(key)
            results[tag] = {"summary": overall, "sample": out["sample"], "benchmarks": per_bench, "attacks": per_attack}
    finally:
        stop_ray()
    jobs.record_summaries(cfg.run.dir, {t: {**r["summary"], "benchmarks": r["benchmarks"], "attacks": r["attacks"]}
                                        for t, r in results.items()})
    intro = ("Benchmark evaluation on " + ", ".join(f"{n} (`{p}`)" for n, p in benches)
             + (f"; attacks: {cfg.eval.attacks}" if cfg.eval.attacks else "") + ".")
    report = write_report(cfg.run.dir, results, intro=intro)
    return {"results": results, "report": str(report)}


def format_suite(results: dict[str, dict]) -> str:
    """A plain-text side-by-side table of the headline numbers (for the terminal)."""
    tags = list(results)
    lines = [f"{'benchmark / attack':34s}" + "".join(f"{t:>14s}" for t in tags)]

    def pct(v):
        return "–" if v is None or v != v else f"{100 * v:.1f}%"

    benches = list(dict.fromkeys(b for t in tags for b in results[t]["benchmarks"]))
    for b in benches:
        for key, label in (("attack_success_rate", "ASR"), ("over_refusal_rate", "over-refusal"),
                           ("format_validity", "format validity")):
            lines.append(f"{b + ' ' + label:34s}" + "".join(
                f"{pct(results[t]['benchmarks'].get(b, {}).get(key)):>14s}" for t in tags))
    attacks = list(dict.fromkeys(a for t in tags for a in results[t]["attacks"]))
    for a in attacks:
        lines.append(f"{'attack ' + a + ' ASR':34s}" + "".join(
            f"{pct(results[t]['attacks'].get(a, {}).get('attack_success_rate')):>14s}" for t in tags))
    return "\n".join(lines)
