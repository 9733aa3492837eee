"""Where a config's paths point (relative to the file; overrides relative to the current
directory), the shipped files, and which source an error blames."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from safer_dist.config import Config, ConfigError, load_config, semantic_diff
from safer_dist.runtime.resources import shipped, shipped_root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def exp(tmp_path, monkeypatch):
    """A config in <tmp>/exp/ and the current directory somewhere else (<tmp>/elsewhere)."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = tmp_path / "exp" / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": "../models/m"},
        "data": {"train": "data/sft.jsonl", "eval": "/abs/eval.jsonl"},
        "eval": {"benchmarks": "xstest:bench/x.csv,harmbench:/b/h.csv"},
        "synth": {"teacher_path": "~/teacher"},
    }))
    return tmp_path


def test_paths_in_the_file_resolve_against_its_directory(exp):
    cfg = load_config(exp / "exp" / "c.yaml")
    assert cfg.model.path == str(exp / "models" / "m")
    assert cfg.data.train == str(exp / "exp" / "data" / "sft.jsonl")
    assert cfg.data.eval == "/abs/eval.jsonl"
    # a default the file leaves as it is belongs to the file too
    assert cfg.data.erpo_prompts == str(exp / "exp" / "data" / "demo" / "erpo_prompts.jsonl")
    assert cfg.run.dir == exp / "exp" / "runs" / "tiny"
    assert cfg.eval.benchmarks == f"xstest:{exp / 'exp' / 'bench' / 'x.csv'},harmbench:/b/h.csv"
    assert cfg.synth.teacher_path == str(Path.home() / "teacher")
    assert cfg.checkpoint.resume == "auto"
    assert (cfg.written("model.path"), cfg.written("data.train")) == ("../models/m", "data/sft.jsonl")


def test_paths_in_overrides_resolve_against_the_current_directory(exp):
    cfg = load_config(exp / "exp" / "c.yaml", ["data.train=mine.jsonl", "model=hub-org/name", "resume=ck/step_4"])
    here = exp / "elsewhere"
    assert cfg.data.train == str(here / "mine.jsonl")
    assert cfg.model.path == str(here / "hub-org" / "name") and cfg.written("model.path") == "hub-org/name"
    assert cfg.checkpoint.resume == str(here / "ck" / "step_4")
    assert cfg.override_for("data.train") == "data.train=mine.jsonl"
    assert cfg.override_for("model.path") == "model=hub-org/name"
    assert cfg.override_for("data.eval") is None


def test_the_shipped_rulebook_and_templates_are_the_defaults_from_any_directory(exp):
    cfg = load_config(exp / "exp" / "c.yaml")
    assert Path(cfg.data.rulebook) == shipped("configs/rules/default.yaml")
    assert Path(cfg.data.rulebook).is_file() and Path(cfg.synth.prompt_template).is_file()
    assert Path(cfg.synth.classifier_template).is_file()
    # run from the checkout, the shipped files are the checkout's own
    assert shipped_root() == REPO
    with pytest.raises(ValueError, match="configs or slurm"):
        shipped("docs/format.md")


def test_the_tiny_config_keeps_its_layout_from_any_directory(exp):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.data.train == str(REPO / "data" / "demo" / "sft.jsonl")
    assert cfg.model.path == str(REPO / "models" / "tiny")
    assert cfg.run.dir == REPO / "runs" / "tiny"
    assert cfg.data.rulebook == str(REPO / "configs" / "rules" / "default.yaml")


def test_a_missing_config_file_says_where_the_shipped_ones_are(exp):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found \(the shipped configs are in .*configs\)"):
        load_config("nope.yaml")


def test_a_validation_error_names_the_override_that_caused_it(exp):
    p = exp / "exp" / "c.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(p, ["run.name=x", "learner.num_learners=3"])
    # global batch 16 = micro-batch 8 x 2 learners in the file; 3 learners came from the override
    assert str(e.value).startswith("override 'learner.num_learners=3': train.global_batch_size (16) must be a multiple")
    assert str(p) not in str(e.value)
    with pytest.raises(ConfigError, match=r"^override 'erpo.optim.lr=0': erpo.optim.lr must be > 0"):
        load_config(p, ["erpo.optim.lr=0"])
    # erpo.optim.lr is not train.lr: an error about train.lr is the file's
    p.write_text("train:\n  lr: 0\n")
    with pytest.raises(ConfigError, match=rf"^{p}: train.lr must be > 0"):
        load_config(p, ["erpo.optim.lr=1e-5"])


def test_resume_check_understands_runs_saved_with_relative_paths(exp, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    saved = cfg.to_dict()
    # how a run started in the checkout before paths were made absolute saved them
    saved["model"]["path"], saved["data"]["train"] = "models/tiny", "data/demo/sft.jsonl"
    saved["data"]["rulebook"] = "configs/rules/default.yaml"
    assert semantic_diff(saved, cfg, "sft") == []
    assert semantic_diff(saved, cfg, "erpo") == []
    saved["data"]["train"] = "data/other.jsonl"
    assert semantic_diff(saved, cfg, "sft") == [f"data.train: '{REPO}/data/other.jsonl' -> '{REPO}/data/demo/sft.jsonl'"]


def test_a_config_built_in_code_records_no_overrides():
    cfg = Config()
    assert cfg.override_for("model.path") is None and cfg.written("model.path") == "models/tiny"
