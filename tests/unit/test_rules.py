"""Rulebook loading: the default book's shape, and errors that name the file and the field."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from safer_dist.reasoning.rules import Rulebook

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "rules" / "default.yaml"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(DEFAULT.read_text())


def test_default_rulebook_shape():
    book = Rulebook.load(DEFAULT)
    assert book.version >= 1 and book.name == "default" and book.benign_guidance
    assert book.category_ids == tuple(f"C{i:02d}" for i in range(1, 15))
    assert len(set(book.rule_ids)) == len(book.rule_ids)
    assert all(re.fullmatch(r"R\d{2}", rid) for rid in book.rule_ids)
    for cat in book.categories:
        assert 1 <= len(cat.rules) <= 2, cat.id
        assert cat.allowed, f"{cat.id} needs carve-outs so look-alikes are not refused"
    assert book.category("C10").name == "specialized_advice"
    assert book.category("C10").default_strategy == "comply_with_safeguards"
    assert book.category("C03").name == "cyber_abuse"
    assert [r.id for r in book.rules_for("C03")] == ["R05", "R06"]
    assert book.category_of_rule("R07").id == "C04"
    with pytest.raises(KeyError, match="unknown category 'C99'"):
        book.category("C99")


def _mutate(raw, path, value=None, delete=False):
    data = copy.deepcopy(raw)
    *parents, last = path
    node = data
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return data


CASES = [
    ("duplicate rule id", ("categories", 3, "rules", 0, "id"), "R05", False,
     "categories[3].rules[0].id: duplicate rule id R05 (also at categories[2].rules[0])"),
    ("duplicate category id", ("categories", 1, "id"), "C01", False,
     "categories[1].id: duplicate category id C01"),
    ("bad category id", ("categories", 0, "id"), "X1", False,
     "categories[0].id: bad category id 'X1'; expected the form C01"),
    ("bad rule id", ("categories", 5, "rules", 1, "id"), "R7", False,
     "categories[5].rules[1].id: bad rule id 'R7'"),
    ("missing field", ("categories", 2, "description"), None, True,
     "categories[2].description: missing required field"),
    ("missing top-level field", ("benign_guidance",), None, True, "benign_guidance: missing required field"),
    ("unknown default_strategy", ("categories", 4, "default_strategy"), "ignore", False,
     "categories[4].default_strategy: unknown default_strategy 'ignore'"),
    ("comply is not a violation strategy", ("categories", 4, "default_strategy"), "comply", False,
     "categories[4].default_strategy: unknown default_strategy 'comply'"),
    ("unknown top-level key", ("extra",), 1, False, "extra: unknown key 'extra'"),
    ("unknown rule key", ("categories", 0, "rules", 0, "severity"), "high", False,
     "categories[0].rules[0].severity: unknown key 'severity'"),
    ("empty rules", ("categories", 6, "rules"), [], False, "categories[6].rules: expected a non-empty list"),
    ("name not snake_case", ("categories", 0, "name"), "Violent Crime", False,
     "categories[0].name: expected a snake_case name"),
    ("duplicate name", ("categories", 1, "name"), "violent_crime", False,
     "categories[1].name: duplicate category name 'violent_crime'"),
    ("allowed not a list", ("categories", 0, "allowed"), "anything", False,
     "categories[0].allowed: expected a list of non-empty strings"),
    ("empty rule text", ("categories", 0, "rules", 0, "text"), " ", False,
     "categories[0].rules[0].text: expected a non-empty string"),
    ("bad version", ("version",), 0, False, "version: expected a positive integer"),
]


@pytest.mark.parametrize("what,path,value,delete,message", CASES, ids=[c[0] for c in CASES])
def test_validation_error_names_file_and_field(raw, tmp_path, what, path, value, delete, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_mutate(raw, path, value, delete), sort_keys=False))
    with pytest.raises(ValueError) as info:
        Rulebook.load(bad)
    assert str(info.value).startswith(f"{bad}: {message}"), str(info.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ValueError, match="nope.yaml: cannot read rulebook"):
        Rulebook.load(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("categories: [\n")
    with pytest.raises(ValueError, match="broken.yaml: invalid YAML"):
        Rulebook.load(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ValueError, match="broken.yaml: expected a mapping, got list"):
        Rulebook.load(bad)


def test_from_dict_round_trip(raw):
    assert Rulebook.from_dict(raw, source="x") == Rulebook(**{**Rulebook.load(DEFAULT).__dict__, "source": "x"})
