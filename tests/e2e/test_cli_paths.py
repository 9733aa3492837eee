"""The CLI with paths a user got wrong, and the commands that run nothing: a missing path that a
user gave is an error (exit 2, naming it) and nothing is created there; demo data and the tiny
model appear only at the config file's own paths; `safer --version`, `safer config`, `safer
plan`'s exit code when nothing fits; an error an override caused names the override. Every case
fails before Ray starts, so the CLI runs in-process (``launcher.cli.main``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import safer_dist
from launcher.cli import main
from safer_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny.yaml"
RECIPES = ["configs/llama3-8b-8xh100.yaml", "configs/qwen2.5-7b-8xh100.yaml", "configs/llama3-70b-4x8xh100.yaml",
           "configs/llama3-8b-1xh100.yaml"]


def _sft(tmp_path, *overrides) -> int:
    return main(["sft", TINY, f"run.output_dir={tmp_path / 'runs'}", "launch.device=cpu", *overrides])


def test_a_mistyped_data_path_is_an_error_not_demo_data(tmp_path, tiny_model_dir, logs):
    typo = tmp_path / "typo" / "sft.jsonl"
    assert _sft(tmp_path, f"model.path={tiny_model_dir}", f"data.train={typo}") == 2
    assert any(f"data.train={typo}: no such file" in m for m in logs), logs[-3:]
    assert any("data.generate_demo writes the demo set only at the config file's own data.train" in m for m in logs)
    assert not (tmp_path / "typo").exists() and not (tmp_path / "runs").exists()


def test_a_mistyped_model_path_is_an_error_not_a_random_model(tmp_path, demo_data_dir, logs):
    typo = tmp_path / "typo_model"
    assert _sft(tmp_path, f"model.path={typo}", f"data.train={demo_data_dir / 'sft.jsonl'}") == 2
    assert any(f"model.path={typo}: no such directory" in m for m in logs), logs[-3:]
    assert not typo.exists() and not (tmp_path / "runs").exists()


def test_a_hub_name_as_model_path_says_how_to_download_it(tmp_path, demo_data_dir, logs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sft", str(REPO / TINY), "model.path=meta-llama/Llama-3.1-8B", "run.output_dir=runs",
                 f"data.train={demo_data_dir / 'sft.jsonl'}"]) == 2
    assert any(
        f"model.path=meta-llama/Llama-3.1-8B ({tmp_path}/meta-llama/Llama-3.1-8B): no such directory; models load from "
        "local directories, never from a hub: download it with `huggingface-cli download meta-llama/Llama-3.1-8B "
        "--local-dir DIR` and set model.path=DIR" in m for m in logs), logs[-3:]
    assert list(tmp_path.iterdir()) == []


def test_demo_data_and_model_are_created_only_at_the_files_own_paths(tmp_path):
    from safer_dist.jobs import preflight, prepare_inputs

    cfg_file = tmp_path / "exp" / "c.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(yaml.safe_dump({
        "model": {"path": "m", "init_preset": "test"},
        "data": {"train": "demo/sft.jsonl", "eval": "demo/eval.jsonl", "erpo_prompts": "demo/erpo_prompts.jsonl",
                 "generate_demo": True, "demo_num_sft": 32},
    }))
    prepare_inputs(load_config(cfg_file, [f"data.train={tmp_path / 'other' / 'sft.jsonl'}", f"model.path={tmp_path / 'm2'}"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"] and sorted(
        p.name for p in (tmp_path / "exp").iterdir()) == ["c.yaml"]
    cfg = load_config(cfg_file)
    prepare_inputs(cfg)
    assert sorted(p.name for p in (tmp_path / "exp" / "demo").iterdir()) == ["erpo_prompts.jsonl", "eval.jsonl", "sft.jsonl"]
    assert (tmp_path / "exp" / "m" / "config.json").is_file()
    preflight(cfg)


@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_recipes_generate_nothing(recipe):
    cfg = load_config(recipe)
    assert not cfg.data.generate_demo and cfg.model.init_preset is None
    # their paths sit beside the checkout's configs/, like the embedded default's
    assert cfg.data.train == str(REPO / "data" / "demo" / "sft.jsonl") and cfg.run.dir.parent == REPO / "runs"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"safer {safer_dist.__version__}\n"


def test_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    assert main(["config", TINY, "train.max_steps=7", f"run.output_dir={tmp_path / 'runs'}"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 7 and printed["train"]["micro_batch_size"] == 8
    assert printed["data"]["train"] == str(REPO / "data" / "demo" / "sft.jsonl")
    assert printed["data"]["rulebook"] == str(REPO / "configs" / "rules" / "default.yaml")
    assert printed["erpo"]["loss"]["beta"] == 0.1 and printed["launch"]["ray_address"] is None
    assert list(tmp_path.iterdir()) == []
    assert main(["config", TINY, "train.max_stepz=7"]) == 2


@pytest.mark.parametrize("gpu_mem_gb, code", [(80, 0), (4, 3)])
def test_plan_exit_code_says_whether_anything_fits(gpu_mem_gb, code, capsys):
    rc = main(["plan", RECIPES[2], "--gpus-per-node", "8", "--nodes", "4", "--gpu-mem-gb", str(gpu_mem_gb),
               "--shape", "llama3-70b", "--stage", "sft"])
    assert rc == code
    assert ("recommendation: nothing fits" in capsys.readouterr().out) == (code == 3)


def test_plan_exits_3_when_the_learners_fit_but_a_rollout_worker_does_not(capsys):
    # the 70B recipe's SFT fits; `safer run` also needs a whole bf16 copy on one GPU (142 GiB)
    rc = main(["plan", RECIPES[2], "--gpus-per-node", "8", "--nodes", "4", "--gpu-mem-gb", "80",
               "--shape", "llama3-70b"])
    out = capsys.readouterr().out
    assert rc == 3 and "recommendation: ZeRO-3 + ckpt, mb 8" in out
    assert out.rstrip().endswith("DOES NOT FIT: a rollout worker does not fit on 1 GPU(s) (rollout.tensor_parallel=1)")


def test_an_error_caused_by_an_override_names_the_override_not_the_file(tmp_path, logs):
    assert _sft(tmp_path, "learner.num_learners=3") == 2
    (message,) = [m for m in logs if "must be a multiple" in m]
    assert message.startswith("config error: override 'learner.num_learners=3': train.global_batch_size (16)"), message
    assert TINY not in message
