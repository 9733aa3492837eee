"""``report.md`` and PNG plots for a run: evaluation side by side, training curves, ERPO
per-iteration metrics, and — for benchmark evaluations (``safer eval eval.benchmarks=...``) —
per-benchmark and per-attack tables with their plots."""

from __future__ import annotations

import json
from pathlib import Path

from safer_dist.data.chat import prompt_text
from safer_dist.runtime.io import atomic_write_text
from safer_dist.runtime.log import get_logger

log = get_logger("report")

ROWS = (
    ("format_validity", "format validity", True),
    ("harmful_refusal_rate", "harmful refusal rate", True),
    ("benign_compliance_rate", "benign compliance rate", True),
    ("strategy_accuracy", "strategy accuracy", True),
    ("category_accuracy", "category accuracy (harmful)", True),
    ("fully_correct_rate", "fully correct traces", True),
    ("mean_reasoning_tokens", "mean reasoning tokens", False),
    ("mean_answer_tokens", "mean answer tokens", False),
    ("mean_latency_s", "mean generation latency (s/prompt)", False),
    ("attack_success_rate", "attack success rate (harmful answered)", True),
    ("over_refusal_rate", "over-refusal rate (benign refused)", True),
    ("jailbreak_success_rate", "jailbreak attack success rate", True),
)
# Per-benchmark table rows (metric key, label, is a rate).
BENCH_ROWS = (
    ("attack_success_rate", "attack success rate (harmful answered)", True),
    ("over_refusal_rate", "over-refusal rate (benign refused)", True),
    ("harmful_refusal_rate", "harmful: strategy not comply", True),
    ("format_validity", "format validity", True),
    ("mean_reasoning_tokens", "mean reasoning tokens", False),
    ("mean_answer_tokens", "mean answer tokens", False),
    ("mean_latency_s", "mean latency (s/prompt)", False),
)


def _fmt(key: str, value, pct: bool) -> str:
    if value is None or value != value:  # missing or NaN (no prompts of that kind)
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:.3g}"


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on training hosts). Imported
    when a report draws plots, so that importing this module stays cheap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(run_dir: Path, metrics: list[dict]) -> list[Path]:
    """Training curves and ERPO per-iteration metrics as PNG files in ``run_dir``."""
    plt = _pyplot()

    out = []
    sft = [m for m in metrics if m.get("stage") == "sft"]
    erpo = [m for m in metrics if m.get("stage") == "erpo"]
    iters = [m for m in metrics if m.get("stage") == "erpo_iter"]
    if sft or erpo:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        if sft:
            axes[0].plot([m["step"] for m in sft], [m["loss"] for m in sft], label="train loss")
            valid = [m for m in sft if "valid_loss" in m]
            if valid:
                axes[0].plot([m["step"] for m in valid], [m["valid_loss"] for m in valid], "o-", label="valid loss")
            axes[0].set(title="SFT loss", xlabel="step", yscale="log")
            axes[0].legend()
        if erpo:
            axes[1].plot([m["step"] for m in erpo], [m["loss"] for m in erpo], label="loss")
            axes[1].plot([m["step"] for m in erpo], [m["preference_accuracy"] for m in erpo], label="pref. accuracy")
            axes[1].set(title="ERPO step-DPO", xlabel="step")
            axes[1].legend()
        fig.tight_layout()
        out.append(run_dir / "training.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    if iters:
        x = [m["iteration"] for m in iters]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
        axes[0].bar(x, [m["pairs"] for m in iters])
        axes[0].set(title="pairs made", xlabel="iteration")
        axes[1].plot(x, [m["mean_candidate_tokens"] for m in iters], marker="o")
        axes[1].set(title="mean tokens per candidate step", xlabel="iteration")
        axes[2].plot(x, [m["judge_safety"] for m in iters], marker="o", label="safety")
        axes[2].plot(x, [m["judge_utility"] for m in iters], marker="o", label="utility")
        axes[2].set(title="judge scores of candidates", xlabel="iteration")
        axes[2].legend()
        axes[3].plot(x, [m["reward_margin"] for m in iters], marker="o", label="reward margin")
        axes[3].plot(x, [m["preference_accuracy"] for m in iters], marker="o", label="pref. accuracy")
        axes[3].set(title="step-DPO", xlabel="iteration")
        axes[3].legend()
        for ax in axes:
            ax.set_xticks(x)
        fig.tight_layout()
        out.append(run_dir / "erpo_iterations.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out


def _count(s: dict) -> str:
    return f"{s.get('num_harmful', '?')} / {s.get('num_benign', '?')}"


def benchmark_sections(results: dict[str, dict]) -> list[str]:
    """Markdown for per-benchmark and per-attack results: ``results[tag]["benchmarks"]`` maps a
    benchmark to its summary, ``results[tag]["attacks"]`` an attack to its summary."""
    tags = list(results)
    lines: list[str] = []
    benches = list(dict.fromkeys(b for t in tags for b in results[t].get("benchmarks", {})))
    for bench in benches:
        got = {t: results[t].get("benchmarks", {}).get(bench, {}) for t in tags}
        lines += [f"### {bench}", "", "| metric | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
        lines.append("| prompts (harmful / benign) | " + " | ".join(_count(got[t]) for t in tags) + " |")
        for key, label, pct in BENCH_ROWS:
            lines.append(f"| {label} | " + " | ".join(_fmt(key, _num(got[t].get(key)), pct) for t in tags) + " |")
        lines.append("")
    attacks = list(dict.fromkeys(a for t in tags for a in results[t].get("attacks", {})))
    if attacks:
        lines += ["## Attacks", "", "Attack success rate on the harmful prompts of all benchmarks, per "
                  "transformation (`none`: the prompts as written).", "",
                  "| attack | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
        for a in attacks:
            cells = [results[t].get("attacks", {}).get(a, {}) for t in tags]
            lines.append(f"| {a} | " + " | ".join(_fmt("", _num(c.get("attack_success_rate")), True) for c in cells) + " |")
        lines.append("")
    return lines


def _num(value):
    """None for a missing or NaN metric (shown as a dash)."""
    return None if value is None or value != value else value


def plot_benchmarks(run_dir: Path, results: dict[str, dict]) -> list[Path]:
    """Grouped bar charts (one bar per model): attack success and over-refusal per benchmark,
    attack success per attack, reasoning / answer tokens and latency."""
    plt = _pyplot()

    tags = list(results)

    def bars(ax, groups, key, source, title, pct=True):
        width = 0.8 / max(1, len(tags))
        for i, t in enumerate(tags):
            vals = [_num(results[t].get(source, {}).get(g, {}).get(key)) for g in groups] if source else \
                   [_num(results[t]["summary"].get(k)) for k in groups]
            ys = [(100 * v if pct else v) if v is not None else 0.0 for v in vals]
            ax.bar([x + i * width for x in range(len(groups))], ys, width, label=t)
        ax.set_xticks([x + width * (len(tags) - 1) / 2 for x in range(len(groups))])
        ax.set_xticklabels(groups, rotation=20, ha="right")
        ax.set(title=title, ylabel="%" if pct else "")
        if pct:
            ax.set_ylim(0, 119)  # headroom for the legend above 100%
        ax.legend(fontsize=8, ncol=len(tags), loc="upper center")

    out = []
    benches = list(dict.fromkeys(b for t in tags for b in results[t].get("benchmarks", {})))
    if benches:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        bars(axes[0], benches, "attack_success_rate", "benchmarks", "attack success rate (harmful)")
        bars(axes[1], benches, "over_refusal_rate", "benchmarks", "over-refusal rate (benign)")
        fig.tight_layout()
        out.append(run_dir / "benchmarks.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    attacks = list(dict.fromkeys(a for t in tags for a in results[t].get("attacks", {})))
    if attacks:
        fig, ax = plt.subplots(figsize=(8, 4))
        bars(ax, attacks, "attack_success_rate", "attacks", "attack success rate per attack")
        fig.tight_layout()
        out.append(run_dir / "attacks.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    bars(axes[0], ["mean_reasoning_tokens", "mean_answer_tokens"], None, None, "tokens per response", pct=False)
    bars(axes[1], ["mean_latency_s"], None, None, "latency (s/prompt)", pct=False)
    fig.tight_layout()
    out.append(run_dir / "efficiency.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
    return out


def write_report(run_dir: Path, results: dict[str, dict], *, intro: str | None = None) -> Path:
    """``results`` maps a model tag (base, sft, erpo, ...) to ``{"summary": ..., "sample": ...}``, plus
    ``"benchmarks"`` and ``"attacks"`` for a benchmark evaluation, ``"attacks"`` alone for
    ``safer run`` with ``eval.attacks`` (see ``benchmark_sections``);
    empty (``safer sft``): the training curves and the final train / valid loss only."""
    run_dir = Path(run_dir)
    tags = list(results)
    intro = intro or "Held-out evaluation (prompts, phrasings and topics unseen in training)."
    lines = ["# safer run report", "", intro, ""]
    if tags:
        lines.append("| metric | " + " | ".join(tags) + " |")
        lines.append("|---|" + "---|" * len(tags))
        for key, label, pct in ROWS:
            if any(key in results[t]["summary"] for t in tags):  # jailbreak_success_rate: only with attacks
                lines.append(f"| {label} | " + " | ".join(_fmt(key, results[t]["summary"].get(key), pct) for t in tags) + " |")
        lines.append("| prompts | " + " | ".join(str(results[t]["summary"]["num_prompts"]) for t in tags) + " |")
        lines += ["", "Models: " + ", ".join(f"{t} = `{results[t]['summary']['model']}`" for t in tags), ""]
    bench_pngs = []
    if any("benchmarks" in results[t] or "attacks" in results[t] for t in tags):
        if any("benchmarks" in results[t] for t in tags):
            lines += ["## Benchmarks", "", f"Judge: {results[tags[0]]['summary'].get('judge', 'rule')}. Per-prompt "
                      "judgements: " + ", ".join(f"`eval/{t}.jsonl`" for t in tags) + ".", ""]
        lines += benchmark_sections(results)
        try:
            bench_pngs = plot_benchmarks(run_dir, results)
        except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the report
            log.warning("could not draw benchmark plots: %s", e)
    metrics = _read_metrics(run_dir)
    sft = [m for m in metrics if m.get("stage") == "sft"]
    if sft:
        lines += ["## SFT", "", f"{sft[-1]['step']} steps; final train loss {sft[-1]['loss']:.4f}"
                  + "".join(f", valid loss {m['valid_loss']:.4f} at step {m['step']}"
                            for m in [m for m in sft if "valid_loss" in m][-1:]) + ".", ""]
    iters = [m for m in metrics if m.get("stage") == "erpo_iter"]
    if iters:
        lines += ["## ERPO iterations", "", "| iteration | pairs | by reason | mean step tokens | safety | utility | reward margin | pref. accuracy |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in iters:
            lines.append(
                f"| {m['iteration']} | {m['pairs']} | {m['pairs_by_reason']} | {m['mean_candidate_tokens']:.1f} | "
                f"{m['judge_safety']:.3f} | {m['judge_utility']:.3f} | {m['reward_margin']:.3f} | {m['preference_accuracy']:.3f} |"
            )
        lines.append("")
    try:
        pngs = plot(run_dir, metrics)
    except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the report
        log.warning("could not draw plots: %s", e)
        pngs = []
    lines += [f"![{p.stem}]({p.name})" for p in bench_pngs + pngs]
    for tag in tags:
        sample = results[tag].get("sample")
        if sample:
            lines += ["", f"## Sample ({tag})", "", f"Prompt: {prompt_text(sample['prompt'])}", "", "```", sample["output"], "```"]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
