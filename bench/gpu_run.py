"""The whole job on one GPU: `safer run` (SFT, evaluation, ERPO, evaluation) with a random
model of the tinyllama-1.1b shape on the demo data, timed phase by phase.

    python bench/gpu_run.py --json gpu-run.json            # one GPU, ~5-8 min
    python bench/gpu_run.py --smoke                         # CPU, tiny model: checks the script runs

What it does:

1. writes the seeded demo data (``--num-sft`` traces, ``--num-erpo`` ERPO prompts, ``--num-eval``
   held-out prompts) and a random Llama of ``--shape`` (bench/gpu.py's shapes; a 3k byte-level
   BPE tokenizer trained on the traces, the shape's vocabulary sizing embedding and head);
2. runs ``python -m launcher run configs/tiny.yaml`` with overrides for one GPU: 1 learner and 1
   rollout worker on the same GPU (``rollout.placement=colocate``), ``--sft-steps`` SFT steps,
   one ERPO iteration over ``--num-erpo`` prompts, evaluation of ``--num-eval`` prompts before and
   after ERPO (the overrides are printed; ``--set key=value`` adds more);
3. while it runs, samples the GPU every ``--sample-ms`` with ``nvidia-smi`` (utilisation: the
   share of the sample period in which a kernel ran; memory used on the device, every process
   together — learner and rollout worker share the GPU);
4. reads the run's ``phases.jsonl`` (safer_dist/runtime/phases.py: each phase's wall-clock start
   and end) and reports per phase: count, wall time, mean GPU utilisation, peak device memory;
   and the GPU's busy share between the start of SFT training and the end of the last step-DPO
   step, or of the last ERPO phase when no pair was made (target >= 80%). Phases with low
   utilisation inside that span are what the GPU waited for.

``--json OUT`` writes the table, the samples' summary and the set-up. On CPU (``--smoke``) there
is no GPU to sample: utilisation and memory are "not measured".
"""

from __future__ import annotations

import _harness as h  # noqa: I001 - sets DS_ACCELERATOR etc. before torch/transformers imports

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BUSY_TARGET = 0.80
# The phases in the order a run goes through them (others are listed after, by name).
ORDER = ("sft_setup", "sft", "export", "eval_sft_setup", "eval_sft", "erpo_setup", "weight_sync_setup",
         "erpo_sample", "erpo_judge", "erpo_ref_logprobs", "erpo_load_pairs", "erpo_dpo", "weight_sync",
         "export_erpo", "eval_erpo_setup", "eval_erpo")


class GpuSampler:
    """``nvidia-smi`` in loop mode on a thread: (unix time, utilisation %, memory used MiB) rows,
    stamped when read. No ``nvidia-smi``: no rows."""

    def __init__(self, interval_ms: int):
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", f"-lms={interval_ms}",
             "--id=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=10)


def summarize(phases: list[dict], samples: list[tuple[float, float, float]]) -> dict:
    """Per phase and for the training span, from ``phases.jsonl`` records and GPU samples
    ``(time, utilisation %, memory MiB)``.

    ``rows``: one per phase name (``ORDER`` first): ``count``, ``wall_s`` (sum over its windows),
    ``gpu_util`` (mean utilisation of the samples inside its windows, 0-1; None without samples),
    ``peak_mem_gib`` (largest memory sample inside its windows). ``busy``: the span from the first
    ``sft`` start to the last ``erpo_dpo`` end (the last ERPO phase's end when no step-DPO step ran,
    e.g. no pairs), its seconds and ``share`` (mean utilisation of its samples, 0-1), None when
    there is no SFT or no ERPO phase."""
    names = sorted({p["phase"] for p in phases}, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))

    def inside(windows):
        return [s for s in samples if any(a <= s[0] <= b for a, b in windows)]

    rows = []
    for name in names:
        mine = [p for p in phases if p["phase"] == name]
        got = inside([(p["start"], p["end"]) for p in mine])
        rows.append({
            "phase": name, "count": len(mine), "wall_s": round(sum(p["wall_s"] for p in mine), 3),
            "gpu_util": round(sum(s[1] for s in got) / len(got) / 100, 4) if got else None,
            "peak_mem_gib": round(max(s[2] for s in got) / 1024, 2) if got else None,
        })
    starts = [p["start"] for p in phases if p["phase"] == "sft"]
    ends = [p["end"] for p in phases if p["phase"] == "erpo_dpo"] or [
        p["end"] for p in phases if p["phase"].startswith("erpo_") and p["phase"] != "erpo_setup"]
    busy = None
    if starts and ends:
        a, b = min(starts), max(ends)
        got = inside([(a, b)])
        busy = {"start": a, "end": b, "seconds": round(b - a, 3),
                "share": round(sum(s[1] for s in got) / len(got) / 100, 4) if got else None,
                "samples": len(got)}
    return {"rows": rows, "busy": busy}


def format_table(summary: dict) -> str:
    pct = lambda x: "n/m" if x is None else f"{100 * x:5.1f}%"  # noqa: E731
    gib = lambda x: "n/m" if x is None else f"{x:6.2f}"  # noqa: E731
    lines = [f"{'phase':<20s} {'count':>5s} {'wall s':>9s} {'GPU busy':>9s} {'peak GiB':>9s}"]
    for r in summary["rows"]:
        lines.append(f"{r['phase']:<20s} {r['count']:5d} {r['wall_s']:9.2f} {pct(r['gpu_util']):>9s} "
                     f"{gib(r['peak_mem_gib']):>9s}")
    busy = summary["busy"]
    if busy is None:
        lines.append("busy share: no SFT or no ERPO phase in the run")
    else:
        share = busy["share"]
        verdict = "not measured (no GPU samples)" if share is None else (
            f"{100 * share:.1f}% ({'meets' if share >= BUSY_TARGET else 'below'} the {100 * BUSY_TARGET:.0f}% target)")
        lines.append(f"busy share, first SFT step to last ERPO step ({busy['seconds']:.1f} s): {verdict}")
    lines.append("n/m: not measured (no GPU samples inside the phase)")
    return "\n".join(lines)


def overrides(args, ws: Path, model_dir: Path, data: dict, device: str) -> list[str]:
    cpus = max(1, (os.cpu_count() or 2) // 4)
    return [
        "run.name=gpu-run", f"run.output_dir={ws / 'runs'}", f"model.path={model_dir}", "data.generate_demo=false",
        f"data.train={data['sft']}", f"data.eval={data['eval']}", f"data.erpo_prompts={data['erpo_prompts']}",
        f"launch.device={device}", "learner.num_learners=1", "rollout.num_workers=1", "rollout.placement=colocate",
        f"learner.cpus_per_learner={cpus}", f"rollout.cpus_per_worker={cpus}",
        f"train.max_steps={args.sft_steps}", f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}", f"train.lr={args.lr}", "train.warmup_steps=10",
        f"rollout.batch_size={args.rollout_rows}", "erpo.iterations=1", f"erpo.prompts_per_iteration={args.num_erpo}",
        f"erpo.chunk_size={args.num_erpo}", "erpo.optim.global_batch_size=32", "erpo.optim.micro_batch_size=32",
        f"eval.max_prompts={args.num_eval}", f"eval.batch_size={args.rollout_rows}", "eval.max_new_tokens=200",
        f"checkpoint.every_steps={10 * args.sft_steps}", *args.set,
    ]


def parse_args() -> argparse.Namespace:
    from gpu import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64, help="SFT traces per optimizer step (one micro-batch)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-sft", type=int, default=4000)
    p.add_argument("--num-erpo", type=int, default=256)
    p.add_argument("--num-eval", type=int, default=256)
    p.add_argument("--rollout-rows", type=int, default=256, help="rollout.batch_size and eval.batch_size")
    p.add_argument("--sample-ms", type=int, default=200)
    p.add_argument("--timeout-s", type=int, default=900, help="stop the run after this long")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more config override")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few steps: checks the script runs")
    p.add_argument("--workdir", default=None, help="keep data, model and run here (default: a temporary directory)")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args()
    if args.smoke:
        args.shape, args.sft_steps, args.batch, args.num_sft, args.num_erpo, args.num_eval = "smoke", 4, 8, 64, 8, 8
        args.rollout_rows = 16
    return args


def main() -> None:
    args = parse_args()
    import torch

    from gpu import SHAPES, build_model_dir
    from safer_dist.data.demo import generate_demo
    from safer_dist.reasoning.rules import Rulebook
    from safer_dist.runtime import phases as phase_log
    from safer_dist.train.models import init_model_from_corpus, load_tokenizer

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    print(f"# safer run on one {device.upper()}: {args.shape}, {args.sft_steps} SFT steps, 1 ERPO iteration of "
          f"{args.num_erpo} prompts, {args.num_eval} evaluation prompts  ({' '.join(sys.argv[1:]) or 'defaults'})")
    print(f"# machine: {h.machine()}")
    if device == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    ws = Path(args.workdir) if args.workdir else Path(__import__("tempfile").mkdtemp(prefix="safer-gpu-run-"))
    ws.mkdir(parents=True, exist_ok=True)
    try:
        data = generate_demo(ws / "data", Rulebook.load(h.REPO / "configs/rules/default.yaml"), seed=args.seed,
                             num_sft=args.num_sft, num_erpo=args.num_erpo, num_eval=args.num_eval)
        tok_dir = ws / "tokenizer-model"
        if not (tok_dir / "config.json").is_file():
            texts = [json.loads(x) for x in Path(data["sft"]).read_text().splitlines()]
            init_model_from_corpus("test", [t["prompt"] for t in texts] + [t["response"] for t in texts], tok_dir,
                                   seed=args.seed, vocab_size=3000)
        model_dir = ws / f"model-{args.shape}"
        with h.Stopwatch() as sw:
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            build_model_dir(SHAPES[args.shape], load_tokenizer(tok_dir), model_dir, device=device, dtype=dtype,
                            seed=args.seed)
        print(f"# data and model written in {sw.seconds:.1f} s ({ws})")
        over = overrides(args, ws, model_dir, data, device)
        cmd = [sys.executable, "-m", "launcher", "run", str(h.REPO / "configs/tiny.yaml"), *over]
        print("# command: " + " ".join(cmd[1:]), flush=True)
        sampler = GpuSampler(args.sample_ms) if device == "cuda" else None
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=h.REPO, timeout=args.timeout_s, check=False)
        finally:
            if sampler is not None:
                sampler.stop()
        wall = time.perf_counter() - t0
        run_dir = ws / "runs" / "gpu-run"
        recs = phase_log.read(run_dir / "phases.jsonl") if (run_dir / "phases.jsonl").is_file() else []
        summary = summarize(recs, sampler.samples if sampler else [])
        print(f"\n`safer run` exited {proc.returncode} after {wall:.1f} s; phases (run dir {run_dir}):")
        print(format_table(summary))
        if args.json:
            out = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                   "torch": torch.__version__, "machine": h.machine(), "command": cmd[1:], "returncode": proc.returncode,
                   "wall_s": round(wall, 2), "args": vars(args), **summary,
                   "samples": len(sampler.samples) if sampler else 0}
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        if proc.returncode != 0:
            sys.exit(f"safer run failed with exit code {proc.returncode}")
    finally:
        if not args.workdir:
            shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
