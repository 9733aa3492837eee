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
