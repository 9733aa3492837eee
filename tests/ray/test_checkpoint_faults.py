"""Checkpoints and faults on real Ray actors and DeepSpeed engines (CPU, tiny test model):
elastic resume 2 -> 1 -> 2 learners through universal checkpoints, time-based saves, export
from a checkpoint equal to the training engine, a learner killed with SIGKILL, and a rollout
worker killed mid-generation (restarted, its shard retried, same results)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from safer_dist.checkpointing.checkpoint import COMPLETE, Checkpointer, TrainerState
from safer_dist.config import ModelSection, RolloutSection, load_config, save_config
from safer_dist.checkpointing.export import consolidated_state_dict, export_checkpoint, lazy_state_dict, resolve_checkpoint
from safer_dist.cluster.group import LearnerFailure, LearnerGroup
from safer_dist.runtime.metrics import read_metrics
from safer_dist.train.sft import train_sft
from safer_dist.checkpointing.universal import DONE, UNIVERSAL_DIR
from tests.checks import overlong_counts


def make_cfg(tmp_path, model_dir, data_dir, num_learners, *overrides):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train={data_dir / 'sft.jsonl'}",
        f"run.output_dir={tmp_path}", "run.name=r", "train.warmup_steps=2", "train.lr=3e-3",
        "train.global_batch_size=8", "train.micro_batch_size=4", f"learner.num_learners={num_learners}",
        "learner.zero_stage=2", "launch.device=cpu", "data.max_seq_len=400", "data.overlong=drop", *overrides,
    ])


def assert_weights_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), k


def restore_and_check(cfg, group, root: Path) -> TrainerState:
    """Restore the newest checkpoint into ``group``; its weights equal the saved fp32 weights."""
    state = TrainerState(stage="sft")
    path = Checkpointer(cfg.checkpoint, root).restore(group, state, cfg)
    assert path is not None and (path / UNIVERSAL_DIR / DONE).is_file(), "another world size goes through universal"
    assert_weights_equal(group.full_state_dict(), consolidated_state_dict(path))
    return state


def test_elastic_resume_export_and_learner_death(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    run = tmp_path / "r"
    root = run / "checkpoints" / "sft"

    # 2 learners: 4 steps, checkpoint step_4; the export of that checkpoint is the engine's model.
    cfg2 = make_cfg(tmp_path, tiny_model_dir, demo_data_dir, 2, "train.max_steps=4", "checkpoint.every_steps=4")
    group = LearnerGroup(cfg2)
    try:
        train_sft(cfg2, group, run)
        ids = list(range(5, 45))
        engine_logits = group.logits(ids)
        engine_weights = group.full_state_dict()
    finally:
        group.shutdown()
    # Over-long examples (data.overlong=drop) are counted per step in metrics.jsonl.
    save_config(cfg2, run / "config.yaml")
    counted = [(m["truncated"], m["dropped"]) for m in read_metrics(run / "metrics.jsonl", "sft")]
    assert counted == overlong_counts(run, 4) and sum(d for _, d in counted) > 0

    out = export_checkpoint(run, tmp_path / "export")
    # the export's tensor-at-a-time ZeRO-1/2 reader equals DeepSpeed's consolidation exactly
    step4 = resolve_checkpoint(run, "sft")
    ours, theirs = lazy_state_dict(step4), consolidated_state_dict(step4)
    assert sorted(ours) == sorted(theirs)
    for name, get in ours.items():
        assert torch.equal(get(), theirs[name]), name
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exported = load_file(out / "model.safetensors")
    assert_weights_equal({k: exported[k] for k in exported}, {k: engine_weights[k] for k in exported})
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    # Same weights; the engine may use another attention kernel, hence float tolerance only.
    torch.testing.assert_close(hf_logits, engine_logits, rtol=0, atol=1e-5)

    # 2 -> 1 learner: universal conversion; identical weights; trains on, saving every step
    # through checkpoint.every_seconds.
    cfg1 = make_cfg(tmp_path, tiny_model_dir, demo_data_dir, 1, "train.max_steps=6", "checkpoint.every_steps=0",
                    "checkpoint.every_seconds=1e-6")
    group = LearnerGroup(cfg1)
    try:
        restore_and_check(cfg1, group, root)
        state = train_sft(cfg1, group, run)
    finally:
        group.shutdown()
    assert state.step == 6 and state.world_size == 1
    assert sorted(p.name for p in root.glob("step_*")) == ["step_5", "step_6"], "every_seconds saved each step"
    metrics = read_metrics(run / "metrics.jsonl", "sft")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(m["loss"]) for m in metrics)

    # 1 -> 2 learners: universal conversion again; identical weights; trains on.
    cfg2 = make_cfg(tmp_path, tiny_model_dir, demo_data_dir, 2, "train.max_steps=7", "checkpoint.every_steps=7")
    group = LearnerGroup(cfg2)
    try:
        restore_and_check(cfg2, group, root)
        state = train_sft(cfg2, group, run)
        assert state.step == 7 and (root / "step_7" / COMPLETE).is_file()
        assert math.isfinite(read_metrics(run / "metrics.jsonl", "sft")[-1]["loss"])

        # A learner that hangs (SIGSTOP): the call fails after learner.call_timeout_s.
        group.timeout_s = 3.0
        os.kill(group.pids[1], signal.SIGSTOP)
        with pytest.raises(LearnerFailure, match=r"learner rank\(s\) \[.*1\] did not finish sft_step within 3 s; "
                                                 r"last complete checkpoint: \S*step_7"):
            group.sft_step(7)
        # A learner killed with SIGKILL: the next call fails at once, naming it and the checkpoint.
        # (A failure found only by the 1800 s call timeout would outlive pytest's 900 s timeout.)
        group.timeout_s = 1800.0
        os.kill(group.pids[1], signal.SIGKILL)
        with pytest.raises(LearnerFailure, match=rf"learner rank 1 .*pid {group.pids[1]}.*last complete checkpoint: \S*step_7"):
            group.sft_step(7)
    finally:
        group.shutdown()


def die_mid_generation(marker: str, batch: int, step: int):
    """A function for ``actor.__ray_call__`` that arms a rollout worker to SIGKILL its own
    process at forward pass ``step`` (1 = prefill) of the ``batch``-th batch it generates (a
    batch starts at a prefill: a forward of more than one position per row), after writing
    "<pid> <batch> <step>" to ``marker``. The kill lands there on every run, however busy the
    machine; Ray's restart loads a fresh, unarmed worker."""

    def arm(worker) -> int:
        model = worker.model
        forward = model.forward
        at = {"batch": 0, "step": 0}

        def dying_forward(*args, **kwargs):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            if ids.shape[-1] > 1:  # a prefill: the next batch begins
                at["batch"], at["step"] = at["batch"] + 1, 0
            at["step"] += 1
            if (at["batch"], at["step"]) == (batch, step):
                Path(marker).write_text(f"{os.getpid()} {batch} {step}")
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(*args, **kwargs)

        # An instance attribute: the module's __call__ runs self.forward.
        model.forward = dying_forward
        return os.getpid()

    return arm


def test_rollout_worker_killed_mid_generation_is_restarted_and_retried(ray_local, tiny_model_dir, tmp_path):
    from safer_dist.cluster.rollout import RolloutGroup

    group = RolloutGroup(ModelSection(path=str(tiny_model_dir)), RolloutSection(num_workers=2, max_restarts=2), device="cpu")
    try:
        prompts = [f"How do I bake bread number {i}?" for i in range(16)]
        kwargs = dict(max_new_tokens=160, temperature=1.0, seed=7, batch_size=1)
        keep = lambda rows: [(r["text"], r["num_tokens"]) for r in rows]  # noqa: E731 - latency differs
        expected = keep(group.generate(prompts, **kwargs))

        # Worker 1 dies at the 3rd forward pass of its 2nd prompt (after prefill and one decoding
        # step): one prompt of its shard done, one half-generated, six to go.
        marker = tmp_path / "killed"
        pid = ray_local.get(group.workers[1].__ray_call__.remote(die_mid_generation(str(marker), batch=2, step=3)))
        rows = group.generate(prompts, **kwargs)
        assert marker.read_text() == f"{pid} 2 3", "worker 1 was killed at the armed point"
        assert group.num_retries == 1, "the killed worker's shard was retried once"
        assert keep(rows) == expected, "nothing lost, nothing duplicated, same samples"
        new_pid = ray_local.get(group.workers[1].__ray_call__.remote(lambda self: os.getpid()))
        assert new_pid != pid, "Ray restarted the worker in a new process"
    finally:
        group.shutdown()
