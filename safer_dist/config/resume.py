"""What must match to resume a stage from a checkpoint (:data:`RESUME_KEYS`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safer_dist.config.loading import _NAMED_LISTS, PATH_KEYS, _absolute, _migrate
from safer_dist.config.schema import Config

# Settings whose change makes a stage's checkpoint meaningless to continue from: everything
# that changes the optimisation from the checkpoint on. A name of a section covers all its
# fields. train.max_steps is not among them: raising it extends a run (the cosine schedule
# then decays over the new length).
RESUME_KEYS = {
    "sft": (
        "run.seed", "model.path", "data.train", "data.max_seq_len", "data.overlong", "data.segment_dropout",
        "data.valid_fraction", "data.system_prompt",
        "train.global_batch_size", "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.weight_decay",
        "train.adam_beta1", "train.adam_beta2", "train.grad_clip", "learner.zero_stage", "model.lora",
        "model.quantization",
    ),
    "erpo": (
        "run.seed", "erpo.init_from", "data.erpo_prompts", "data.rulebook", "data.system_prompt", "judge",
        "rollout.temperature", "rollout.top_p", "erpo.max_new_tokens", "erpo.prompts_per_iteration", "erpo.chunk_size",
        "erpo.steps",
        "erpo.num_candidates", "erpo.num_completions", "erpo.step_max_new_tokens", "erpo.answer_max_new_tokens",
        "erpo.completion_temperature", "erpo.reference", "erpo.safety_pair_repeats", "erpo.epochs",
        "erpo.ranking", "erpo.loss", "erpo.optim", "erpo.resample", "learner.zero_stage", "model.lora",
        "model.quantization",
    ),
}
# Settings under a resume key that change how the same computation is run, not its result:
# a resumed run may change them (and a checkpoint written before they existed lacks them).
RESUME_IGNORED = frozenset({"erpo.loss.share_prefix"})
# Resume keys added after checkpoints were first written: a checkpoint without them ran with
# their default (no adapters, no quantization, the classifier judge's default labels and head,
# no resampled candidates, no system turn added).
ADDED_LATER = ("model.lora.", "model.quantization", "judge.unsafe_label", "judge.safe_label", "judge.classifier_head",
               "erpo.resample.", "data.system_prompt")


def semantic_diff(saved: dict[str, Any], current: Config, stage: str = "sft") -> list[str]:
    """List of 'key: saved -> current' for the ``stage``'s resume keys that differ. ``saved``
    is a checkpoint's config.yaml (old names of moved fields are understood)."""
    # Runs saved before load_config made paths absolute hold them relative to the current
    # directory they were started from (so does a Config built in code).
    before = _absolute_leaves(_leaves(_migrate(saved, "checkpoint config", warn=False)))
    # ERPO sampled up to eval.max_new_tokens before erpo.max_new_tokens existed.
    if "eval.max_new_tokens" in before:
        before.setdefault("erpo.max_new_tokens", before["eval.max_new_tokens"])
    now = _absolute_leaves(_leaves(current.to_dict()))
    defaults = _leaves(Config().to_dict())
    for leaf in defaults:
        if leaf.startswith(ADDED_LATER):
            before.setdefault(leaf, defaults[leaf])
    out = []
    for key in RESUME_KEYS[stage]:
        for leaf in sorted(k for k in now if (k == key or k.startswith(key + ".")) and k not in RESUME_IGNORED):
            if before.get(leaf) != now[leaf]:
                out.append(f"{leaf}: {before.get(leaf)!r} -> {now[leaf]!r}")
    return out


def _absolute_leaves(leaves: dict[str, Any]) -> dict[str, Any]:
    out = dict(leaves)
    for key in set(PATH_KEYS) - set(_NAMED_LISTS):
        value = out.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value) and value not in ("auto", "none"):
            out[key] = _absolute(value, Path.cwd())
    return out


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out

