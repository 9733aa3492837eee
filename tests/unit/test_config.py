import pytest

from safer_dist.config import Config, ConfigError, apply_override, config_from_dict, load_config, semantic_diff


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
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel must be >= 1 \(got 0\): .* each worker needs "
                                          r"that many GPUs of one node \(on CPU, that many times rollout\.cpus_per_worker"):
        load_config(None, ["rollout.tensor_parallel=0"])
    assert load_config(None, ["rollout.tensor_parallel=4"]).rollout.tensor_parallel == 4


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


def test_an_erpo_checkpoint_from_before_the_classifier_judge_resumes_unless_it_is_used():
    saved = Config().to_dict()
    for key in ("unsafe_label", "safe_label", "classifier_head"):
        del saved["judge"][key]
    assert semantic_diff(saved, Config(), "erpo") == []
    now = load_config(None, ["judge.kind=classifier", "judge.model_path=/x", "judge.unsafe_label=yes"])
    assert [d.split(":")[0] for d in semantic_diff(saved, now, "erpo")] == ["judge.kind", "judge.model_path",
                                                                             "judge.unsafe_label"]


def test_yes_and_no_are_words_for_text_fields():
    # YAML 1.1 reads yes / no as booleans; the classifier judge's labels are often those words.
    cfg = load_config(None, ["judge.unsafe_label=yes", "judge.safe_label=No"])
    assert (cfg.judge.unsafe_label, cfg.judge.safe_label) == ("yes", "No")
    with pytest.raises(ConfigError, match="learner.offload_optimizer: expected bool"):
        load_config(None, ["learner.offload_optimizer=maybe"])
    with pytest.raises(ConfigError, match='quote the word, e.g. unsafe_label: "yes"'):
        config_from_dict({"judge": {"unsafe_label": True}}, "test.yaml")


# ---------------------------------------------------------------- ERPO sub-sections, old names


def test_erpo_sub_sections_take_three_level_overrides_and_typed_defaults():
    cfg = load_config(None, ["erpo.loss.beta=0.3", "erpo.optim.lr=3e-6", "erpo.ranking.margin=0.5",
                             "learner.num_learners=1"])
    assert (cfg.erpo.loss.beta, cfg.erpo.optim.lr, cfg.erpo.ranking.margin) == (0.3, 3e-6, 0.5)
    # ERPO's optimiser defaults are its own, not SFT's (train.lr 2e-3, warmup 20)
    assert (Config().erpo.optim.lr, Config().erpo.optim.warmup_steps) == (1e-4, 0)
    with pytest.raises(ConfigError, match=r"unknown key 'erpo\.loss\.betta' \(did you mean 'erpo\.loss\.beta'\?\)"):
        load_config(None, ["erpo.loss.betta=1"])
    with pytest.raises(ConfigError, match=r"'erpo\.loss' is a section; name one of its fields"):
        load_config(None, ["erpo.loss=1"])
    with pytest.raises(ConfigError, match=r"'train\.lr' is a field, not a section"):
        load_config(None, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"erpo\.optim\.global_batch_size \(10\) must be a multiple"):
        load_config(None, ["erpo.optim.global_batch_size=10", "erpo.optim.micro_batch_size=4"])


def test_old_erpo_names_still_work_with_a_deprecation_message(tmp_path, caplog):
    p = write(tmp_path, "erpo:\n  beta: 0.4\n  lr: 1.0e-6\n  margin: 0.3\nrollout:\n  max_new_tokens: 512\n")
    cfg = load_config(p, ["erpo.global_batch_size=8", "erpo.micro_batch_size=4"])
    assert (cfg.erpo.loss.beta, cfg.erpo.optim.lr, cfg.erpo.ranking.margin) == (0.4, 1e-6, 0.3)
    assert (cfg.erpo.optim.global_batch_size, cfg.erpo.optim.micro_batch_size) == (8, 4)
    text = caplog.text
    for old, new in (("erpo.beta", "erpo.loss.beta"), ("erpo.lr", "erpo.optim.lr"), ("erpo.margin", "erpo.ranking.margin"),
                     ("erpo.global_batch_size", "erpo.optim.global_batch_size")):
        assert f"'{old}' is deprecated; use '{new}'" in text
    assert "'rollout.max_new_tokens' is read by nothing and is ignored" in text
    both = write(tmp_path, "erpo:\n  beta: 0.4\n  loss:\n    beta: 0.2\n")
    with pytest.raises(ConfigError, match=r"both 'erpo\.beta' \(deprecated\) and 'erpo\.loss\.beta' are set"):
        load_config(both)


def test_every_config_field_has_a_reader():
    """Walk the schema; every field must be read (``x.field``) somewhere in the library outside
    validation, so no setting silently does nothing."""
    import ast
    import dataclasses
    import typing
    from pathlib import Path

    read: set[str] = set()
    for path in [*Path("safer_dist").rglob("*.py"), *Path("launcher").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        skip = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "validate"
                for n in ast.walk(f)}
        read |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n) not in skip}

    def fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from fields(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, f.name

    unread = [key for key, name in fields(Config) if name not in read]
    assert not unread, f"config fields nothing reads: {unread}"


def test_erpo_resume_checks_every_optimisation_setting_and_reads_old_checkpoints():
    a = load_config(None, ["erpo.loss.beta=0.1"])
    b = load_config(None, ["erpo.loss.beta=0.2", "erpo.optim.lr=1e-5", "erpo.ranking.margin=0.5",
                           "train.lr=1e-3", "erpo.iterations=5"])
    # ERPO's resume ignores SFT's settings and the iteration count (raising it extends the run)
    assert semantic_diff(a.to_dict(), b, "erpo") == [
        "erpo.ranking.margin: 0.25 -> 0.5", "erpo.loss.beta: 0.1 -> 0.2", "erpo.optim.lr: 0.0001 -> 1e-05"]
    # a checkpoint's config.yaml from before the sub-sections (flat erpo.beta, erpo.lr) is understood
    old = a.to_dict()
    erpo = old["erpo"]
    erpo.update(**erpo.pop("loss"), lr=erpo["optim"].pop("lr"))
    assert semantic_diff(old, a, "erpo") == []
    # how pairs are packed is not what is trained: a resume may switch prefix sharing
    assert semantic_diff(a.to_dict(), load_config(None, ["erpo.loss.share_prefix=false"]), "erpo") == []
    assert semantic_diff(old, b, "erpo")[1:] == ["erpo.loss.beta: 0.1 -> 0.2", "erpo.optim.lr: 0.0001 -> 1e-05"]
    # ERPO's sampling length is its own; a checkpoint from before erpo.max_new_tokens sampled up
    # to eval.max_new_tokens, which stands in for it.
    assert semantic_diff(a.to_dict(), load_config(None, ["eval.max_new_tokens=100"]), "erpo") == []
    assert semantic_diff(a.to_dict(), load_config(None, ["erpo.max_new_tokens=100"]), "erpo") == [
        "erpo.max_new_tokens: 256 -> 100"]
    before_field = a.to_dict()
    del before_field["erpo"]["max_new_tokens"]
    before_field["eval"]["max_new_tokens"] = 100
    assert semantic_diff(before_field, load_config(None, ["erpo.max_new_tokens=100"]), "erpo") == []
    assert semantic_diff(before_field, a, "erpo") == ["erpo.max_new_tokens: 100 -> 256"]


def test_validation_loss_settings_are_checked():
    with pytest.raises(ConfigError, match=r"train\.eval_every_steps needs a validation set"):
        load_config(None, ["train.eval_every_steps=10"])
    with pytest.raises(ConfigError, match=r"data\.valid_fraction must be in \[0, 1\)"):
        load_config(None, ["data.valid_fraction=1.0"])
    with pytest.raises(ConfigError, match="set data.valid or data.valid_fraction, not both"):
        load_config(None, ["data.valid=v.jsonl", "data.valid_fraction=0.1"])
    cfg = load_config(None, ["train.eval_every_steps=10", "data.valid_fraction=0.05"])
    assert cfg.train.eval_every_steps == 10
    # The held-out fraction changes the training set: resuming with another one is refused.
    assert semantic_diff(load_config(None).to_dict(), cfg) == ["data.valid_fraction: 0.0 -> 0.05"]
