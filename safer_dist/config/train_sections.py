"""The config sections of a training run: run, model (LoRA, quantization), data, optimisation, learners."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from safer_dist.config.checks import _check
from safer_dist.runtime.resources import shipped


@dataclass
class RunSection:
    name: str = "tiny"
    output_dir: str = "runs"
    seed: int = 0
    log_level: str = "info"

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class LoraSection:
    """LoRA adapters on the learners (safer_dist/train/lora.py, built with peft): the base weights
    stay frozen and only the adapters train. Rollout workers receive the adapters and merge them;
    exports hold the merged model and the adapters (``<out>/adapter/``)."""

    # Adapter rank r; 0: off (full fine-tuning).
    rank: int = 0
    # The adapter's update is scaled by alpha / rank.
    alpha: float = 16.0
    # Dropout on each adapter's input in training steps (never in evaluation or log-probs).
    dropout: float = 0.0
    # all-linear (every linear layer of the blocks; never the LM head) or a comma-separated list
    # of module names, e.g. q_proj,k_proj,v_proj,o_proj.
    target_modules: str = "all-linear"

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def validate(self, key: str) -> None:
        _check(self.rank >= 0, f"{key}.rank must be >= 0 (0: no adapters, full fine-tuning)")
        _check(self.alpha > 0, f"{key}.alpha must be > 0")
        _check(0 <= self.dropout < 1, f"{key}.dropout must be in [0, 1)")
        _check(bool(self.target_modules.strip()) and not any(not m.strip() for m in self.target_modules.split(",")),
               f"{key}.target_modules must be all-linear or module names separated by commas (got {self.target_modules!r})")


@dataclass
class ModelSection:
    # A local Hugging Face directory. Nothing is fetched from a hub.
    path: str = "models/tiny"
    # When `path` does not exist, init_preset is set and `path` is the one the config file
    # gives (no override changed it), `safer run` creates a randomly initialised model of that
    # preset there (with a tokenizer trained on data.train). Any other missing path is an error.
    init_preset: str | None = None
    # auto | sdpa | eager | flash_attention_2 | safer_varlen | safer_segments
    attn_implementation: str = "auto"
    # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    dtype: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraSection = field(default_factory=LoraSection)
    # none | 4bit: the learners' frozen base weights in bitsandbytes NF4 with bf16 compute
    # (QLoRA; needs model.lora.rank > 0, CUDA and bitsandbytes).
    quantization: str = "none"


@dataclass
class DataSection:
    train: str = "data/demo/sft.jsonl"
    eval: str = "data/demo/eval.jsonl"
    erpo_prompts: str = "data/demo/erpo_prompts.jsonl"
    # Generate the seeded demo data set into the directory of `train` when `train` is missing
    # and is the path the config file gives (no override changed it); any other missing data
    # file is an error. Only the embedded default (configs/tiny.yaml) sets it.
    generate_demo: bool = False
    demo_num_sft: int = 4000
    # The shipped rulebook by default.
    rulebook: str = field(default_factory=lambda: str(shipped("configs/rules/default.yaml")))
    max_seq_len: int = 512
    # What to do with an example longer than max_seq_len: truncate | drop
    overlong: str = "truncate"
    # Probability of splitting a prompt word into sub-word pieces when tokenizing training
    # prompts (deterministic per example and epoch). Exposes rare sub-word tokens.
    segment_dropout: float = 0.1
    # Validation set of SFT (train.eval_every_steps): a records file like `train`, or, when
    # None, a held-out fraction `valid_fraction` of `train` chosen by run.seed; those
    # examples then leave the training set.
    valid: str | None = None
    valid_fraction: float = 0.0
    # A system turn for every prompt that has none of its own, in SFT, ERPO and evaluation:
    # "" adds none (the chat template's default, if it has one); "rulebook" lists `rulebook`'s
    # categories with their names and rule ids, which the traces cite (a model then looks them
    # up instead of memorising them); any other text is used as written.
    system_prompt: str = ""


@dataclass
class OptimSection:
    """One training stage's optimisation: batch, AdamW, clipping, warmup.

    The learner takes this type; the learning rate warms up linearly over ``warmup_steps``
    and then stays at ``lr`` (:class:`TrainSection` adds a cosine decay over its steps).
    """

    global_batch_size: int = 16
    # Sequences (SFT) or pairs (ERPO) per micro-batch per learner; gradient accumulation is derived.
    micro_batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return 1.0

    def validate(self, key: str, num_learners: int) -> None:
        per_step = self.micro_batch_size * num_learners
        _check(self.micro_batch_size >= 1, f"{key}.micro_batch_size must be >= 1")
        _check(
            self.global_batch_size % per_step == 0,
            f"{key}.global_batch_size ({self.global_batch_size}) must be a multiple of "
            f"{key}.micro_batch_size x learner.num_learners ({self.micro_batch_size} x "
            f"{num_learners} = {per_step})",
        )
        _check(self.lr > 0, f"{key}.lr must be > 0")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps must be >= 0 (it is capped at the stage's steps)")
        _check(self.grad_clip >= 0, f"{key}.grad_clip must be >= 0 (0 disables clipping)")


@dataclass
class TrainSection(OptimSection):
    """SFT: ``max_steps`` optimizer steps, warmup then cosine decay to ``lr * min_lr_ratio``."""

    max_steps: int = 200
    min_lr_ratio: float = 0.1
    log_every: int = 1
    # Validation loss (valid_loss in metrics.jsonl) every this many steps and at the last
    # step, on data.valid or data.valid_fraction; 0: off.
    eval_every_steps: int = 0
    # Encode the prompt tokens that a micro-batch's examples all begin with (a system prompt, of
    # 16 tokens or more) once, the examples attending to one copy (safer_dist/train/sft_data.py:
    # pack). Exact; applies where the attention takes a shared prefix (safer_segments,
    # safer_varlen), else each example encodes its own copy.
    share_prefix: bool = True

    def lr_factor(self, step: int) -> float:
        warmup = min(self.warmup_steps, self.max_steps)
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, self.max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class LearnerSection:
    num_learners: int = 2
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    cpus_per_learner: int = 1
    # auto: 1 GPU per learner when CUDA is present, else 0.
    gpus_per_learner: str = "auto"
    # Ray placement strategy for the learner bundles: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    placement: str = "PACK"
    placement_timeout_s: float = 300.0
    # Seconds a learner call may take before the job is declared hung.
    call_timeout_s: float = 1800.0
    # Labelled tokens whose logits the loss computes at once (safer_dist/train/lm_head.py): full fp32
    # logits [tokens, vocab] never exist, only [loss_chunk_tokens, vocab]. SFT and ERPO
    # alike. 0: the model's full logits, as a plain forward gives them.
    loss_chunk_tokens: int = 4096
    # Tokenize and pack the next SFT step's micro-batches (pack the next step-DPO step's; pairs are
    # tokenized when loaded) on a background thread while this step trains (the same batches either way).
    prefetch_batches: bool = True
    # Peak dense bf16 TFLOP/s of one learner device, for MFU in metrics.jsonl. None: looked up from
    # the GPU's name (safer_dist/train/throughput.py); on CPU or an unknown GPU, MFU is not reported.
    peak_tflops: float | None = None
