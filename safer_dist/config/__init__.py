"""One typed config tree for every safer job.

A run is a YAML file of sections plus ``section.field=value`` overrides
(``safer sft configs/tiny.yaml train.max_steps=50``). Bad keys, types and values raise
:class:`ConfigError` before any work starts; the resolved config is saved in every run.

Components receive their own section only (``Learner(cfg.learner, ...)``); defaults live
here and nowhere else.

The schema (sections, defaults, validation) is :mod:`safer_dist.config.schema` (with its
:mod:`~safer_dist.config.train_sections` and :mod:`~safer_dist.config.erpo_sections`); loading,
overrides, deprecated names and paths :mod:`safer_dist.config.loading`; what a resume checks
:mod:`safer_dist.config.resume`. Everything public is importable from here.
"""

from safer_dist.config.loading import (
    ALIASES, DEPRECATED, PATH_KEYS, apply_override, config_from_dict, load_config, save_config,
)
from safer_dist.config.resume import RESUME_KEYS, semantic_diff
from safer_dist.config.schema import (
    CheckpointSection, Config, ConfigError, DataSection, DpoLossSection, ErpoOptimSection, ErpoSection,
    EvalSection, JudgeSection, LaunchSection, LearnerSection, LoraSection, ModelSection, OptimSection, RolloutSection,
    RunSection, SynthSection, TrackSection, TrainSection, parse_named_list,
)

__all__ = [
    "ALIASES", "DEPRECATED", "PATH_KEYS", "RESUME_KEYS", "CheckpointSection", "Config", "ConfigError", "DataSection",
    "DpoLossSection", "ErpoOptimSection", "ErpoSection", "EvalSection", "JudgeSection", "LaunchSection",
    "LearnerSection", "LoraSection", "ModelSection", "OptimSection", "RolloutSection", "RunSection", "SynthSection", "TrackSection",
    "TrainSection", "apply_override", "config_from_dict", "load_config", "parse_named_list", "save_config",
    "semantic_diff",
]
