"""Checkpoint save, stop-save, verify and load times against size, on learner actors, CPU, fp32.

    .venv/bin/python bench/checkpoint_io.py [--presets tiny,bench-20m] [--learners 2] [--zero-stage 2] [--repeats 3]

For each model preset (``tiny`` ~3.9M parameters, ``bench-20m`` ~20M) builds the model and a
small demo data set in a temporary directory, starts Ray in-process, trains 2 steps, then times
(median of --repeats):

- save: every rank's DeepSpeed shards + RNG (``shards``), and the whole ``Checkpointer.save``
  (shards, trainer state, config, fsync + sha256 manifest, COMPLETE) with and without hashing;
- async save (``checkpoint.async_save``): the time the step loop is held (the state copied to
  host memory) and the time until COMPLETE;
- stop-save: a stop right after a background save began: the wait for the write in flight plus
  the stop's own synchronous save (the worst case a stop's grace period must cover);
- verify: ``verify_manifest`` (every file re-hashed on a thread pool);
- load: ``Checkpointer.restore`` (manifest verification + every rank's load) at the same world
  size, and at world size 1 from the N-learner checkpoint: the universal conversion (first
  resume only) and the universal load (first preset only).

The peer, in the same run: ``torch.save`` of one tensor of the checkpoint's size to one file,
flushed and fsynced (save), and ``hashlib.sha256`` of that file (verify). Prints each figure,
its ratio to the peer, and MB/s, per preset: the figures docs/checkpoints.md projects to the
8B and 70B recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peer_times(path: Path, num_bytes: int) -> tuple[float, float]:
    """(torch.save + fsync of ``num_bytes`` as one tensor to ``path``, sha256 of that file) in seconds."""
    import hashlib

    import torch

    blob = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"blob": blob}, f)
        f.flush()
        os.fsync(f.fileno())
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    hash_s = time.perf_counter() - t0
    path.unlink()
    return save_s, hash_s


def bench_preset(preset: str, args, work: Path, *, universal: bool) -> tuple[float, dict[str, list[float]], dict]:
    """(checkpoint size in bytes, timings by name, peer timings) for one model preset."""
    from safer_dist.checkpointing import checkpoint as ck
    from safer_dist.checkpointing.universal import UNIVERSAL_DIR, ensure_universal
    from safer_dist.cluster.group import LearnerGroup
    from safer_dist.config import load_config
    from safer_dist.data.demo import generate_demo
    from safer_dist.data.records import load_records
    from safer_dist.reasoning.rules import Rulebook
    from safer_dist.runtime import stop
    from safer_dist.train.models import init_model_from_corpus

    paths = generate_demo(work / "data", Rulebook.load("configs/rules/default.yaml"), seed=0, num_sft=400)
    recs = load_records(paths["sft"], "sft")
    init_model_from_corpus(preset, [r["prompt"] for r in recs] + [r["response"] for r in recs], work / preset)
    cfg = load_config("configs/tiny.yaml", [
        f"model.path={work / preset}", "model.init_preset=null", f"data.train={paths['sft']}",
        "data.generate_demo=false", f"run.output_dir={work / 'runs'}", "launch.device=cpu",
        f"learner.num_learners={args.learners}", f"learner.zero_stage={args.zero_stage}",
        "train.global_batch_size=16", "train.micro_batch_size=8" if args.learners <= 2 else "train.micro_batch_size=4",
    ])
    root = work / f"ckpts-{preset}"
    group = LearnerGroup(cfg)
    timings: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    def checkpointer(**kw):
        return ck.Checkpointer(dataclasses.replace(cfg.checkpoint, keep_last=100, **kw), root)

    path = None
    try:
        for step in range(2):
            group.sft_step(step)
        for i in range(args.repeats):
            timed("save: shards only (all ranks)", lambda: group.save_checkpoint(str(root), f"raw_{i}", {}))
            for hashed in (True, False):
                ckpt = checkpointer(hash_files=hashed)
                state = ck.TrainerState(step=1000 * (i + 1) + hashed)
                name = "save: Checkpointer.save, sha256 manifest" if hashed else "save: Checkpointer.save, sizes only"
                saved = timed(name, lambda: ckpt.save(group, state, cfg))
                path = saved if hashed else path  # verify and restore the sha256 one
            ckpt = checkpointer(async_save=True)
            t0 = time.perf_counter()
            timed("async save: step loop held (host copy)", lambda: ckpt.save(group, ck.TrainerState(step=1000 * (i + 1) + 2), cfg))
            ckpt.wait()
            timings.setdefault("async save: until COMPLETE", []).append(time.perf_counter() - t0)
            # a stop right after a background save began: wait for it, then the stop's own save
            ckpt.save(group, ck.TrainerState(step=1000 * (i + 1) + 3), cfg)
            stop._requested.set()  # what the SIGTERM/SIGUSR1 handler sets
            try:
                timed("stop-save: write in flight + synchronous save",
                      lambda: ckpt.save(group, ck.TrainerState(step=1000 * (i + 1) + 4), cfg))
            finally:
                stop.reset()
            ck._verified.clear()
            timed("verify: verify_manifest (sha256, thread pool)", lambda: ck.verify_manifest(path))
        size = sum(f.stat().st_size for f in path.iterdir())
        peers = [peer_times(work / "peer.pt", size) for _ in range(args.repeats)]
        peer = {"save": statistics.median(p[0] for p in peers), "verify": statistics.median(p[1] for p in peers)}
        for i in range(args.repeats):
            ck._verified.clear()
            resume = dataclasses.replace(cfg.checkpoint, resume=str(path))
            timed(f"load: Checkpointer.restore, {args.learners} learner(s) (verify + load)",
                  lambda: ck.Checkpointer(resume, root).restore(group, ck.TrainerState(), cfg))
    finally:
        group.shutdown()
    if universal:
        one = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, num_learners=1))
        group = LearnerGroup(one)
        try:
            for i in range(args.repeats):
                shutil.rmtree(path / UNIVERSAL_DIR, ignore_errors=True)
                timed(f"load: universal conversion {args.learners} -> 1 (first resume only)", lambda: ensure_universal(path))
                timed("load: universal load, 1 learner",
                      lambda: group.load_checkpoint(str(path), UNIVERSAL_DIR, universal=True))
        finally:
            group.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    return size, timings, peer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,bench-20m", help="comma-separated model presets (safer_dist/train/models.py)")
    ap.add_argument("--learners", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-universal", action="store_true", help="skip the universal conversion and load")
    args = ap.parse_args()

    from safer_dist.cluster.group import start_ray, stop_ray
    from safer_dist.config import load_config

    work = Path(tempfile.mkdtemp(prefix="safer-ckpt-bench-"))
    try:
        start_ray(load_config("configs/tiny.yaml", ["launch.device=cpu"]))
        results = []
        try:
            for i, preset in enumerate(args.presets.split(",")):
                results.append((preset, *bench_preset(preset, args, work, universal=i == 0 and not args.no_universal)))
        finally:
            stop_ray()
        for preset, size, timings, peer in results:
            print(f"\ncheckpoint of the {preset} preset, {args.learners} learner(s), ZeRO-{args.zero_stage}: "
                  f"{size / 1e6:.1f} MB")
            print(f"{'peer: torch.save + fsync of the same bytes':58s} median {peer['save']:7.3f} s  "
                  f"{size / 1e6 / peer['save']:7.0f} MB/s")
            print(f"{'peer: sha256 of that file':58s} median {peer['verify']:7.3f} s  {size / 1e6 / peer['verify']:7.0f} MB/s")
            for name, values in timings.items():
                m = statistics.median(values)
                against = peer["verify"] if name.startswith(("verify", "load")) else peer["save"]
                print(f"{name:58s} median {m:7.3f} s  {size / 1e6 / m:7.0f} MB/s  {m / against:5.2f}x peer  (n={len(values)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
