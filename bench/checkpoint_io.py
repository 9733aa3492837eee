"""Checkpoint save and load times of the embedded default (the `tiny` preset, ~3.9M
parameters) on learner actors, CPU, fp32.

    .venv/bin/python bench/checkpoint_io.py [--learners 2] [--zero-stage 2] [--repeats 3]

Builds the tiny model and a small demo data set in a temporary directory, starts Ray
in-process, trains 2 steps, then times (median of --repeats):

- save: every rank's DeepSpeed shards + RNG (``shards``), and the whole ``Checkpointer.save``
  (shards, trainer state, config, fsync + sha256 manifest, COMPLETE) with and without hashing;
- load: ``Checkpointer.restore`` (manifest verification + every rank's load) at the same world
  size, and at world size 1 from the N-learner checkpoint: the universal conversion (first
  resume only) and the universal load.
Prints one line per figure and the checkpoint size.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--learners", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from safer_dist.checkpointing import checkpoint as ck
    from safer_dist.config import load_config
    from safer_dist.data.demo import generate_demo
    from safer_dist.data.records import load_records
    from safer_dist.cluster.group import LearnerGroup, start_ray, stop_ray
    from safer_dist.train.models import init_model_from_corpus
    from safer_dist.reasoning.rules import Rulebook
    from safer_dist.checkpointing.universal import UNIVERSAL_DIR, ensure_universal

    work = Path(tempfile.mkdtemp(prefix="safer-ckpt-bench-"))
    try:
        paths = generate_demo(work / "data", Rulebook.load("configs/rules/default.yaml"), seed=0, num_sft=400)
        recs = load_records(paths["sft"], "sft")
        init_model_from_corpus("tiny", [r["prompt"] for r in recs] + [r["response"] for r in recs], work / "model")
        cfg = load_config("configs/tiny.yaml", [
            f"model.path={work / 'model'}", "model.init_preset=null", f"data.train={paths['sft']}",
            "data.generate_demo=false", f"run.output_dir={work / 'runs'}", "launch.device=cpu",
            f"learner.num_learners={args.learners}", f"learner.zero_stage={args.zero_stage}",
            "train.global_batch_size=16", "train.micro_batch_size=8" if args.learners <= 2 else "train.micro_batch_size=4",
        ])
        start_ray(cfg)
        root = work / "ckpts"
        group = LearnerGroup(cfg)
        timings: dict[str, list[float]] = {}

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            timings.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        try:
            for step in range(2):
                group.sft_step(step)
            for i in range(args.repeats):
                timed("save: shards only (all ranks)", lambda: group.save_checkpoint(str(root), f"raw_{i}", {}))
                for hashed in (True, False):
                    ckpt = ck.Checkpointer(dataclasses.replace(cfg.checkpoint, hash_files=hashed, keep_last=100), root)
                    state = ck.TrainerState(step=100 * (i + 1) + hashed)
                    name = "save: Checkpointer.save, sha256 manifest" if hashed else "save: Checkpointer.save, sizes only"
                    path = timed(name, lambda: ckpt.save(group, state, cfg))
            size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
            for i in range(args.repeats):
                ck._verified.clear()
                resume = dataclasses.replace(cfg.checkpoint, resume=str(path))
                timed(f"load: Checkpointer.restore, {args.learners} learner(s) (verify + load)",
                      lambda: ck.Checkpointer(resume, root).restore(group, ck.TrainerState(), cfg))
        finally:
            group.shutdown()

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
            stop_ray()
        print(f"\ncheckpoint of the tiny preset, {args.learners} learner(s), ZeRO-{args.zero_stage}: {size_mb:.1f} MB")
        for name, values in timings.items():
            print(f"{name:58s} median {statistics.median(values):6.3f} s  (n={len(values)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
