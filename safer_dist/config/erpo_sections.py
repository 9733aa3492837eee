"""The config sections of ERPO: its optimisation and loss, the rollout workers, the judge, the ERPO loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safer_dist.config.checks import _check
from safer_dist.config.train_sections import OptimSection
from safer_dist.erpo.ranking import Ranking


@dataclass
class ErpoOptimSection(OptimSection):
    """ERPO's optimisation on each iteration's pairs (no decay: iterations have no fixed length)."""

    lr: float = 1e-4
    warmup_steps: int = 0


@dataclass
class DpoLossSection:
    """The step-level DPO loss (safer_dist/train/losses.py ``step_dpo_loss``)."""

    beta: float = 0.1
    # + nll_weight * NLL of the chosen step (per token).
    nll_weight: float = 0.0
    # + length_alpha * (|chosen| - |rejected|) inside the sigmoid.
    length_alpha: float = 0.0
    label_smoothing: float = 0.0
    # Encode each pair's context once, the chosen and the rejected step both attending to it
    # (safer_dist/train/tree_attention.py), in the learners and in the rollout workers' reference
    # log-probs. Exact; off only for debugging. Where the attention backend cannot take it
    # (flash_attention_2, sdpa, eager) each context is encoded twice, as the log says once.
    share_prefix: bool = True

    def validate(self, key: str) -> None:
        _check(self.beta > 0, f"{key}.beta must be > 0")
        _check(0 <= self.label_smoothing < 0.5, f"{key}.label_smoothing must be in [0, 0.5)")
        _check(self.nll_weight >= 0, f"{key}.nll_weight must be >= 0")


@dataclass
class RolloutSection:
    num_workers: int = 2
    cpus_per_worker: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    # Rows (prompts x candidates) a worker samples at once; ERPO sampling keeps this many in flight.
    batch_size: int = 32
    # A worker process that dies is restarted by Ray up to this many times; it rejoins the
    # weight sync and gets the current weights again, and its shard of the work is retried on
    # it (results are keyed by position: nothing lost or duplicated).
    max_restarts: int = 3
    # Where rollout workers go (safer_dist/cluster/placement.py): colocate = in the learners'
    # placement-group bundles, sharing their GPUs (fractional GPU resources), so every GPU samples
    # and trains; separate = bundles (GPUs) of their own. auto: colocate where learners get GPUs,
    # separate on CPU (the CPU demo's placement) or with tensor_parallel > 1 (never colocated).
    placement: str = "auto"
    # Seconds the rollout workers' placement group may take to be ready before the job fails
    # naming what is missing.
    placement_timeout_s: float = 300.0
    # Seconds one rollout call (a worker's shard of generate, sample or logprobs) may take
    # before the job is declared hung. Generous: a shard of real sampling takes minutes.
    call_timeout_s: float = 3600.0
    # Seconds the weight-sync group's set-up (learner rank 0 and every worker) may take.
    sync_timeout_s: float = 300.0
    # Ranks (devices) one worker spans: K > 1 shards the model over K devices of one node with
    # transformers' tensor parallelism (the model's own TP plan), for models that do not fit one
    # device. Each worker then takes K GPUs (on CPU, K x cpus_per_worker CPUs), placed together
    # (STRICT_PACK) apart from the learners (never colocated: rollout.placement=colocate is refused,
    # auto means separate), and is not restarted when a rank dies (safer_dist/rollout/tensor_parallel.py).
    tensor_parallel: int = 1


@dataclass
class JudgeSection:
    # rule: the prompt's labels (offline); model: an LLM judge replying "safety: x utility: y";
    # classifier: a Llama-Guard-style model whose first word says whether a harmful prompt's
    # answer is safe (safer_dist/judging/). model and classifier run on rollout workers.
    kind: str = "rule"  # rule | model | classifier
    model_path: str | None = None
    # {prompt} and {response}; None: the model judge's default prompt, or for a classifier the
    # [user, assistant] conversation rendered by the judge's own chat template.
    prompt_template: str | None = None
    # The classifier's verdict words (its reply's first word, case-insensitive), e.g. yes / no
    # for a judge prompted to answer Yes or No.
    unsafe_label: str = "unsafe"
    safe_label: str = "safe"
    # The classifier's kind: causal_lm generates its verdict (Llama Guard); sequence is an
    # AutoModelForSequenceClassification model whose predicted label (config.id2label) is
    # compared with unsafe_label / safe_label (whole label, case-insensitive).
    classifier_head: str = "causal_lm"  # causal_lm | sequence

    def validate(self, key: str) -> None:
        _check(self.kind in ("rule", "model", "classifier"), f"{key}.kind must be one of rule, model, classifier "
               f"(got {self.kind!r})")
        _check(self.kind == "rule" or bool(self.model_path),
               f"{key}.kind={self.kind} runs a judge model: set {key}.model_path (a local Hugging Face model "
               f"directory) or {key}.kind=rule")
        _check(self.kind != "classifier" or (self.unsafe_label.strip() and self.safe_label.strip()
                                             and self.unsafe_label.lower() != self.safe_label.lower()),
               f"{key}.unsafe_label and {key}.safe_label must be two different non-empty words "
               f"(got {self.unsafe_label!r}, {self.safe_label!r})")
        _check(self.classifier_head in ("causal_lm", "sequence"),
               f"{key}.classifier_head must be causal_lm or sequence (got {self.classifier_head!r})")


@dataclass
class ResampleSection:
    """A sensitivity check: ``fraction`` of the candidate steps (picked by a hash of the seed,
    prefix and candidate index) are drawn from another stream, keyed by ``seed``; the rest
    are drawn exactly as without it. 0: off (docs/erpo.md "Sensitivity")."""

    fraction: float = 0.0
    seed: int = 1

    def validate(self, key: str) -> None:
        _check(0.0 <= self.fraction <= 1.0, f"{key}.fraction must be in [0, 1] (got {self.fraction})")


@dataclass
class ErpoSection:
    # The model ERPO starts from; None: the run's SFT export (<run>/hf).
    init_from: str | None = None
    iterations: int = 2
    # Prompts of the ERPO pool sampled per iteration (0: the whole pool), in chunks that are
    # written as they finish so a resumed run never samples a chunk twice.
    prompts_per_iteration: int = 0
    chunk_size: int = 32
    # Comma-separated steps to sample candidates for.
    steps: str = "assessment,rules,calibration,answer"
    num_candidates: int = 4
    num_completions: int = 1
    step_max_new_tokens: int = 96
    answer_max_new_tokens: int = 128
    # A whole response: the trajectory whose step prefixes are sampled from, and each completion
    # after a candidate step that the judge scores.
    max_new_tokens: int = 256
    # Temperature of the completions that judge a candidate's outcome (0: greedy, the
    # policy's most likely continuation, as in evaluation).
    completion_temperature: float = 0.0
    # Reference model: the policy at the start of each iteration, or the fixed SFT model.
    reference: str = "iteration"  # iteration | sft
    # Each safety pair (the chosen response is safe, the rejected one is not) appears
    # safety_pair_repeats times per epoch, so that pairs against over-refusal, which are usually
    # more numerous, do not outweigh them. Only lexicographic scoring names safety pairs;
    # weighted pairs are never repeated.
    safety_pair_repeats: int = 1
    # Passes over an iteration's pairs.
    epochs: int = 2
    # Which candidates form a pair, and length control (safer_dist/erpo/ranking.py).
    ranking: Ranking = field(default_factory=Ranking)
    # The step-DPO loss the learners are set up with.
    loss: DpoLossSection = field(default_factory=DpoLossSection)
    # The learners' optimiser during ERPO.
    optim: ErpoOptimSection = field(default_factory=ErpoOptimSection)
    # Draw a fraction of the candidate steps from another seed (a sensitivity check; 0: off).
    resample: ResampleSection = field(default_factory=ResampleSection)

    def init_path(self, run_dir: Path) -> Path:
        """The model ERPO starts from: ``init_from``, else the run's SFT export."""
        return Path(self.init_from) if self.init_from else run_dir / "hf"

    def step_names(self) -> list[str]:
        return [s.strip() for s in self.steps.split(",")]
