"""The SFT controller: restore -> loop -> step -> maybe checkpoint / log -> export.

::

    driver (this module)                 LearnerGroup (N Ray actors, DeepSpeed ZeRO ranks)
      restore newest COMPLETE ckpt ───▶  load shards + RNG
      for step in [state.step, max):
        sft_step(step) ──────────────▶  each rank: its shard of global batch `step`,
                       ◀──────────────   packed micro-batches, backward, optimizer step
        every K steps: eval_loss ────▶  each rank: NLL of its validation shard (no update)
        metrics.jsonl (+ TensorBoard / W&B), progress
        every N steps / on stop ─────▶  save shards; driver writes COMPLETE last
      export hf/ ────────────────────▶  rank 0 writes safetensors + tokenizer
"""

from __future__ import annotations

import time
from pathlib import Path

from safer_dist.runtime import stop
from safer_dist.checkpointing.checkpoint import Checkpointer, TrainerState
from safer_dist.config import Config
from safer_dist.runtime.log import get_logger
from safer_dist.runtime.metrics import MetricsWriter, Progress
from safer_dist.train.throughput import Throughput, progress_fields

log = get_logger("sft")


def train_sft(cfg: Config, group, run_dir: Path) -> TrainerState:
    """Train until ``train.max_steps``; checkpoints under ``run_dir/checkpoints/sft``.

    Every ``train.eval_every_steps`` (and at the last step) the step's metrics row also
    carries ``valid_loss`` (:meth:`Learner.eval_loss`, after the step's update).
    """
    ckpt = Checkpointer(cfg.checkpoint, run_dir / "checkpoints" / "sft")
    state = TrainerState(stage="sft")
    metrics = MetricsWriter(run_dir / "metrics.jsonl", cfg.track, run_name=cfg.run.name, config=cfg.to_dict())
    if ckpt.restore(group, state, cfg) is not None:
        metrics.truncate_after("sft", state.step)
    else:
        metrics.truncate_after("sft", 0)
    progress = Progress(cfg.train.max_steps, initial=state.step, desc="sft")
    throughput = Throughput(group.infos)
    saved_at = state.step if state.step else -1
    every_eval = cfg.train.eval_every_steps
    try:
        while state.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            m = group.sft_step(state.step)
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens_seen += m["num_tokens"]
            state.elapsed_s += dt
            speed = throughput(m["num_tokens"], dt)
            last = state.step == cfg.train.max_steps
            valid = group.eval_loss() if every_eval and (state.step % every_eval == 0 or last) else None
            if state.step % cfg.train.log_every == 0 or last or valid:
                metrics.write({
                    "stage": "sft", "step": state.step, "loss": m["loss"], "lr": m["lr"],
                    "grad_norm": m["grad_norm"], "num_tokens": m["num_tokens"],
                    "num_loss_tokens": m["num_loss_tokens"], **speed,
                    "truncated": m["truncated"], "dropped": m["dropped"], "time_s": round(state.elapsed_s, 3),
                    **(valid or {}),
                })
            progress.update(1, loss=m["loss"], **progress_fields(speed), **({"valid": valid["valid_loss"]} if valid else {}))
            if stop.requested():
                ckpt.save(group, state, cfg)
                raise stop.stopped_at(state.step)
            if ckpt.due(state.step):
                ckpt.save(group, state, cfg)
                saved_at = state.step
    finally:
        progress.close()
        metrics.close()
    if saved_at != state.step:
        ckpt.save(group, state, cfg)
    return state
