"""The rulebook: risk categories, their rules and their allowed carve-outs.

Loaded from YAML (``configs/rules/*.yaml``) and validated on load; every error names the file
and the field path, e.g. ``configs/rules/x.yaml: categories[3].rules[0].id: duplicate rule id
R05``. Schema::

    version: 1                      # positive int
    name: default                   # non-empty string
    benign_guidance: "..."          # how to treat requests that fall in no category
    categories:
      - id: C01                     # C + two digits, unique
        name: violent_crime         # snake_case, unique
        description: "..."
        rules:                      # at least one; ids R + two digits, unique across the book
          - {id: R01, text: "..."}
        allowed: ["...", ...]       # benign look-alikes that must not be refused
        default_strategy: refuse_and_redirect   # or comply_with_safeguards
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from safer_dist.reasoning.exante import STRATEGIES

# A violation is never answered with plain "comply"; that would make the rule meaningless.
VIOLATION_STRATEGIES = tuple(s for s in STRATEGIES if s != "comply")

_CATEGORY_ID_RE = re.compile(r"C\d{2}")
_RULE_ID_RE = re.compile(r"R\d{2}")
_SNAKE_RE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_TOP_KEYS = ("version", "name", "benign_guidance", "categories")
_CATEGORY_KEYS = ("id", "name", "description", "rules", "allowed", "default_strategy")
_RULE_KEYS = ("id", "text")


@dataclass(frozen=True)
class Rule:
    id: str
    text: str


@dataclass(frozen=True)
class Category:
    id: str
    name: str
    description: str
    rules: tuple[Rule, ...]
    allowed: tuple[str, ...]
    default_strategy: str


@dataclass(frozen=True)
class Rulebook:
    version: int
    name: str
    benign_guidance: str
    categories: tuple[Category, ...]
    source: str = "<dict>"

    @classmethod
    def load(cls, path: str | Path) -> Rulebook:
        """Read and validate a rulebook YAML file; ``ValueError`` names file and field."""
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"{source}: cannot read rulebook: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{source}: invalid YAML: {e}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Rulebook:
        """Validate a parsed rulebook mapping; ``source`` prefixes every error message."""
        v = _Validator(source)
        v.mapping(data, "", _TOP_KEYS)
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            v.fail("version", f"expected a positive integer, got {version!r}")
        name = v.text(data, "", "name")
        guidance = v.text(data, "", "benign_guidance")
        raw_categories = data["categories"]
        if not isinstance(raw_categories, list) or not raw_categories:
            v.fail("categories", "expected a non-empty list of categories")

        categories: list[Category] = []
        seen_cat_ids: dict[str, str] = {}
        seen_names: dict[str, str] = {}
        seen_rule_ids: dict[str, str] = {}
        for i, raw in enumerate(raw_categories):
            where = f"categories[{i}]"
            v.mapping(raw, where, _CATEGORY_KEYS)
            cid = v.ident(raw, where, _CATEGORY_ID_RE, "C01", seen_cat_ids, "category id")
            cname = v.text(raw, where, "name")
            if not _SNAKE_RE.fullmatch(cname):
                v.fail(f"{where}.name", f"expected a snake_case name, got {cname!r}")
            if cname in seen_names:
                v.fail(f"{where}.name", f"duplicate category name {cname!r} (also {seen_names[cname]})")
            seen_names[cname] = where
            description = v.text(raw, where, "description")
            raw_rules = raw["rules"]
            if not isinstance(raw_rules, list) or not raw_rules:
                v.fail(f"{where}.rules", "expected a non-empty list of rules")
            rules = []
            for j, raw_rule in enumerate(raw_rules):
                rwhere = f"{where}.rules[{j}]"
                v.mapping(raw_rule, rwhere, _RULE_KEYS)
                rid = v.ident(raw_rule, rwhere, _RULE_ID_RE, "R01", seen_rule_ids, "rule id")
                rules.append(Rule(rid, v.text(raw_rule, rwhere, "text")))
            allowed = raw["allowed"]
            if not isinstance(allowed, list) or not all(isinstance(a, str) and a.strip() for a in allowed):
                v.fail(f"{where}.allowed", "expected a list of non-empty strings")
            strategy = raw["default_strategy"]
            if strategy not in VIOLATION_STRATEGIES:
                v.fail(
                    f"{where}.default_strategy",
                    f"unknown default_strategy {strategy!r}; expected one of {', '.join(VIOLATION_STRATEGIES)}",
                )
            categories.append(Category(cid, cname, description, tuple(rules), tuple(allowed), strategy))
        return cls(version, name, guidance, tuple(categories), source)

    def listing(self) -> str:
        """The categories with their names and rule ids, a line each (``data.system_prompt:
        rulebook`` puts it in the system turn): what a trace cites, for a model to look up."""
        lines = ["You follow this safety rulebook. Risk categories, each with its rules:"]
        lines += [f"{c.id} {c.name}: " + " ".join(f"[{r.id}]" for r in c.rules) for c in self.categories]
        return "\n".join(lines)

    @property
    def category_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.categories)

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(r.id for c in self.categories for r in c.rules)

    def category(self, cid: str) -> Category:
        """The category with id ``cid`` (``KeyError`` naming the known ids otherwise)."""
        for c in self.categories:
            if c.id == cid:
                return c
        raise KeyError(f"{self.source}: unknown category {cid!r}; known: {', '.join(self.category_ids)}")

    def rules_for(self, cid: str) -> tuple[Rule, ...]:
        return self.category(cid).rules

    def category_of_rule(self, rid: str) -> Category:
        for c in self.categories:
            if any(r.id == rid for r in c.rules):
                return c
        raise KeyError(f"{self.source}: unknown rule id {rid!r}")


class _Validator:
    """Small helpers that raise ``ValueError("<source>: <field path>: <problem>")``."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str):
        raise ValueError(f"{self.source}: {where}: {problem}" if where else f"{self.source}: {problem}")

    def mapping(self, raw: Any, where: str, keys: tuple[str, ...]) -> None:
        if not isinstance(raw, dict):
            self.fail(where, f"expected a mapping, got {type(raw).__name__}")
        prefix = f"{where}." if where else ""
        for key in raw:
            if key not in keys:
                self.fail(f"{prefix}{key}", f"unknown key {key!r}; expected one of {', '.join(keys)}")
        for key in keys:
            if key not in raw:
                self.fail(f"{prefix}{key}", "missing required field")

    def text(self, raw: dict, where: str, key: str) -> str:
        value = raw[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{where}.{key}" if where else key, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def ident(self, raw: dict, where: str, pattern: re.Pattern, example: str,
              seen: dict[str, str], what: str) -> str:
        value = raw["id"]
        if not isinstance(value, str) or not pattern.fullmatch(value):
            self.fail(f"{where}.id", f"bad {what} {value!r}; expected the form {example}")
        if value in seen:
            self.fail(f"{where}.id", f"duplicate {what} {value} (also at {seen[value]})")
        seen[value] = where
        return value
