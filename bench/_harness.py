"""Shared pieces of the benchmarks in bench/: workspace, timing protocol, report.

Protocol (every benchmark): one process, CPU, the same locally built random model and the
same seeded demo data for every contestant; each contestant runs a timed *window* of work in
turn (A, B, C, A, B, C, ...), ``--repeats`` windows each; the reported figure is the median
of the per-window rates. Set-up, warm-up and one-off preprocessing are outside the windows.
The final line is ``ratio: X.XX (>1 means safer is faster)``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# DeepSpeed reads this at import; it must be set before anything imports deepspeed.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built locally; never reach a hub

REPO = Path(__file__).resolve().parent.parent


def parser(description: str, *, repeats: int, steps: int,
           preset: str | None = "bench-20m") -> argparse.ArgumentParser:
    """The options every benchmark takes. ``preset=None``: no ``--preset`` option; the benchmark
    builds its own model and uses the workspace's (tiny ``test``) model only for its tokenizer."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=repeats, help="timed windows per contestant (median reported)")
    p.add_argument("--steps", type=int, default=steps, help="units of work (optimizer steps, batches) per window")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for every contestant)")
    if preset is None:
        p.set_defaults(preset="test")
    else:
        p.add_argument("--preset", default=preset, help="safer_dist.train.models preset of the random model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="smallest settings: checks the benchmark runs, measures nothing")
    p.add_argument("--workdir", default=None, help="keep data and model here (default: a temporary directory)")
    return p


def apply_smoke(args: argparse.Namespace, **overrides) -> None:
    """In --smoke mode: 1 window of the smallest work, the tiny test model."""
    if args.smoke:
        args.repeats, args.steps, args.preset = 1, overrides.pop("steps", 1), "test"
        for k, v in overrides.items():
            setattr(args, k, v)


@dataclass
class Workspace:
    root: Path
    sft_path: Path
    erpo_path: Path
    model_dir: Path
    records: list[dict]

    def cleanup(self, keep: bool) -> None:
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def workspace(args: argparse.Namespace, *, num_sft: int) -> Workspace:
    """Seeded demo data (variable-length Ex-Ante traces), a byte-level BPE tokenizer trained
    on it and a randomly initialised ``args.preset`` Llama; all local, built in seconds."""
    from safer_dist.data.demo import generate_demo
    from safer_dist.data.records import load_records
    from safer_dist.train.models import init_model_from_corpus
    from safer_dist.reasoning.rules import Rulebook

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="safer-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    paths = generate_demo(root / "data", Rulebook.load(REPO / "configs/rules/default.yaml"), seed=args.seed,
                          num_sft=num_sft, num_erpo=64, num_eval=16)
    records = load_records(paths["sft"], "sft")
    model_dir = root / f"model-{args.preset}"
    if not (model_dir / "config.json").is_file():
        corpus = [r["prompt"] for r in records] + [r["response"] for r in records]
        init_model_from_corpus(args.preset, corpus, model_dir, seed=args.seed, vocab_size=3000)
    return Workspace(root, paths["sft"], paths["erpo_prompts"], model_dir, records)


def learner_sections(args: argparse.Namespace, model_dir: Path, train_path: Path, **train_overrides) -> dict:
    """The config sections of a single-process safer learner: world size 1, ZeRO
    ``args.zero_stage``, ``args.global_batch`` sequences (or pairs) per optimizer step in
    micro-batches of ``args.micro_batch``, SFT data ``train_path`` tokenized without segment
    dropout (every contestant sees the same tokens). ``train_overrides`` are further
    ``TrainSection`` fields; everything else keeps the learner's defaults (the step-DPO loss
    too: ``DpoLossSection()``)."""
    from safer_dist.config import DataSection, DpoLossSection, LearnerSection, ModelSection, TrainSection

    return {
        "learner": LearnerSection(num_learners=1, zero_stage=args.zero_stage, cpus_per_learner=args.threads),
        "train": TrainSection(max_steps=1 << 20, global_batch_size=args.global_batch,
                              micro_batch_size=args.micro_batch, warmup_steps=0, **train_overrides),
        "model": ModelSection(path=str(model_dir), attn_implementation="auto"),
        "data": DataSection(train=str(train_path), max_seq_len=1024, segment_dropout=0.0),
        "dpo_loss": DpoLossSection(),
    }


def safer_learner(sections: dict, seed: int, device: str = "cpu"):
    """``safer_dist.train.learner.Learner`` exactly as a learner rank runs it (a DeepSpeed engine over
    its own 1-rank process group), set up from :func:`learner_sections`."""
    from safer_dist.train.learner import Learner

    learner = Learner(sections["learner"], sections["train"], sections["model"], sections["data"], seed=seed,
                      device=device, dpo_loss=sections["dpo_loss"])
    learner.setup(0, 1, "127.0.0.1", free_port())
    return learner


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


Window = Callable[[], tuple[float, float]]  # runs one window; returns (units of work, seconds)


def alternate(contestants: dict[str, Window], repeats: int, *, log: bool = True) -> dict[str, list[float]]:
    """Run each contestant's window in turn, ``repeats`` rounds; per-window rates (units/s)."""
    rates: dict[str, list[float]] = {name: [] for name in contestants}
    for r in range(repeats):
        for name, window in contestants.items():
            units, seconds = window()
            rates[name].append(units / seconds)
            if log:
                print(f"  round {r + 1}/{repeats}  {name:<56s} {units:9.0f} in {seconds:6.2f} s = {units / seconds:9.1f}/s",
                      flush=True)
    return rates


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(title: str, unit: str, rates: dict[str, list[float]], notes: dict[str, str] | None = None) -> None:
    notes = notes or {}
    print(f"\n{title}")
    head = f"| {'contestant':<56s} | {'median ' + unit:>20s} | {'min':>9s} | {'max':>9s} | {'windows':>7s} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, xs in rates.items():
        print(f"| {name:<56s} | {median(xs):20.1f} | {min(xs):9.1f} | {max(xs):9.1f} | {len(xs):7d} |")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    print(f"load average at the end (1/5/15 min): {load_average()}")


def paired_line(rates: dict[str, list[float]], safer: str, peer: str) -> str:
    """The median of the per-round ratios: windows run back to back, so a round's ratio is
    less exposed to slow changes in machine load than the ratio of the medians."""
    ratios = [a / b for a, b in zip(rates[safer], rates[peer])]
    return f"per-round ratios {', '.join(f'{r:.2f}' for r in ratios)}; median {median(ratios):.2f}"


def load_average() -> str:
    """Other processes on the machine slow every contestant, but not equally: say how busy it was."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def ratio_line(safer_rate: float, peer_rate: float, label: str = "") -> str:
    line = f"ratio: {safer_rate / peer_rate:.2f} (>1 means safer is faster)"
    return f"{line}  [{label}]" if label else line


def machine() -> str:
    """CPU model, cores and library versions, for the report."""
    import torch
    import transformers

    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}",
                f"transformers {transformers.__version__}"]
    for name in ("deepspeed", "trl", "accelerate"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"{model}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; " + ", ".join(versions)


def header(name: str, args: argparse.Namespace) -> None:
    print(f"# {name}  ({' '.join(sys.argv[1:]) or 'defaults'})")
    print(f"# machine: {machine()}")
    print(f"# load average at start (1/5/15 min): {load_average()}")
    if args.smoke:
        print("# --smoke: smallest settings; the figures below are not measurements")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stopwatch:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
