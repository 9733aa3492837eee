"""Background checkpoint writes (checkpoint.async_save) on real 2-rank gloo groups and DeepSpeed (CPU)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from tests.dist.launch import run_ranks
from tests.dist.test_sft_dist import make_cfg


def _same(a, b, where="") -> list[str]:
    """Where two loaded checkpoint objects differ (tensors bit for bit, containers element-wise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in _same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    if type(a) is type(b) and hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:  # e.g. the loss scaler
        return _same(vars(a), vars(b), where)
    return [] if a == b else [where]


def _save_both_then_train(learner, root, ids):
    """Save synchronously, then in the background and train a step at once (the write may still
    be in flight); wait; then load the background checkpoint back."""
    from safer_dist.checkpointing.async_save import WRITER, marker_dir
    from safer_dist.checkpointing.checkpoint import rank_digests
    from safer_dist.checkpointing.safe_load import weights_only_torch_load

    before = learner.logits(ids).tolist()
    learner.sft_step(0)  # an optimizer state to save
    saved = learner.logits(ids).tolist()
    learner.save_checkpoint(str(root / "sync"), "step_1", {"trainer_state": {"step": 1}})
    assert learner.save_checkpoint(str(root / "async"), "step_1", {"trainer_state": {"step": 1}}, background=True) == {}
    learner.sft_step(1)  # updates the weights the background write copied
    trained = learner.logits(ids).tolist()
    WRITER.join()
    report = json.loads((marker_dir(root / "async", "step_1") / f"rank{learner.rank}.json").read_text())
    mine = rank_digests(root / "async" / "step_1", learner.rank, True)
    learner.load_checkpoint(str(root / "async"), "step_1")
    loaded = learner.logits(ids).tolist()
    differ = {}
    if learner.rank == 0:
        with weights_only_torch_load():
            for f in sorted((root / "sync" / "step_1").iterdir()):
                a = torch.load(f, map_location="cpu", weights_only=True)
                b = torch.load(root / "async" / "step_1" / f.name, map_location="cpu", weights_only=True)
                differ[f.name] = _same(a, b)
    return {"before": before, "saved": saved, "trained": trained, "loaded": loaded, "differ": differ,
            "report": report, "mine": mine,
            "files": sorted(p.name for p in (root / "async" / "step_1").iterdir()),
            "sync_files": sorted(p.name for p in (root / "sync" / "step_1").iterdir())}


@pytest.mark.parametrize("stage", [2, 3])
def test_background_write_equals_the_synchronous_one(tiny_model_dir, demo_data_dir, tmp_path, stage):
    """A background save holds the state of the moment it was called, though the next step
    updated the weights before the write finished: its files load to the same objects as a
    synchronous save's (tensors bit for bit), loading it restores the saved logits, and each
    rank's report holds the size and sha256 of exactly its own files, as its fsynced digests."""
    cfg = make_cfg(tiny_model_dir, demo_data_dir, "learner.num_learners=2", f"learner.zero_stage={stage}",
                   "train.global_batch_size=8", "train.micro_batch_size=4")
    results = run_ranks(cfg, functools.partial(_save_both_then_train, root=tmp_path, ids=[5, 17, 42, 99, 3]))
    for rank, r in enumerate(results):
        assert r["files"] == r["sync_files"], (r["files"], r["sync_files"])
        assert r["trained"] != r["saved"] != r["before"]  # each step moved the weights
        assert r["loaded"] == r["saved"], rank
        assert r["report"] == {"digests": r["mine"]} and r["mine"], rank
        assert all(n.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_", "rng_rank", "mp_rank_"))
                   for n in r["mine"]), r["mine"]
    differ = results[0]["differ"]
    assert differ and all(d == [] for d in differ.values()), differ
