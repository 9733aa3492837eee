"""One typed config tree for every safer job.

A run is described by a YAML file whose top-level keys are the sections below, plus
``section.field=value`` overrides given after the file on the command line::

    safer sft configs/tiny.yaml train.max_steps=50 learner.zero_stage=3

Unknown keys, wrong types and inconsistent values raise :class:`ConfigError` before any
work starts, naming the key and where it came from: the override when one set a key the check
names, else the file. The resolved config (every default filled in, every path absolute) is
written to ``<run dir>/config.yaml``.

Paths (:data:`PATH_KEYS`): a relative path in the file, or a default the file leaves as it is,
resolves against the file's directory; a relative path in an override against the current
directory. The shipped rulebook and prompt templates are the defaults, found wherever safer is
installed (safer_dist/runtime/resources.py).

Components receive their own section only (``Learner(cfg.learner, ...)``); defaults live
here and nowhere else.

The schema (sections, defaults, validation) is :mod:`safer_dist.config.schema`; loading,
overrides, deprecated names and paths :mod:`safer_dist.config.loading`; what a resume checks
:mod:`safer_dist.config.resume`. Everything public is importable from here.
"""

from safer_dist.config.loading import (
    ALIASES, DEPRECATED, PATH_KEYS, apply_override, config_from_dict, load_config, save_config,
)
from safer_dist.config.resume import RESUME_KEYS, semantic_diff
from safer_dist.config.schema import (
    CheckpointSection, Config, ConfigError, DataSection, DpoLossSection, ErpoOptimSection, ErpoSection,
    EvalSection, JudgeSection, LaunchSection, LearnerSection, ModelSection, OptimSection, RolloutSection,
    RunSection, SynthSection, TrackSection, TrainSection, parse_named_list,
)

__all__ = [
    "ALIASES", "DEPRECATED", "PATH_KEYS", "RESUME_KEYS", "CheckpointSection", "Config", "ConfigError", "DataSection",
    "DpoLossSection", "ErpoOptimSection", "ErpoSection", "EvalSection", "JudgeSection", "LaunchSection",
    "LearnerSection", "ModelSection", "OptimSection", "RolloutSection", "RunSection", "SynthSection", "TrackSection",
    "TrainSection", "apply_override", "config_from_dict", "load_config", "parse_named_list", "save_config",
    "semantic_diff",
]
