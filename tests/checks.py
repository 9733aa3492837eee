"""Expected values computed from the inputs, shared by tests of several layers."""

from __future__ import annotations

from pathlib import Path


def overlong_counts(run: Path, steps: int) -> list[tuple[int, int]]:
    """(truncated, dropped) examples of each step's global batch, from the data itself."""
    from safer_dist.config import load_config
    from safer_dist.data.records import load_records
    from safer_dist.train.models import load_tokenizer
    from safer_dist.train.sft_data import SFTData

    cfg = load_config(run / "config.yaml")
    d = cfg.data
    data = SFTData(load_records(d.train, "sft"), load_tokenizer(cfg.model.path), seed=cfg.run.seed,
                   max_seq_len=d.max_seq_len, overlong=d.overlong, segment_dropout=d.segment_dropout)
    out = []
    for step in range(steps):
        encoded = [data.encode(epoch, i) for epoch, i in data.global_batch(step, cfg.train.global_batch_size)]
        out.append((sum(e is not None and e.truncated for e in encoded), sum(e is None for e in encoded)))
    return out


def wandb_records(run_dir: Path) -> list:
    """Every record of the W&B run files (``run-<id>.wandb``) under ``run_dir``, in order of path."""
    from safer_dist.runtime.tracking import wandb_records as file_records

    return [r for path in sorted(Path(run_dir).rglob("run-*.wandb")) for r in file_records(path)]


def wandb_history(run_dir: Path) -> list[dict]:
    """The rows logged with ``run.log`` (values decoded from JSON) in every W&B run file under ``run_dir``."""
    import json

    # A key with "/" is stored split into nested_key.
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall_time)] from the event files in ``log_dir``, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
