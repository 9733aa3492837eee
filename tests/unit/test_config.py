import pytest

from safer_dist.config import Config, ConfigError, apply_override, load_config, semantic_diff


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_tiny_config_loads_and_fixed_override_names_work():
    cfg = load_config(
        "configs/tiny.yaml",
        ["run.name=x", "run.output_dir=/tmp/o", "train.max_steps=7", "learner.num_learners=1",
         "learner.zero_stage=3", "checkpoint.every_steps=3"],
    )
    assert (cfg.run.name, cfg.train.max_steps, cfg.learner.num_learners) == ("x", 7, 1)
    assert (cfg.learner.zero_stage, cfg.checkpoint.every_steps) == (3, 3)
    assert str(cfg.run.dir) == "/tmp/o/x"


def test_unknown_key_names_file_and_suggests(tmp_path):
    p = write(tmp_path, "train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'train\.max_step' \(did you mean 'train\.max_steps'\?\)"):
        load_config(p)
    p = write(tmp_path, "trian: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        load_config(p)


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.max_steps: expected int, got 'ten'"):
        load_config(p)
    p = write(tmp_path, "learner:\n  zero_stage: true\n")
    with pytest.raises(ConfigError, match="learner.zero_stage: expected int"):
        load_config(p)


def test_inconsistent_values_say_what_to_change(tmp_path):
    p = write(tmp_path, "train:\n  global_batch_size: 10\n  micro_batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.global_batch_size \(10\) must be a multiple"):
        load_config(p)
    with pytest.raises(ConfigError, match="checkpoint.keep_last must be >= 2"):
        load_config(None, ["checkpoint.keep_last=1"])
    with pytest.raises(ConfigError, match="learner.offload_params needs learner.zero_stage=3"):
        load_config(None, ["learner.offload_params=true"])
    with pytest.raises(ConfigError, match="erpo.safety_pair_repeats must be >= 1"):
        load_config(None, ["erpo.safety_pair_repeats=0"])


def test_overrides_are_typed():
    cfg = Config()
    apply_override(cfg, "train.lr=1e-4")  # YAML 1.1 reads this as a string; the field is float
    apply_override(cfg, "launch.ray_address=null")
    apply_override(cfg, "resume=none")
    apply_override(cfg, "model=/m")
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.launch.ray_address is None
    assert cfg.checkpoint.resume == "none" and cfg.model.path == "/m"
    for bad, msg in (("train.lr=abc", "expected float"), ("nosection=1", "expected section.field"),
                     ("train.max_steps", "expected section.field=value"), ("data.overlong=1.5", None)):
        if msg is None:
            apply_override(cfg, bad)  # a number is a valid string; validate() catches the value
            with pytest.raises(ConfigError, match="data.overlong must be one of"):
                cfg.validate()
        else:
            with pytest.raises(ConfigError, match=msg):
                apply_override(cfg, bad)


def test_semantic_diff_lists_changes():
    a = Config()
    b = Config()
    b.run.seed = 5
    b.train.global_batch_size = 32
    b.checkpoint.every_steps = 9  # harmless
    diffs = semantic_diff(a.to_dict(), b)
    assert diffs == ["run.seed: 0 -> 5", "train.global_batch_size: 16 -> 32"]
