"""Job entry points behind the CLI: prepare inputs, SFT, evaluation, and the whole run.

Every job validates its inputs (config, model directory, data) *before* it writes to the
run directory, so a mistake never touches an existing run or its checkpoints.
"""

from __future__ import annotations

import json
import re
import time
from operator import attrgetter
from pathlib import Path

from safer_dist.checkpointing.checkpoint import Checkpointer, wait_for_writes
from safer_dist.cluster.group import LearnerGroup, start_ray, stop_ray
from safer_dist.cluster.placement import PhaseBundles, require_placement
from safer_dist.cluster.rollout import RolloutGroup
from safer_dist.config import Config, save_config
from safer_dist.data.chat import prompt_text, system_prompt
from safer_dist.data.demo import generate_demo
from safer_dist.data.records import load_records
from safer_dist.erpo.controller import train_erpo
from safer_dist.judging.classifier import ClassifierJudge
from safer_dist.judging.judge import ModelJudge, RuleJudge
from safer_dist.evaluation.attacks import expand, parse_attacks
from safer_dist.evaluation.evaluate import evaluate, pick_sample, summarize_by_attack
from safer_dist.evaluation.report import write_report
from safer_dist.reasoning.rules import Rulebook
from safer_dist.runtime import phases, stop
from safer_dist.runtime.io import atomic_write_json
from safer_dist.runtime.log import get_logger
from safer_dist.runtime.phases import phase
from safer_dist.train.lora import check_adapters
from safer_dist.train.lora_reference import AdaptersOffReference
from safer_dist.train.models import init_model_from_corpus, load_tokenizer
from safer_dist.train.pretrained import REGISTRY_MODELS
from safer_dist.train.sft import train_sft
from safer_dist.train.sft_data import split_valid

log = get_logger("jobs")


def prepare_inputs(cfg: Config) -> None:
    """Create the embedded default's demo data and initial model when they are missing.

    Only at the paths the config file itself gives: ``data.train`` when ``data.generate_demo``
    is set, ``model.path`` when ``model.init_preset`` is set, and in neither case a path that
    an override changed (a typo there must fail, not train on something made up). Any other
    missing input fails in :func:`preflight`, naming it.
    """
    train = Path(cfg.data.train)
    if cfg.data.generate_demo and not train.exists() and cfg.override_for("data.train") is None:
        t0 = time.perf_counter()
        generate_demo(train.parent, Rulebook.load(cfg.data.rulebook), seed=cfg.run.seed, num_sft=cfg.data.demo_num_sft)
        log.info("generated demo data in %s (%.1f s)", train.parent, time.perf_counter() - t0)
    model = Path(cfg.model.path)
    if cfg.model.init_preset and not model.exists() and cfg.override_for("model.path") is None:
        if not train.exists():
            return  # preflight names the missing data
        recs = load_records(cfg.data.train, "sft")
        corpus = [prompt_text(r["prompt"]) for r in recs] + [r["response"] for r in recs]
        init_model_from_corpus(cfg.model.init_preset, corpus, model, seed=cfg.run.seed)
        log.info("initialised a %s model in %s", cfg.model.init_preset, model)


# A Hugging Face hub name: ORG/NAME, nothing more.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def preflight(cfg: Config, *, need_train: bool = True) -> None:
    """Fail fast, before anything is written, on a missing model or bad data. (Adapters and a
    4-bit base are checked by the jobs before they prepare inputs: ``lora.check_adapters``.)"""
    check_model_dir(cfg)
    check_chat_template(cfg.model.path, _given(cfg, "model.path"), cfg.model.trust_remote_code)
    Rulebook.load(cfg.data.rulebook)
    if need_train:
        train = Path(cfg.data.train)
        if not train.exists():
            raise ValueError(f"{_given(cfg, 'data.train')}: no such file{_missing_data_hint(cfg)}")
        split_valid(load_records(cfg.data.train, "sft"), cfg.data.valid_fraction, cfg.run.seed)  # too few to split?
        if cfg.data.valid:
            if not Path(cfg.data.valid).exists():
                raise ValueError(f"{_given(cfg, 'data.valid')}: no such file")
            load_records(cfg.data.valid, "sft")


def check_model_dir(cfg: Config) -> None:
    """ValueError naming ``model.path`` (as given) when it is not a local Hugging Face directory;
    a hub name gets the command that downloads it."""
    model = Path(cfg.model.path)
    written = cfg.written("model.path")
    if not model.is_dir():
        if _HUB_NAME.match(written) and not model.parent.exists():
            hint = (f"; models load from local directories, never from a hub: download it with "
                    f"`huggingface-cli download {written} --local-dir DIR` and set model.path=DIR")
        elif model.name in REGISTRY_MODELS:
            hint = (f"; create it first (the recipe never does): `safer init-model --preset {model.name} "
                    f"--out {model}`")
        elif cfg.model.init_preset and cfg.override_for("model.path"):
            hint = ("; a model.path given by an override must exist (model.init_preset creates the model only at "
                    "the config file's own model.path)")
        else:
            hint = "; models load from local Hugging Face directories (config.json, weights, tokenizer)"
        raise ValueError(f"{_given(cfg, 'model.path')}: no such directory{hint}")
    if not (model / "config.json").is_file():
        raise ValueError(f"{_given(cfg, 'model.path')}: not a Hugging Face model directory (no config.json)")


def check_chat_template(path: str | Path, given: str, trust_remote_code: bool = False):
    """The tokenizer of the model at ``path``; ValueError naming ``given`` (the setting that chose
    ``path``) when it has no chat template: every prompt is rendered with it (learners, rollout
    workers, evaluation), so without one the job would fail only after Ray placed them."""
    tokenizer = load_tokenizer(path, trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(
            f"{given}: the tokenizer has no chat template, and safer renders every prompt with one. Use a "
            f"chat (instruct) model, or give this one a template: put it in {Path(path) / 'chat_template.jinja'} "
            f"(e.g. the instruct version's; `tokenizer.chat_template = ...; tokenizer.save_pretrained(DIR)` "
            f"writes it)")
    return tokenizer


def _given(cfg: Config, key: str) -> str:
    """``key=VALUE`` as the user wrote it, plus the absolute path when that differs."""
    written, resolved = cfg.written(key), str(attrgetter(key)(cfg))
    return f"{key}={written}" + ("" if written == resolved else f" ({resolved})")


def _missing_data_hint(cfg: Config) -> str:
    if cfg.data.generate_demo and cfg.override_for("data.train"):
        return ("; a data.train given by an override must exist (data.generate_demo writes the demo set only at "
                "the config file's own data.train)")
    return "; point data.train at your SFT records, or write the demo set with `safer data demo --out DIR`"


def open_run_dir(cfg: Config) -> Path:
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    phases.open_log(run_dir / "phases.jsonl")
    return run_dir


def check_sft_inputs(cfg: Config) -> None:
    """Everything SFT needs, before anything is written: adapters, the inputs (created when the
    config says so: :func:`prepare_inputs`), the model and data, a resumable checkpoint."""
    check_adapters(cfg.model, cfg.launch.device)
    prepare_inputs(cfg)
    preflight(cfg)
    # A bad resume checkpoint (or config change) fails here, before anything is written.
    Checkpointer(cfg.checkpoint, cfg.run.dir / "checkpoints" / "sft").check_resume(cfg)


def sft_job(cfg: Config, *, keep_ray: bool = False, inputs_checked: bool = False) -> Path:
    """Distributed SFT; returns the exported Hugging Face directory ``<run>/hf``. Writes
    ``<run>/report.md`` with the training curves (``safer run`` rewrites it with its evaluation).
    ``inputs_checked``: the caller ran :func:`check_sft_inputs` already."""
    if not inputs_checked:
        check_sft_inputs(cfg)
    start_ray(cfg)
    require_placement(cfg, "sft")  # refused here, before the run dir is written
    run_dir = open_run_dir(cfg)
    stop.install(cfg.launch.stop_grace_s)
    with phase("sft_setup"):
        group = LearnerGroup(cfg)
    try:
        t0 = time.perf_counter()
        with phase("sft"):
            state = train_sft(cfg, group, run_dir)
            wait_for_writes()  # checkpoint.async_save: the last checkpoint is complete before going on
        hf = run_dir / "hf"
        with phase("export"):
            group.export_hf(str(hf))
        log.info("SFT finished at step %d (%.0f s of training); model exported to %s", state.step, state.elapsed_s, hf)
        report = write_report(run_dir, {}, intro="SFT training (no evaluation yet: `safer eval` or `safer run` adds it).")
        log.info("report: %s", report)
        log.debug("sft job wall %.1f s", time.perf_counter() - t0)
    finally:
        group.shutdown()
        if not keep_ray:
            stop_ray()
    return hf


def eval_job(cfg: Config, model_path: str | Path, tag: str, *, keep_ray: bool = False,
             records: list[dict] | None = None) -> dict:
    """Generate on the held-out set (or ``records``) with ``model_path``; write
    ``<run>/eval/<tag>.jsonl``. ``judge.kind`` model or classifier also scores every row with the judge model."""
    tokenizer = check_chat_template(model_path, f"model {model_path}", cfg.model.trust_remote_code)
    rulebook = Rulebook.load(cfg.data.rulebook)
    if records is None:
        records = list(load_records(cfg.data.eval, "prompts"))
        if cfg.eval.max_prompts:
            records = records[: cfg.eval.max_prompts]
    # A stop (SIGTERM, SIGUSR1, Ctrl-C) drops the evaluation in flight (nothing of it is written)
    # and exits 75 / 130, instead of Ray's own SIGTERM handler killing the driver mid-call.
    stop.install(cfg.launch.stop_grace_s)
    start_ray(cfg)
    bundles = _phase_bundles(cfg, "eval")
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    phases.open_log(run_dir / "phases.jsonl")
    workers = judge_workers = judge = None
    try:
        with phase(f"eval_{tag}_setup"):
            workers = RolloutGroup.for_run(cfg, model_path, slots=bundles.slots("rollout"))
        if cfg.judge.kind != "rule":
            judge, judge_workers = _model_judge(cfg, rulebook, bundles)
        t0 = time.perf_counter()
        with phase(f"eval_{tag}"):
            summary, rows = evaluate(
                workers, records, rulebook, tokenizer, max_new_tokens=cfg.eval.max_new_tokens,
                temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size,
                out_path=run_dir / "eval" / f"{tag}.jsonl", judge=judge, seed=cfg.run.seed,
                system=system_prompt(cfg.data),
            )
        summary["generation_wall_s"] = time.perf_counter() - t0
        summary["judge"] = cfg.judge.kind
    finally:
        if judge_workers is not None:
            judge_workers.shutdown()
        if workers is not None:
            workers.shutdown()
        bundles.remove()
        if not keep_ray:
            stop_ray()
    summary["model"] = str(model_path)
    record_summaries(run_dir, {tag: summary})
    return {"summary": summary, "sample": pick_sample(rows), "rows": rows}


def _model_judge(cfg: Config, rulebook, bundles):
    """(judge, its rollout group) for ``judge.kind`` model or classifier: ``judge.model_path`` on
    rollout workers in the phase's ``judge`` slots (placement.py places them for both kinds)."""
    j = cfg.judge
    head = j.classifier_head if j.kind == "classifier" else "causal_lm"
    workers = RolloutGroup.for_run(cfg, j.model_path, slots=bundles.slots("judge"), name=f"{j.kind}-judge rollout",
                                   head=head)
    if j.kind == "classifier":
        return ClassifierJudge(workers, rulebook, template=j.prompt_template, unsafe_label=j.unsafe_label,
                               safe_label=j.safe_label, head=head), workers
    return ModelJudge(workers, j.prompt_template), workers


def record_summaries(run_dir: Path, summaries: dict[str, dict]) -> None:
    """Merge ``{tag: summary}`` into ``<run>/eval/summary.json`` (a tag's entry is replaced)."""
    path = run_dir / "eval" / "summary.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing.update(summaries)
    atomic_write_json(path, existing)


def heldout_eval(cfg: Config, model_path: str | Path, tag: str) -> dict:
    """``safer run``'s evaluation of one model: the held-out set (``eval.max_prompts`` of it) and,
    with ``eval.attacks``, each attacked copy of its harmful prompts. The summary is of the
    prompts as written, plus ``jailbreak_success_rate``; ``"attacks"`` has one summary per attack
    (``none``: as written), as ``safer eval eval.attacks=...`` reports them."""
    records = list(load_records(cfg.data.eval, "prompts"))[: cfg.eval.max_prompts or None]
    attacks = parse_attacks(cfg.eval.attacks)
    out = eval_job(cfg, model_path, tag, keep_ray=True, records=expand(records, attacks) if attacks else records)
    if not attacks:
        return out
    summary, per_attack = summarize_by_attack(out["rows"])
    for key in ("model", "judge", "generation_wall_s"):
        summary[key] = out["summary"][key]
    record_summaries(cfg.run.dir, {tag: {**summary, "attacks": per_attack}})
    plain = [r for r in out["rows"] if r["attack"] == "none"]
    return {"summary": summary, "sample": pick_sample(plain), "rows": out["rows"], "attacks": per_attack}


def erpo_job(cfg: Config, *, keep_ray: bool = False) -> Path:
    """Iterative step-level preference optimisation from the SFT model; returns ``<run>/hf_erpo``."""
    check_adapters(cfg.model, cfg.launch.device)
    run_dir = cfg.run.dir
    init_from = cfg.erpo.init_path(run_dir)
    if not (init_from / "config.json").is_file():
        raise ValueError(f"erpo.init_from={init_from}: no SFT model there (run `safer sft` first or set erpo.init_from)")
    check_chat_template(init_from, f"erpo.init_from={init_from}", cfg.model.trust_remote_code)
    load_records(cfg.data.erpo_prompts, "prompts")  # fail fast on bad prompts
    rulebook = Rulebook.load(cfg.data.rulebook)
    start_ray(cfg)
    bundles = _phase_bundles(cfg, "erpo")  # refused here, before the run dir is written
    open_run_dir(cfg)
    stop.install(cfg.launch.stop_grace_s)
    groups: list = []
    try:
        with phase("erpo_setup"):
            learners = LearnerGroup(cfg, optim=cfg.erpo.optim, model_path=str(init_from), dpo_loss=cfg.erpo.loss,
                                    slots=bundles.slots("learner"))
            groups.append(learners)
            rollout = RolloutGroup.for_run(cfg, init_from, slots=bundles.slots("rollout"))
            groups.append(rollout)
        if cfg.judge.kind == "rule":
            judge = RuleJudge(rulebook)
        else:
            judge, judge_workers = _model_judge(cfg, rulebook, bundles)
            groups.append(judge_workers)
        reference = None
        if cfg.erpo.reference == "sft" and cfg.model.lora.enabled:
            # The learners' frozen base is the SFT model: adapters off, no second copy.
            reference = AdaptersOffReference(learners)
        elif cfg.erpo.reference == "sft":
            reference = RolloutGroup.for_run(cfg, init_from, slots=bundles.slots("reference"),
                                             name="SFT-reference rollout")
            groups.append(reference)
        state = train_erpo(cfg, learners, rollout, judge, run_dir, reference=reference)
        wait_for_writes()
        out = run_dir / "hf_erpo"
        with phase("export_erpo"):
            learners.export_hf(str(out))
        log.info("ERPO finished after %d iteration(s), %d DPO steps; model exported to %s",
                 state.extra["iteration"], state.step, out)
    finally:
        for g in reversed(groups):
            g.shutdown()
        bundles.remove()
        if not keep_ray:
            stop_ray()
    return out


def _phase_bundles(cfg: Config, phase: str) -> PhaseBundles:
    """The placement groups of ``phase`` on the Ray cluster, ready; PlacementError (exit 2) when
    they cannot be placed, before any actor starts (safer_dist/cluster/placement.py)."""
    where = require_placement(cfg, phase).phase(phase)
    return PhaseBundles(where, cfg.learner.placement_timeout_s, "learner.placement_timeout_s")


def run_job(cfg: Config) -> dict:
    """The main job: initial model (if missing) -> [evaluation of it: ``eval.base``] -> SFT ->
    evaluation -> ERPO -> evaluation (:func:`heldout_eval`); ``report.md`` side by side."""
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    stop.install(cfg.launch.stop_grace_s)  # from the start: the base model's evaluation included
    check_sft_inputs(cfg)  # a mistake fails before Ray starts and before any evaluation
    try:
        start_ray(cfg)
        require_placement(cfg, "run")  # every phase, before the first starts
        if cfg.eval.base:
            results["base"] = heldout_eval(cfg, cfg.model.path, "base")
        hf = sft_job(cfg, keep_ray=True, inputs_checked=True)
        results["sft"] = heldout_eval(cfg, hf, "sft")
        if cfg.erpo.iterations > 0:
            erpo_hf = erpo_job(cfg, keep_ray=True)
            results["erpo"] = heldout_eval(cfg, erpo_hf, "erpo")
    finally:
        stop_ray()
    report = write_report(cfg.run.dir, results)
    final = results.get("erpo", results["sft"])
    return {**final, "all": results, "report": str(report), "wall_s": time.perf_counter() - t0}
