"""A ``--time`` hint for `safer slurm submit`: the SFT stage's training FLOPs over the learners'
GPUs at the speed measured on one.

    tokens  = train.max_steps x train.global_batch_size x mean tokens per example
              (up to 256 records of data.train, encoded as the learners encode them)
    FLOPs   = 6 x P x tokens (forward + backward; 8 x P x tokens with gradient checkpointing)
    seconds = FLOPs / (learner GPUs x PEAK_TFLOPS x MEASURED_MFU)

It counts neither ERPO (sampling-bound) nor start-up, checkpoints and evaluation: a floor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from safer_dist.config import Config

# The learners' SFT on an 8B-width slice on one H200 (bench/results/h200-2026-11-27/llama3-8b-slice.json,
# the "safer learner" row): 43% of the dense bf16 peak. An H100 SXM has the same peak.
MEASURED_MFU = 0.43
PEAK_TFLOPS = 989.0
MEASURED_ON = "bench/results/h200-2026-11-27"
SAMPLE_RECORDS = 256


@dataclass
class TimeHint:
    seconds: float
    tokens: int
    note: str

    def slurm_time(self) -> str:
        """The estimate with half again as much margin, as sbatch --time (D-HH:MM:SS)."""
        s = int(self.seconds * 1.5) + 600
        days, s = divmod(s, 86400)
        return f"{days}-{s // 3600:02d}:{s % 3600 // 60:02d}:00"


def mean_example_tokens(cfg: Config, tokenizer) -> float:
    """Mean tokens of (up to) :data:`SAMPLE_RECORDS` records of data.train, as the learners
    encode them (chat template, response, data.max_seq_len and data.overlong)."""
    from safer_dist.data.chat import system_prompt, with_system_records
    from safer_dist.data.records import load_records
    from safer_dist.train.sft_data import encode_example

    records = with_system_records(load_records(cfg.data.train, "sft"), system_prompt(cfg.data))
    sample = random.Random(0).sample(records, min(len(records), SAMPLE_RECORDS))
    lengths = [len(e.input_ids) for r in sample
               if (e := encode_example(tokenizer, r["prompt"], r["response"], max_seq_len=cfg.data.max_seq_len,
                                       overlong=cfg.data.overlong))]
    if not lengths:
        raise ValueError(f"data.train={cfg.data.train}: no example fits data.max_seq_len={cfg.data.max_seq_len}")
    return sum(lengths) / len(lengths)


def sft_time_hint(cfg: Config, tokenizer, num_params: int, num_gpus: int) -> TimeHint:
    tokens = int(cfg.train.max_steps * cfg.train.global_batch_size * mean_example_tokens(cfg, tokenizer))
    per_token = 8 if cfg.model.gradient_checkpointing else 6
    seconds = per_token * num_params * tokens / (num_gpus * PEAK_TFLOPS * 1e12 * MEASURED_MFU)
    note = (f"SFT alone ~{_hours(seconds)}: {tokens:,} tokens (train.max_steps x train.global_batch_size x mean "
            f"example length) x {per_token} x {num_params / 1e9:.2f}B parameters over {num_gpus} GPU(s) at "
            f"{MEASURED_MFU:.0%} of {PEAK_TFLOPS:g} TFLOPs (measured, {MEASURED_ON}); ERPO, start-up and "
            "checkpoints come on top")
    return TimeHint(seconds, tokens, note)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
