"""The checkpoint file protocol (no DeepSpeed here: a stand-in group writes shard files), the
graceful-stop handler, and safe loading. The real engines are in tests/ray and tests/e2e."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from safer_dist.runtime import stop
from safer_dist.checkpointing.async_save import marker_dir
from safer_dist.checkpointing.checkpoint import (
    COMPLETE, CheckpointError, Checkpointer, TrainerState, file_owner, rank_digests, read_manifest, verify_manifest,
    write_manifest,
)
from safer_dist.checkpointing.export import consolidated_state_dict
from safer_dist.checkpointing.safe_load import weights_only_torch_load
from safer_dist.config import load_config
from safer_dist.train.models import load_model, load_tokenizer


class ShardWriter:
    """Stands in for LearnerGroup's checkpoint calls: writes one shard file per rank."""

    def __init__(self, world_size: int = 2):
        self.world_size = world_size

    def load_checkpoint(self, root: str, tag: str, **kwargs) -> dict:
        assert (Path(root) / tag).is_dir()
        return {}

    def save_checkpoint(self, root: str, tag: str, client_state: dict, hash_files: bool = True) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        for r in range(self.world_size):
            (d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
            (d / f"rng_rank{r}.pt").write_bytes(os.urandom(512))
        (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(8192))


@pytest.fixture
def logs():
    """Records logged under the 'safer' logger (it does not propagate to the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("safer")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def cfg_with(*overrides):
    return load_config(None, ["checkpoint.keep_last=2", *overrides])


def save(ckpt: Checkpointer, step: int, cfg, world_size: int = 2) -> Path:
    return ckpt.save(ShardWriter(world_size), TrainerState(step=step), cfg)


def test_every_steps_and_every_seconds():
    now = [100.0]
    cfg = cfg_with("checkpoint.every_steps=5", "checkpoint.every_seconds=30")
    ckpt = Checkpointer(cfg.checkpoint, Path("/nonexistent"), clock=lambda: now[0])
    assert ckpt.due(5) and ckpt.due(10) and not ckpt.due(3)
    now[0] += 29.9
    assert not ckpt.due(3)
    now[0] += 0.1  # 30 s after the Checkpointer started (or last saved)
    assert ckpt.due(3)
    off = Checkpointer(cfg_with().checkpoint, Path("/nonexistent"), clock=lambda: now[0] + 1e9)
    assert not off.due(3), "every_seconds=0 disables time-based saves"


def test_every_seconds_counts_from_the_last_save(tmp_path):
    now = [0.0]
    cfg = cfg_with("checkpoint.every_seconds=10")
    ckpt = Checkpointer(cfg.checkpoint, tmp_path, clock=lambda: now[0])
    now[0] = 10.0
    assert ckpt.due(1)
    save(ckpt, 1, cfg)
    assert not ckpt.due(2)
    now[0] = 20.0
    assert ckpt.due(2)


def test_manifest_records_every_file_and_world_size(tmp_path):
    cfg = cfg_with()
    path = save(Checkpointer(cfg.checkpoint, tmp_path), 3, cfg)
    manifest = read_manifest(path)
    assert manifest["step"] == 3 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {COMPLETE}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())
    assert json.loads((path / "trainer_state.json").read_text())["world_size"] == 2
    verify_manifest(path)


def test_file_owner():
    assert file_owner("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert file_owner("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert file_owner("rng_rank5.pt") == 5
    # shared files: DeepSpeed's model states (mp rank, not data-parallel rank), ours
    assert file_owner("mp_rank_00_model_states.pt") == 0 and file_owner("trainer_state.json") == 0


def test_rank_digests_combine_into_the_driver_manifest(tmp_path):
    """What the ranks hash in parallel (each its own files) plus what the driver hashes gives the
    manifest the driver alone would write, and every file is hashed exactly once."""
    a, b = tmp_path / "a" / "step_1", tmp_path / "b"
    ShardWriter(world_size=3).save_checkpoint(str(tmp_path / "a"), "step_1", {})
    (a / "trainer_state.json").write_text("{}")
    shutil.copytree(a, b)
    per_rank = [rank_digests(a, r, True) for r in range(3)]
    assert set(per_rank[1]) == {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt"}
    assert "mp_rank_00_model_states.pt" in per_rank[0] and "trainer_state.json" in per_rank[0]
    merged = {k: v for d in per_rank for k, v in d.items()}
    assert sum(len(d) for d in per_rank) == len(merged)  # disjoint
    combined = write_manifest(a, step=1, world_size=3, hash_files=True, digests=merged)["files"]
    alone = write_manifest(b, step=1, world_size=3, hash_files=True)["files"]
    assert combined == alone and len(alone) == 3 * 2 + 2
    verify_manifest(a)
    # a flipped byte is caught as before
    f = a / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:])
    os.utime(a / COMPLETE)  # a new verdict, not the cached one
    with pytest.raises(CheckpointError, match="zero_pp_rank_2.*corrupted"):
        verify_manifest(a)


def test_a_file_changed_after_its_rank_reported_it_is_refused(tmp_path):
    ShardWriter().save_checkpoint(str(tmp_path), "step_1", {})
    path = tmp_path / "step_1"
    digests = rank_digests(path, 1, True)
    (path / "rng_rank1.pt").write_bytes(b"shorter")
    with pytest.raises(CheckpointError, match="rng_rank1.pt: changed after its rank reported it"):
        write_manifest(path, step=1, world_size=2, hash_files=True, digests=digests)
    assert not (path / COMPLETE).exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or overwritten"),
    ("flip", "corrupted (sha256 differs"),
    ("delete", "missing from checkpoint"),
])
@pytest.mark.parametrize("name", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.pt", "trainer_state.json"])
def test_damaged_file_fails_resume_naming_it(tmp_path, name, damage, message):
    cfg = cfg_with()
    ckpt = Checkpointer(cfg.checkpoint, tmp_path)
    path = save(ckpt, 3, cfg)
    f = path / name
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: ") + ".*" + re.escape(message)):
        ckpt.check_resume(cfg)


def test_corrupted_manifest_fails_naming_complete(tmp_path):
    cfg = cfg_with()
    ckpt = Checkpointer(cfg.checkpoint, tmp_path)
    path = save(ckpt, 3, cfg)
    (path / COMPLETE).write_text('{"files": {"x": ')
    with pytest.raises(CheckpointError, match=re.escape(f"{path / COMPLETE}: corrupted")):
        ckpt.check_resume(cfg)


def test_marker_without_manifest_is_still_resumable(tmp_path, logs):
    cfg = cfg_with()
    ckpt = Checkpointer(cfg.checkpoint, tmp_path)
    path = save(ckpt, 3, cfg)
    (path / COMPLETE).write_text("1795437568.825\n")  # written before manifests existed
    assert ckpt.check_resume(cfg) == path
    assert any("cannot be verified" in r.getMessage() for r in logs)


def test_resume_auto_skips_incomplete_newer_and_keeps_it(tmp_path, logs):
    cfg = cfg_with()
    ckpt = Checkpointer(cfg.checkpoint, tmp_path)
    save(ckpt, 2, cfg)
    save(ckpt, 4, cfg)
    crashed = tmp_path / "step_6"
    ShardWriter().save_checkpoint(str(tmp_path), "step_6", {})  # shards written, no COMPLETE
    assert ckpt.check_resume(cfg) == tmp_path / "step_4"
    assert any("skipping incomplete checkpoint" in r.getMessage() and "step_6" in r.getMessage() for r in logs)
    # Rotation never touches it; saving step 6 again moves it aside instead of deleting it.
    files = sorted(p.name for p in crashed.iterdir())
    save(ckpt, 5, cfg)
    assert sorted(p.name for p in crashed.iterdir()) == files
    save(ckpt, 6, cfg)
    (aside,) = tmp_path.glob("step_6.incomplete-*")
    assert sorted(p.name for p in aside.iterdir()) == files
    assert sorted(p.name for p in tmp_path.glob("step_*") if p.name.startswith("step_") and "." not in p.name) == [
        "step_5", "step_6"]


@pytest.mark.parametrize("resume_from", [None, 2])
def test_fresh_start_or_older_path_sets_later_checkpoints_aside(tmp_path, resume_from):
    """resume=none / resume=PATH to an older step: the run's later complete checkpoints are from
    another timeline. They are kept (renamed), never resumed from or rotated against."""
    cfg = cfg_with("checkpoint.keep_last=3")
    for step in (2, 4, 6):
        save(Checkpointer(cfg.checkpoint, tmp_path), step, cfg)
    run = cfg_with("checkpoint.keep_last=3", "resume=none" if resume_from is None else f"resume={tmp_path / 'step_2'}")
    ckpt = Checkpointer(run.checkpoint, tmp_path)
    state = TrainerState()
    ckpt.restore(ShardWriter(), state, run)
    assert state.step == (resume_from or 0)
    kept = {"step_2"} if resume_from else set()
    assert {p.name for p in tmp_path.glob("step_*") if "." not in p.name} == kept
    assert len(list(tmp_path.glob("step_*.old-*"))) == 3 - len(kept)
    save(ckpt, 4, run)
    save(ckpt, 6, run)
    assert Checkpointer(cfg.checkpoint, tmp_path).check_resume(cfg) == tmp_path / "step_6"
    assert read_manifest(tmp_path / "step_6")["completed_at"] > 0
    assert len(list(tmp_path.glob("step_*.old-*"))) == 3 - len(kept), "rotation leaves them alone"


def test_resume_modes(tmp_path):
    cfg = cfg_with()
    ckpt = Checkpointer(cfg.checkpoint, tmp_path / "ck")
    assert ckpt.check_resume(cfg) is None, "auto with no checkpoint: a fresh start"
    path = save(ckpt, 2, cfg)
    none = cfg_with("resume=none")
    assert Checkpointer(none.checkpoint, tmp_path / "ck").check_resume(none) is None
    explicit = cfg_with(f"resume={path}")
    assert Checkpointer(explicit.checkpoint, tmp_path / "other").check_resume(explicit) == path
    missing = cfg_with(f"resume={tmp_path / 'nope'}")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        Checkpointer(missing.checkpoint, tmp_path).check_resume(missing)
    (path / COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        Checkpointer(explicit.checkpoint, tmp_path).check_resume(explicit)


def test_semantic_change_refused_harmless_change_allowed(tmp_path):
    cfg = cfg_with("train.lr=1e-3", "run.seed=1")
    ckpt = Checkpointer(cfg.checkpoint, tmp_path)
    save(ckpt, 2, cfg)
    changed = cfg_with("train.lr=2e-3", "run.seed=2", "train.log_every=5", "checkpoint.every_steps=7")
    with pytest.raises(CheckpointError) as e:
        Checkpointer(changed.checkpoint, tmp_path).check_resume(changed)
    assert "train.lr: 0.001 -> 0.002" in str(e.value) and "run.seed: 1 -> 2" in str(e.value)
    harmless = cfg_with("train.lr=1e-3", "run.seed=1", "train.log_every=5", "checkpoint.every_steps=7",
                        "learner.num_learners=1", "train.micro_batch_size=4")
    assert Checkpointer(harmless.checkpoint, tmp_path).check_resume(harmless) == tmp_path / "step_2"


# -- graceful stop --------------------------------------------------------------------------


@pytest.fixture
def stop_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    stop.reset()
    yield
    stop.reset()
    stop._grace_s = None
    for s, h in saved.items():
        signal.signal(s, h)


def test_sigusr1_requests_a_stop(stop_handlers):
    stop.install(grace_s=3600)
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requested()


def test_sigint_takes_the_graceful_path_and_exits_130(stop_handlers):
    stop.install(grace_s=3600)
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the loop finishes its step
    assert stop.requested()
    e = stop.stopped_at(7)
    assert (e.exit_code, str(e)) == (130, "stopped at step 7; run the same command to resume")


def test_sigterm_stop_exits_75(stop_handlers):
    stop.install(grace_s=3600)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested() and stop.stopped_at(3).exit_code == 75


def test_sigterm_handler_reclaimed_after_ray_replaces_it(stop_handlers):
    stop.install(grace_s=3600)
    # What ray.init does in the driver (ray/_private/worker.py): SIGTERM -> sys.exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    stop.reinstall()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested()


# -- safe loading -----------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("code ran",))


def test_deepspeed_style_loads_are_weights_only(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, evil)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "step": 3, "name": "x"}, good)
    with weights_only_torch_load():
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            torch.load(evil, map_location="cpu", weights_only=False)  # as DeepSpeed calls it
        assert torch.load(good, weights_only=False)["step"] == 3
    assert not marker.exists()
    # Outside the block torch.load is PyTorch's own again.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_export_consolidation_refuses_pickled_code(tmp_path):
    marker = tmp_path / "marker"
    step = tmp_path / "step_1"
    step.mkdir()
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        torch.save({"optimizer_state_dict": _Payload(str(marker)), "module": _Payload(str(marker))}, step / name)
    with pytest.raises(Exception, match="Weights only load failed"):
        consolidated_state_dict(step)
    assert not marker.exists()


def test_remote_code_runs_only_when_configured(tmp_path, tiny_model_dir, monkeypatch):
    # transformers copies trusted repository code here; keep it out of ~/.cache.
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "marker"
    (model_dir / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    assert load_config(None, []).model.trust_remote_code is False
    load_tokenizer(model_dir)
    assert type(load_model(model_dir, dtype=torch.float32)).__name__ == "LlamaForCausalLM"
    assert not marker.exists(), "repository code must not run unless model.trust_remote_code is set"
    assert type(load_model(model_dir, dtype=torch.float32, trust_remote_code=True)).__name__ == "CustomModel"
    assert marker.exists()


# -- background writes (checkpoint.async_save) ----------------------------------------------------


class BackgroundShardWriter(ShardWriter):
    """Stands in for LearnerGroup's background save: each rank's files are written, and reported
    under async_save.marker_dir, only when the test releases that rank (or its report is an error)."""

    def __init__(self, world_size: int = 2, fail_rank: int | None = None):
        super().__init__(world_size)
        self.release = [threading.Event() for _ in range(world_size)]
        self.fail_rank = fail_rank
        self.calls: list[bool] = []

    def save_checkpoint(self, root: str, tag: str, client_state: dict, hash_files: bool = True,
                        background: bool = False):
        from safer_dist.checkpointing.async_save import marker_dir
        from safer_dist.checkpointing.checkpoint import rank_digests
        from safer_dist.runtime.io import atomic_write_json

        self.calls.append(background)
        if not background:
            return super().save_checkpoint(root, tag, client_state, hash_files)
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)

        def write(r: int) -> None:
            self.release[r].wait()
            (d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
            if r == 0:
                (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(8192))
            report = {"error": "OSError: disk full"} if r == self.fail_rank else {"digests": rank_digests(d, r, hash_files)}
            atomic_write_json(marker_dir(root, tag) / f"rank{r}.json", report)

        for r in range(self.world_size):
            threading.Thread(target=write, args=(r,), daemon=True).start()
        return {}


def test_background_save_completes_only_when_every_rank_reported(tmp_path, stop_handlers):
    """save() returns before any shard is written; COMPLETE appears only after both ranks
    reported, with their digests in the manifest; the next save waits for the write in flight;
    a rank's failure is raised by wait() and leaves the step incomplete; under a stop request
    the save is synchronous."""
    cfg = cfg_with("checkpoint.async_save=true")
    ckpt = Checkpointer(cfg.checkpoint, tmp_path)
    group = BackgroundShardWriter()
    path = ckpt.save(group, TrainerState(step=4), cfg)
    assert (path / "trainer_state.json").is_file() and not (path / COMPLETE).exists()
    assert not (path / "mp_rank_00_model_states.pt").exists()
    group.release[1].set()
    wait_for_rank1 = marker_dir(tmp_path, "step_4") / "rank1.json"
    poll(wait_for_rank1.is_file)
    assert not (path / COMPLETE).exists()  # rank 0 has not reported
    group.release[0].set()
    ckpt.wait()
    manifest = json.loads((path / COMPLETE).read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in path.iterdir() if p.name != COMPLETE)
    assert not marker_dir(tmp_path, "step_4").exists()
    verify_manifest(path)

    # a failing rank: the error surfaces at the next wait (here: the next save's), no COMPLETE
    failing = BackgroundShardWriter(fail_rank=1)
    for e in failing.release:
        e.set()
    bad = ckpt.save(failing, TrainerState(step=8), cfg)
    with pytest.raises(CheckpointError, match=r"step_8: learner rank 1 failed to write its files: OSError: disk full"):
        ckpt.save(failing, TrainerState(step=12), cfg)
    assert not (bad / COMPLETE).exists()

    # a stop: synchronous
    stop.install(grace_s=3600)
    os.kill(os.getpid(), signal.SIGTERM)
    sync = BackgroundShardWriter()
    path = ckpt.save(sync, TrainerState(step=16), cfg)
    assert sync.calls == [False] and (path / COMPLETE).is_file()


def poll(predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        threading.Event().wait(0.01)
