"""Loading a config: YAML, ``section.field=value`` overrides, deprecated names, paths.

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
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from operator import attrgetter
from pathlib import Path
from typing import Any

import yaml

from safer_dist.config.schema import Config, ConfigError, log
from safer_dist.runtime.io import atomic_write_text
from safer_dist.runtime.resources import shipped

# Fields holding file system paths: made absolute by load_config (see the module docstring).
# eval.benchmarks / eval.models are name:path lists; checkpoint.resume also takes auto | none.
PATH_KEYS = (
    "run.output_dir", "model.path", "data.train", "data.valid", "data.eval", "data.erpo_prompts", "data.rulebook",
    "judge.model_path", "erpo.init_from", "checkpoint.resume", "eval.benchmarks", "eval.models",
    "synth.prompts", "synth.out_dir", "synth.teacher_path", "synth.prompt_template", "synth.classifier_path",
    "synth.classifier_template",
)
_NAMED_LISTS = ("eval.benchmarks", "eval.models")

# Short names accepted on the command line for the most used fields.
ALIASES = {"resume": "checkpoint.resume", "model": "model.path"}

# Old names of moved fields: still accepted (in files and overrides) for one release, with a
# deprecation message. None: a field that was removed because nothing read it.
_ERPO_MOVED = {
    "optim": ("global_batch_size", "micro_batch_size", "lr", "warmup_steps"),
    "loss": ("beta", "nll_weight", "length_alpha", "label_smoothing"),
    "ranking": ("scoring", "margin", "min_length_gap", "min_chosen_safety", "min_efficiency_utility", "w_safety",
                "w_utility", "w_efficiency", "step_token_budget", "budget_decay", "efficiency_growth"),
}
DEPRECATED: dict[str, str | None] = {
    **{f"erpo.{name}": f"erpo.{sub}.{name}" for sub, names in _ERPO_MOVED.items() for name in names},
    "rollout.max_new_tokens": None,
}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load ``path`` (YAML; None for all defaults), apply ``key=value`` overrides, make the
    paths absolute, validate. A validation error names the override that set a key the failing
    check names, else the file."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    base = Path.cwd()
    if path is not None:
        source = str(path)
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found (the shipped configs are in {shipped('configs')})")
        base = Path(os.path.abspath(p)).parent
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
    cfg = config_from_dict(raw, source)
    for key in PATH_KEYS:
        _resolve_path(cfg, key, base)
    for item in overrides:
        key = apply_override(cfg, item)
        if key is None:
            continue
        cfg._overrides[key] = item
        if key in PATH_KEYS:
            _resolve_path(cfg, key, Path.cwd())
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{_blame(cfg, str(e), source)}: {e}") from None
    return cfg


def _blame(cfg: Config, message: str, source: str) -> str:
    """The overrides that set a key ``message`` names, else ``source`` (the file)."""
    named = [item for key, item in cfg._overrides.items() if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)]
    return ", ".join(f"override {item!r}" for item in named) if named else source


def _resolve_path(cfg: Config, key: str, base: Path) -> None:
    """Make the path(s) of ``key`` absolute against ``base``; remember the value as written."""
    *parents, leaf = key.split(".")
    obj = attrgetter(".".join(parents))(cfg)
    value = getattr(obj, leaf)
    if not isinstance(value, str) or not value or (key == "checkpoint.resume" and value in ("auto", "none")):
        return
    cfg._written[key] = value
    if key in _NAMED_LISTS:
        items = [x.strip() for x in value.split(",") if x.strip()]
        if not all(":" in x for x in items):
            return  # malformed: validation names it
        resolved = ",".join(f"{n}:{_absolute(p.strip(), base)}" for n, p in (x.split(":", 1) for x in items))
    else:
        resolved = _absolute(value, base)
    setattr(obj, leaf, resolved)


def _absolute(path: str, base: Path) -> str:
    return os.path.abspath(base / os.path.expanduser(path))


def config_from_dict(raw: dict[str, Any], source: str) -> Config:
    """A Config from a nested mapping (a config file, a checkpoint's config.yaml); old names
    of moved fields are migrated with a deprecation message. Not validated."""
    return _build(Config, _migrate(raw, source), source, prefix="")


def _migrate(raw: Any, source: str, *, warn: bool = True) -> Any:
    """``raw`` with deprecated keys moved to their new place (a copy; raw is not changed)."""
    if not isinstance(raw, dict):
        return raw
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in DEPRECATED.items():
        section, name = old.split(".")
        if not isinstance(out.get(section), dict) or name not in out[section]:
            continue
        value = out[section].pop(name)
        if warn:
            _warn_deprecated(source, old, new)
        if new is None:
            continue
        parent = out
        *path, leaf = new.split(".")
        for part in path:
            child = parent.get(part)
            parent[part] = child = dict(child) if isinstance(child, dict) else {}
            parent = child
        if leaf in parent and parent[leaf] != value:
            raise ConfigError(f"{source}: both '{old}' (deprecated) and '{new}' are set; keep '{new}' only")
        parent[leaf] = value
    return out


_warned: set[tuple[str, str]] = set()


def _warn_deprecated(source: str, old: str, new: str | None) -> None:
    if (source, old) in _warned:
        return
    _warned.add((source, old))
    if new is None:
        log.warning("%s: '%s' is read by nothing and is ignored; remove it (it will be an error in the next release)",
                    source, old)
    else:
        log.warning("%s: '%s' is deprecated; use '%s' (the old name stops working in the next release)", source, old, new)


def apply_override(cfg: Config, item: str) -> str | None:
    """Apply one ``section.field=value`` (or ``section.sub.field=value``) override; the value
    is parsed as YAML and typed by the field. Returns the key it set (aliases and deprecated
    names resolved; None for a removed key), its path not yet made absolute."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value")
    key, text = item.split("=", 1)
    key = ALIASES.get(key.strip(), key.strip())
    source = f"override {item!r}"
    if key in DEPRECATED:
        _warn_deprecated(source, key, DEPRECATED[key])
        if DEPRECATED[key] is None:
            return None
        key = DEPRECATED[key]
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{source}: expected section.field=value (e.g. train.max_steps=10)")
    obj: Any = cfg
    for depth, name in enumerate(parts):
        prefix = ".".join(parts[:depth]) + "." if depth else ""
        child = _get_field(obj, name, source, prefix)
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(child) != (not last):
            what = "a section; name one of its fields" if last else "a field, not a section"
            raise ConfigError(f"{source}: '{'.'.join(parts[: depth + 1])}' is {what}")
        if not last:
            obj = child
    typ = typing.get_type_hints(type(obj))[parts[-1]]
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, bool) and str in (typ, *typing.get_args(typ)):
        value = text.strip()  # YAML 1.1 reads yes / no / on / off as booleans; a text field means the word
    setattr(obj, parts[-1], _coerce(value, typ, source, key))
    return key


def _get_field(obj: Any, name: str, source: str, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        hint = difflib.get_close_matches(name, list(fields), n=1)
        did = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{source}: unknown key '{prefix}{name}'{did}")
    return getattr(obj, name)


def _build(cls: type, raw: Any, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            did = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{did}")
    kwargs = {}
    for name, value in raw.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value or {}, source, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, typ, source, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, source: str, key: str):
    """Check ``value`` against the annotation ``typ``; ints widen to float, nothing else."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, source, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{source}: {key}: expected {names}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected str, got {value!r} (YAML reads yes, no, on, off, true and "
                              f"false as booleans: quote the word, e.g. {key.split('.')[-1]}: \"yes\")")
    else:
        return value
    raise ConfigError(f"{source}: {key}: expected {typ.__name__}, got {value!r}")


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically."""
    atomic_write_text(path, cfg.to_yaml())


