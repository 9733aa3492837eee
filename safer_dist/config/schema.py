"""The config schema: every section as a dataclass, defaults, and cross-field validation.

The training sections (run, model, data, optimisation, learners) are
:mod:`safer_dist.config.train_sections`, ERPO's (optimisation, loss, rollout, judge, loop)
:mod:`safer_dist.config.erpo_sections`; the rest and the :class:`Config` tree are here, and every
section is importable from here.

Components receive their own section only (``Learner(cfg.learner, ...)``); defaults live
here and nowhere else. Loading, overrides and paths: :mod:`safer_dist.config.loading`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import yaml

from safer_dist.config.checks import ConfigError, _check, _one_of
from safer_dist.config.erpo_sections import DpoLossSection, ErpoOptimSection, ErpoSection, JudgeSection, RolloutSection
from safer_dist.config.train_sections import (
    DataSection, LearnerSection, LoraSection, ModelSection, OptimSection, RunSection, TrainSection,
)
from safer_dist.runtime.log import get_logger
from safer_dist.runtime.resources import shipped
from safer_dist.runtime.tracking import missing_package

log = get_logger("config")


@dataclass
class CheckpointSection:
    every_steps: int = 0
    every_seconds: float = 0.0
    keep_last: int = 2
    # auto | none | PATH
    resume: str = "auto"
    # Record the sha256 of every checkpoint file in COMPLETE and verify it on resume (sizes
    # are always recorded and checked). Hashing reads the checkpoint once more (~1 s/GB).
    hash_files: bool = True
    # Copy the state to host memory and write it in the background while training goes on;
    # COMPLETE once every file is durable (safer_dist/checkpointing/async_save.py).
    async_save: bool = False


@dataclass
class LaunchSection:
    # None: start Ray in-process on this machine. "auto" or host:port: join a cluster.
    ray_address: str | None = None
    # auto | cpu | cuda
    device: str = "auto"
    # CPUs Ray may use when it starts in-process (None: all).
    num_cpus: int | None = None
    # Seconds to finish the current step and checkpoint after SIGTERM/SIGUSR1.
    stop_grace_s: float = 120.0


@dataclass
class TrackSection:
    """Experiment tracking: every scalar of metrics.jsonl also goes to each enabled backend
    (safer_dist/runtime/tracking.py; `pip install 'safer[track]'`)."""

    # TensorBoard event files under <run>/tensorboard/<stage>/ (`tensorboard --logdir <run>/tensorboard`).
    tensorboard: bool = False
    # Weights & Biases (WANDB_MODE=offline logs without a network; `wandb sync` uploads later).
    wandb: bool = False
    wandb_project: str = "safer"
    wandb_entity: str | None = None  # None: your W&B default entity
    wandb_run_name: str | None = None  # None: run.name
    wandb_tags: str = ""  # comma-separated

    def validate(self) -> None:
        for backend in ("tensorboard", "wandb"):
            missing = getattr(self, backend) and missing_package(backend)
            _check(not missing, f"track.{backend}=true needs the {missing} package: pip install 'safer[track]' "
                                f"(or pip install {missing}), or set track.{backend}=false")
        _check(bool(self.wandb_project.strip()), "track.wandb_project must not be empty")


@dataclass
class EvalSection:
    max_prompts: int = 0  # 0: all (per benchmark when eval.benchmarks is set)
    max_new_tokens: int = 256
    batch_size: int = 64
    # 0: greedy. Above 0 each answer is sampled from its own stream, keyed by run.seed and the
    # prompt (as ERPO's candidates), whatever rollout.num_workers or eval.batch_size.
    temperature: float = 0.0
    # Comma list of name:path benchmark files (safer_dist/evaluation/safety_sets.py): harmbench, advbench,
    # xstest, strongreject, wildjailbreak, prompts (a records file). Empty: data.eval.
    benchmarks: str = ""
    # Comma list of tag:path model directories compared side by side. Empty: model=PATH or <run>/hf.
    models: str = ""
    # Comma list of jailbreak transformations of the harmful prompts (safer_dist/evaluation/attacks.py), or all.
    # `safer run` adds each attacked copy of the held-out harmful prompts to every evaluation.
    attacks: str = ""
    # `safer run`: evaluate model.path (the model before SFT) first, on the same prompts, so the
    # report shows base, sft and erpo side by side.
    base: bool = False


@dataclass
class SynthSection:
    """``safer synth``: Ex-Ante traces from a teacher model (safer_dist/synth/pipeline.py, docs/data.md)."""

    # Prompts (JSONL / Parquet / save_to_disk): prompt, optional id, category, harmful, reference.
    # None: data.erpo_prompts (the ERPO prompt pool; the demo's, data/demo/, with configs/tiny.yaml).
    prompts: str | None = None
    # accepted.jsonl, rejects.jsonl and summary.json go here; None: <run dir>/synth.
    out_dir: str | None = None
    max_prompts: int = 0  # 0: all
    # ray: a local Hugging Face directory on rollout workers | http: an OpenAI-compatible endpoint.
    teacher: str = "ray"
    teacher_path: str | None = None  # ray: the teacher's directory; None: model.path
    base_url: str | None = None  # http: e.g. http://127.0.0.1:8000/v1
    model_name: str | None = None  # http: the request's "model" field
    # http: the NAME of the environment variable holding the API key (keys never go in configs).
    api_key_env: str | None = None
    max_concurrency: int = 4  # http: requests in flight at once
    timeout_s: float = 120.0  # http: per request
    max_retries: int = 4  # http: retries of a failed request (connection error, timeout, 408/409/429/5xx)
    backoff_s: float = 1.0  # http: first retry delay; doubles each retry (with jitter) up to max_backoff_s
    max_backoff_s: float = 30.0
    prompt_template: str = field(default_factory=lambda: str(shipped("configs/synth/teacher_prompt.txt")))
    max_new_tokens: int = 512
    temperature: float = 0.0
    batch_size: int = 32  # prompts per round; results are appended after each round
    # Category where a record has none: keyword (built from the rulebook) | model.
    classifier: str = "keyword"
    classifier_path: str | None = None  # model: a local directory on rollout workers; None: the teacher
    classifier_template: str = field(default_factory=lambda: str(shipped("configs/synth/classify_prompt.txt")))
    # Also reject traces whose category, rule verdict or strategy contradict the record's labels
    # (or, unlabelled, the rulebook's default for the assigned category).
    strict: bool = True

    def validate(self) -> None:
        _one_of("synth.teacher", self.teacher, ("ray", "http"))
        _one_of("synth.classifier", self.classifier, ("keyword", "model"))
        if self.teacher == "http":
            _check(bool(self.base_url) and bool(self.model_name),
                   "synth.teacher=http needs synth.base_url (e.g. http://127.0.0.1:8000/v1) and synth.model_name")
            _check(str(self.base_url).startswith(("http://", "https://")),
                   f"synth.base_url must start with http:// or https:// (got {self.base_url!r})")
        _check(self.max_concurrency >= 1, "synth.max_concurrency must be >= 1")
        _check(self.timeout_s > 0, "synth.timeout_s must be > 0")
        _check(self.max_retries >= 0, "synth.max_retries must be >= 0")
        _check(0 <= self.backoff_s <= self.max_backoff_s, "synth.backoff_s must be in [0, synth.max_backoff_s]")
        _check(self.max_new_tokens >= 1 and self.batch_size >= 1, "synth.max_new_tokens and synth.batch_size must be >= 1")
        _check(self.temperature >= 0 and self.max_prompts >= 0, "synth.temperature and synth.max_prompts must be >= 0")


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    learner: LearnerSection = field(default_factory=LearnerSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    judge: JudgeSection = field(default_factory=JudgeSection)
    erpo: ErpoSection = field(default_factory=ErpoSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    eval: EvalSection = field(default_factory=EvalSection)
    synth: SynthSection = field(default_factory=SynthSection)
    track: TrackSection = field(default_factory=TrackSection)

    def __post_init__(self) -> None:
        # Where values came from (not fields: never saved). Filled by load_config.
        self._overrides: dict[str, str] = {}
        self._written: dict[str, str] = {}

    def override_for(self, key: str) -> str | None:
        """The override (``key=value`` as given) that set ``key`` (``section.field``), or None
        when the file or a default did."""
        return self._overrides.get(key)

    def written(self, key: str) -> str:
        """A path key's value as the file or override wrote it, before it was made absolute."""
        value = self._written.get(key)
        return value if value is not None else str(attrgetter(key)(self))

    def validate(self) -> None:
        """Cross-field checks. Raises ConfigError saying what to change."""
        t, lr = self.train, self.learner
        _check(t.max_steps >= 1, "train.max_steps must be >= 1")
        t.validate("train", lr.num_learners)
        _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        _check(t.log_every >= 1, "train.log_every must be >= 1")
        _check(lr.loss_chunk_tokens >= 0, "learner.loss_chunk_tokens must be >= 0 (0: full logits)")
        _check(lr.peak_tflops is None or lr.peak_tflops > 0, "learner.peak_tflops must be > 0 (or null: from the GPU's name)")
        _check(t.eval_every_steps >= 0, "train.eval_every_steps must be >= 0 (0: no validation loss)")
        d = self.data
        _check(0 <= d.valid_fraction < 1, "data.valid_fraction must be in [0, 1)")
        _check(not (d.valid and d.valid_fraction), "set data.valid or data.valid_fraction, not both")
        _check(
            not t.eval_every_steps or bool(d.valid) or d.valid_fraction > 0,
            "train.eval_every_steps needs a validation set: data.valid=FILE or data.valid_fraction (e.g. 0.05)",
        )
        _check(lr.num_learners >= 1, "learner.num_learners must be >= 1")
        _check(lr.zero_stage in (0, 1, 2, 3), "learner.zero_stage must be 0, 1, 2 or 3")
        _check(lr.cpus_per_learner >= 1, "learner.cpus_per_learner must be >= 1")
        _check(
            lr.gpus_per_learner in ("auto", "0", "1"),
            "learner.gpus_per_learner must be auto, 0 or 1",
        )
        _check(
            not lr.offload_params or lr.zero_stage == 3,
            "learner.offload_params needs learner.zero_stage=3",
        )
        _check(
            not lr.offload_optimizer or lr.zero_stage >= 1,
            "learner.offload_optimizer needs learner.zero_stage >= 1",
        )
        _one_of("learner.placement", lr.placement, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        _check(self.data.max_seq_len >= 16, "data.max_seq_len must be >= 16")
        _one_of("data.overlong", self.data.overlong, ("truncate", "drop"))
        _check(0 <= self.data.segment_dropout < 1, "data.segment_dropout must be in [0, 1)")
        _one_of(
            "model.attn_implementation",
            self.model.attn_implementation,
            ("auto", "sdpa", "eager", "flash_attention_2", "safer_varlen", "safer_segments"),
        )
        _one_of("model.dtype", self.model.dtype, ("auto", "float32", "bfloat16", "float16"))
        self.model.lora.validate("model.lora")
        _check(not self.model.lora.enabled or self.rollout.tensor_parallel == 1,
               f"model.lora.rank={self.model.lora.rank}: rollout workers merge the adapters each ERPO iteration sends "
               f"into whole models, which tensor-parallel ones do not hold (rollout.tensor_parallel="
               f"{self.rollout.tensor_parallel}); set rollout.tensor_parallel=1 or model.lora.rank=0")
        _one_of("model.quantization", self.model.quantization, ("none", "4bit"))
        _check(self.model.quantization == "none" or self.model.lora.enabled,
               "model.quantization=4bit quantizes the frozen base weights of LoRA training: set model.lora.rank "
               "(e.g. model.lora.rank=16) or model.quantization=none")
        _check(self.model.quantization == "none" or (lr.zero_stage < 3 and self.model.dtype in ("auto", "bfloat16")),
               "model.quantization=4bit needs learner.zero_stage 0, 1 or 2 and model.dtype auto or bfloat16 "
               "(bf16 compute on an NF4 base)")
        _one_of("launch.device", self.launch.device, ("auto", "cpu", "cuda"))
        self.judge.validate("judge")
        _check(self.judge.kind != "classifier" or self.judge.classifier_head != "sequence"
               or self.rollout.tensor_parallel == 1,
               "judge.classifier_head=sequence runs on whole-model workers: set rollout.tensor_parallel=1 or "
               "judge.classifier_head=causal_lm")
        e = self.erpo
        _one_of("erpo.reference", e.reference, ("iteration", "sft"))
        _check(e.iterations >= 0, "erpo.iterations must be >= 0")
        _check(e.num_candidates >= 2, "erpo.num_candidates must be >= 2")
        _check(e.num_completions >= 1, "erpo.num_completions must be >= 1")
        _check(e.chunk_size >= 1, "erpo.chunk_size must be >= 1")
        _check(e.safety_pair_repeats >= 1, "erpo.safety_pair_repeats must be >= 1")
        _check(e.epochs >= 1, "erpo.epochs must be >= 1")
        _check(min(e.max_new_tokens, e.step_max_new_tokens, e.answer_max_new_tokens) >= 1,
               "erpo.max_new_tokens, erpo.step_max_new_tokens and erpo.answer_max_new_tokens must be >= 1")
        bad = [x for x in e.steps.split(",") if x.strip() not in ("assessment", "rules", "calibration", "answer")]
        _check(not bad and bool(e.steps.strip()), f"erpo.steps: unknown step(s) {bad}; use assessment,rules,calibration,answer")
        e.optim.validate("erpo.optim", lr.num_learners)
        e.loss.validate("erpo.loss")
        e.resample.validate("erpo.resample")
        for message in e.ranking.validate("erpo.ranking"):
            _check(False, message)
        _check(self.checkpoint.keep_last >= 2, "checkpoint.keep_last must be >= 2")
        _check(self.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0")
        _check(self.checkpoint.every_seconds >= 0, "checkpoint.every_seconds must be >= 0 (0 disables it)")
        _check(self.rollout.max_restarts >= 0, "rollout.max_restarts must be >= 0")
        _check(self.rollout.num_workers >= 1, "rollout.num_workers must be >= 1")
        _check(
            self.rollout.tensor_parallel >= 1,
            f"rollout.tensor_parallel must be >= 1 (got {self.rollout.tensor_parallel}): the devices one rollout "
            "worker spans; each worker needs that many GPUs of one node (on CPU, that many times "
            "rollout.cpus_per_worker CPUs)",
        )
        _one_of("rollout.placement", self.rollout.placement, ("auto", "colocate", "separate"))
        for key in ("placement_timeout_s", "call_timeout_s", "sync_timeout_s"):
            _check(getattr(self.rollout, key) > 0, f"rollout.{key} must be > 0")
        _check(
            self.rollout.tensor_parallel == 1 or self.rollout.placement != "colocate",
            f"rollout.placement=colocate cannot place tensor-parallel rollout workers (rollout.tensor_parallel="
            f"{self.rollout.tensor_parallel}): each is placed apart from the learners on that many GPUs of one node; "
            "set rollout.placement=separate (or auto), or rollout.tensor_parallel=1",
        )
        _check(0 < self.rollout.top_p <= 1, "rollout.top_p must be in (0, 1]")
        _check(self.launch.stop_grace_s > 0, "launch.stop_grace_s must be > 0")
        _check(bool(self.run.name) and "/" not in self.run.name, "run.name must be a non-empty name without '/'")
        self.synth.validate()
        self.track.validate()
        _check_eval_lists(self.eval)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_named_list(key: str, text: str) -> list[tuple[str, str]]:
    """``"a:PATH,b:PATH"`` -> ``[("a", "PATH"), ("b", "PATH")]``; ConfigError naming ``key``."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition(":")
        _check(bool(sep) and bool(name.strip()) and bool(path.strip()), f"{key}: expected name:path, got {item!r}")
        out.append((name.strip(), path.strip()))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, f"{key}: duplicate name(s) {dup}")
    return out


def _check_eval_lists(ev: EvalSection) -> None:
    from safer_dist.evaluation.attacks import parse_attacks
    from safer_dist.evaluation.safety_sets import BENCHMARKS

    for name, _ in parse_named_list("eval.benchmarks", ev.benchmarks):
        _one_of("eval.benchmarks: benchmark name", name, tuple(BENCHMARKS))
    parse_named_list("eval.models", ev.models)
    try:
        parse_attacks(ev.attacks)
    except ValueError as e:
        raise ConfigError(f"eval.attacks: {e}") from None

