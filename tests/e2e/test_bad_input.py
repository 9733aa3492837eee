"""Bad input to `safer sft`: a clear error naming the file (line, field), exit code 2, and the
existing run directory and its checkpoint byte for byte as they were. Every case fails before
Ray starts, so the CLI runs in-process (``launcher.cli.main``); the subprocess exit code of a
bad checkpoint is checked in test_resume_faults.py. Over-long examples are not an error: they
are truncated or dropped and counted in metrics.jsonl (tests/e2e/test_resume_faults.py,
tests/ray/test_checkpoint_faults.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from launcher.cli import main
from safer_dist.checkpointing.checkpoint import Checkpointer, TrainerState
from safer_dist.config import load_config, save_config


class ShardWriter:
    world_size = 2

    def save_checkpoint(self, root: str, tag: str, client_state: dict, hash_files: bool = True) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        for r in range(2):
            (d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(2048))
            (d / f"rng_rank{r}.pt").write_bytes(os.urandom(256))
        (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))


@pytest.fixture
def existing_run(tmp_path, tiny_model_dir, demo_data_dir):
    """A run directory with a config, metrics and a complete checkpoint; the args that made it."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((demo_data_dir / "sft.jsonl").read_text().splitlines(keepends=True)[:16]))
    args = [
        f"run.output_dir={tmp_path / 'runs'}", "run.name=r", f"model.path={tiny_model_dir}", "model.init_preset=null",
        f"data.train={data}", "data.generate_demo=false", "train.global_batch_size=8", "train.micro_batch_size=4",
        "launch.device=cpu",
    ]
    cfg = load_config("configs/tiny.yaml", args)
    run = cfg.run.dir
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"stage": "sft", "step": 1, "loss": 5.0}\n{"stage": "sft", "step": 2, "loss": 4.0}\n')
    ckpt = Checkpointer(cfg.checkpoint, run / "checkpoints" / "sft").save(ShardWriter(), TrainerState(step=2), cfg)
    return {"args": args, "run": run, "data": data, "ckpt": ckpt, "model": tiny_model_dir}


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _flip_first_byte(f: Path) -> list[str]:
    data = f.read_bytes()
    f.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    return []


def _cut(f: Path, keep: int) -> list[str]:
    f.write_bytes(f.read_bytes()[:keep])
    return []


def _replace_line(data: Path, n: int, line: str) -> list[str]:
    lines = data.read_text().splitlines(keepends=True)
    lines[n - 1] = line + "\n"
    data.write_text("".join(lines))
    return []


def _empty(f: Path) -> list[str]:
    f.write_text("")
    return []


def _without_chat_template(model: Path, out: Path) -> Path:
    """A copy of ``model`` whose tokenizer has no chat template (as a base model's)."""
    shutil.copytree(model, out)
    (out / "chat_template.jinja").unlink()
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _base_model(r) -> list[str]:
    return [f"model.path={_without_chat_template(r['model'], r['run'].parent.parent / 'base')}"]


# name: (damage(existing_run) -> extra CLI args, expected message with {data} / {ckpt} / {base})
CASES = {
    "malformed_jsonl_line": (lambda r: _replace_line(r["data"], 2, '{"prompt": "How do I bake bread?",'),
                             "{data}:2: invalid JSON"),
    "missing_field": (lambda r: _replace_line(r["data"], 3, '{"prompt": "How do I bake bread?"}'),
                      "{data}:3: missing field 'response'"),
    "empty_dataset": (lambda r: _empty(r["data"]), "{data}: empty dataset (no records)"),
    "nonexistent_model_path": (lambda r: ["model.path=/nonexistent/model"],
                               "model.path=/nonexistent/model: no such directory"),
    "unknown_config_key": (lambda r: ["train.max_stepz=3"],
                           "unknown key 'train.max_stepz' (did you mean 'train.max_steps'?)"),
    "truncated_shard": (lambda r: _cut(r["ckpt"] / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 100),
                        "{ckpt}/zero_pp_rank_1_mp_rank_00_optim_states.pt: truncated or overwritten"),
    "corrupted_rng_file": (lambda r: _flip_first_byte(r["ckpt"] / "rng_rank0.pt"),
                           "{ckpt}/rng_rank0.pt: corrupted (sha256 differs from the manifest)"),
    "truncated_trainer_state": (lambda r: _cut(r["ckpt"] / "trainer_state.json", 10),
                                "{ckpt}/trainer_state.json: truncated or overwritten"),
    "corrupted_complete_manifest": (lambda r: _cut(r["ckpt"] / "COMPLETE", 20), "{ckpt}/COMPLETE: corrupted"),
    "resume_path_missing": (lambda r: ["resume=/nonexistent/step_9"],
                            "resume=/nonexistent/step_9: no such checkpoint directory"),
    "semantic_config_change": (lambda r: ["train.lr=0.01"], "the config differs in ways that change the run"),
    "model_without_chat_template": (_base_model, "model.path={base}: the tokenizer has no chat template"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly_and_leaves_the_run_untouched(case, existing_run, logs):
    prepare, expected = CASES[case]
    extra = prepare(existing_run)
    before = digest(existing_run["run"])
    rc = main(["sft", "configs/tiny.yaml", *existing_run["args"], *extra])
    assert rc == 2
    message = expected.format(data=existing_run["data"], ckpt=existing_run["ckpt"],
                              base=existing_run["run"].parent.parent / "base")
    assert any(message in m for m in logs), (message, logs[-3:])
    assert not any("started Ray" in m for m in logs)
    assert digest(existing_run["run"]) == before, "the run directory must be byte-for-byte untouched"


@pytest.mark.parametrize("case", ["missing_field", "nonexistent_model_path", "semantic_config_change"])
def test_run_refuses_bad_input_before_ray_starts(case, existing_run, logs):
    """`safer run` checks SFT's inputs before it starts Ray (it used to start Ray first, and with
    eval.base=false the error came only once the SFT phase began)."""
    prepare, expected = CASES[case]
    extra = prepare(existing_run)
    before = digest(existing_run["run"])
    assert main(["run", "configs/tiny.yaml", *existing_run["args"], *extra]) == 2
    message = expected.format(data=existing_run["data"], ckpt=existing_run["ckpt"])
    assert any(message in m for m in logs), (message, logs[-3:])
    assert not any("started Ray" in m for m in logs)
    assert digest(existing_run["run"]) == before


@pytest.mark.parametrize("command", ["erpo", "eval"])
def test_model_without_chat_template_is_refused_before_ray(command, existing_run, logs, tmp_path):
    base = _without_chat_template(existing_run["model"], tmp_path / "base-erpo")
    chosen = f"erpo.init_from={base}" if command == "erpo" else f"model.path={base}"
    rc = main([command, "configs/tiny.yaml", *existing_run["args"], chosen])
    assert rc == 2
    named = f"erpo.init_from={base}" if command == "erpo" else f"model {base}"
    assert any(f"{named}: the tokenizer has no chat template" in m and "chat_template.jinja" in m for m in logs), logs[-3:]
    assert not any("started Ray" in m for m in logs)


def test_missing_real_model_is_an_error_naming_init_model(tmp_path, logs):
    """configs/smollm2-135m.yaml never creates its model: a missing model.path fails (exit 2)
    with the command that makes it, and nothing is written there or in the run directory."""
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "smollm2-135m.yaml"
    shutil.copy("configs/smollm2-135m.yaml", config)
    rc = main(["run", str(config), "data.demo_num_sft=64"])
    assert rc == 2
    model = tmp_path / "models" / "smollm2-135m-instruct"
    assert any(f"model.path=../models/smollm2-135m-instruct ({model}): no such directory" in m
               and f"`safer init-model --preset smollm2-135m-instruct --out {model}`" in m for m in logs), logs[-3:]
    assert not model.exists() and not (tmp_path / "runs").exists()
