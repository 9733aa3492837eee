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
    """Every record of the W&B run files (``run-<id>.wandb``) under ``run_dir``, in order.

    The file is wandb's record log: a 7-byte header (``:W&B``, magic, version), then LevelDB
    log blocks of 32 KiB, each chunk a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) and a piece of a serialized ``wandb_internal_pb2.Record``. wandb ships no
    reader for it in Python, and ``wandb.Api`` needs the server.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(Path(run_dir).rglob("run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", f"{path}: not a wandb run file"
        pos, block, pieces = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if kind == 0:  # block padding
                pos += left
                continue
            pieces += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pieces)
                out.append(record)
                pieces = b""
    return out


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


def shared_prefix_case(prefix_k, prefix_v, own_k, own_v, pmask, placed, width: int, steps):
    """The inputs of ``decode.shared_prefix_attention`` for a batch given part by part, and the
    per-row mask of the same batch with each row's prefix copied in front of its own tokens.

    ``prefix_k/v [G, Hkv, P, D]`` with ``pmask [G, P]``; ``own_k/v [B, Hkv, S, D]``, row ``b`` at
    ``placed[b] = (group, slot)``, its first ``steps[group]`` own tokens real. Returns the group
    buffers ``[G, Hkv, P + width * S, D]`` (token ``t`` of slot ``c`` at column ``P + t * width +
    c``; every other column holds finite garbage, which the mask must hide), the batch's
    ``slot [B]`` and ``step_mask [G, 1, width, U]``, and ``row_mask [B, P + S]``."""
    import torch

    g, hkv, p, d = prefix_k.shape
    s = own_k.shape[2]
    garbage = torch.Generator().manual_seed(1)
    keys = torch.randn(g, hkv, p + width * s, d, generator=garbage).to(prefix_k) * 1e3
    values = torch.randn(g, hkv, p + width * s, d, generator=garbage).to(prefix_v) * 1e3
    keys[:, :, :p], values[:, :, :p] = prefix_k, prefix_v
    keys[:, :, :p].masked_fill_(~pmask[:, None, :, None], 1e4)  # masked prefix columns too
    step_mask = torch.zeros(g, 1, width, p + width * s, dtype=torch.bool, device=pmask.device)
    step_mask[:, 0, :, :p] = pmask[:, None, :]
    for b, (grp, slot) in enumerate(placed):
        for t in range(steps[grp]):
            keys[grp, :, p + t * width + slot], values[grp, :, p + t * width + slot] = own_k[b, :, t], own_v[b, :, t]
            step_mask[grp, 0, slot, p + t * width + slot] = True
    groups = torch.tensor([grp for grp, _ in placed], device=pmask.device)
    own = torch.arange(s, device=pmask.device)[None, :] < torch.tensor(steps, device=pmask.device)[groups][:, None]
    slot = torch.tensor([grp * width + c for grp, c in placed], device=pmask.device)
    return keys, values, slot, step_mask, torch.cat([pmask[groups], own], dim=1)


def copied_prefix_attention(query, own_k, own_v, prefix_k, prefix_v, groups, row_mask, scaling):
    """SDPA per row over ``[its group's prefix, its own tokens]`` with the prefix copied into the
    row, in float32; ``[B, 1, H, D]``."""
    import torch
    import torch.nn.functional as F

    rep = query.shape[1] // own_k.shape[1]
    keys = torch.cat([prefix_k[groups], own_k], dim=2).repeat_interleave(rep, dim=1).float()
    values = torch.cat([prefix_v[groups], own_v], dim=2).repeat_interleave(rep, dim=1).float()
    out = F.scaled_dot_product_attention(query.float(), keys, values, attn_mask=row_mask[:, None, None, :],
                                         scale=scaling)
    return out.transpose(1, 2)
