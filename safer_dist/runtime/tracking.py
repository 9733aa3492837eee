"""Experiment-tracking backends behind :class:`safer_dist.runtime.metrics.MetricsWriter`.

Each backend receives every row of ``metrics.jsonl`` as it is written: the row's stage, its
step, its wall-clock ``time`` (unix seconds) and its scalars (nested mappings such as
``pairs_by_reason`` are flattened to ``pairs_by_reason/safety``).

- ``track.tensorboard``: TensorBoard event files under ``<run>/tensorboard/<stage>/``, one
  TensorBoard run per stage, so SFT and ERPO curves of the same name overlay. A resumed
  run appends; TensorBoard itself drops the events of steps after the resumed checkpoint
  that an earlier process wrote (it discards out-of-order steps).
- ``track.wandb``: one Weights & Biases run per run directory (its id is kept in
  ``<run>/wandb_run_id``, so a resumed or later stage continues the same W&B run); each
  stage logs against its own step axis ``<stage>/step``. ``WANDB_MODE=offline`` works
  without a network; files go to ``$WANDB_DIR`` or else the run directory. Closing the
  backend waits until the wandb service has written the run's record file
  (``run-<id>.wandb``) through its exit record: ``run.finish()`` returns before that, so a
  ``wandb sync`` or a reader of the file right after it could miss the run's last records.

Both packages are optional (``pip install 'safer[track]'``); the config fails with a
ConfigError naming the key when an enabled backend is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Any

from safer_dist.runtime import stop
from safer_dist.runtime.io import atomic_write_text
from safer_dist.runtime.log import get_logger

log = get_logger("tracking")

# Row keys that are the axes of a row, not its values.
AXES = ("stage", "step", "time")
# The package each backend needs (import name, pip name).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def missing_package(backend: str) -> str | None:
    """The pip name of ``backend``'s package when it is not installed, else None."""
    module, pip_name = PACKAGES[backend]
    return None if importlib.util.find_spec(module) is not None else pip_name


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a metrics row, nested mappings flattened with ``/``; booleans
    and strings are left out, and so are the axes (stage, step, time)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in AXES:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class TensorBoardBackend:
    """Event files under ``log_dir/<stage>/`` (one ``SummaryWriter`` per stage)."""

    def __init__(self, log_dir: Path):
        # torch's writer needs the tensorboard package (the event-file format lives there).
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writers: dict[str, Any] = {}

    def log(self, stage: str, step: int, wall_time: float, values: dict[str, float]) -> None:
        if stage not in self.writers:
            self.writers[stage] = self._writer_cls(log_dir=str(self.log_dir / stage))
        w = self.writers[stage]
        for key, value in values.items():
            w.add_scalar(key, value, global_step=step, walltime=wall_time)
        w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


# How long closing a W&B backend waits for the wandb service to write the run's record file.
WANDB_FLUSH_TIMEOUT_S = 120.0
_WANDB_BLOCK = 32768  # the record file's LevelDB log block size


def wandb_records(path: Path) -> list:
    """The complete records of a W&B run file (``run-<id>.wandb``), in order; a record the
    writer has not finished (the file cut inside it) is left out.

    The file is wandb's record log: a 7-byte header (``:W&B``, magic, version), then LevelDB
    log blocks of 32 KiB, each chunk a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) and a piece of a serialized ``wandb_internal_pb2.Record``. wandb ships no
    reader for it in Python, and ``wandb.Api`` needs the server.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) >= 4 and data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    out = []
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # a chunk not written out yet
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            out.append(record)
            pieces = b""
    return out


def wait_for_wandb_run_file(path: Path, timeout_s: float) -> None:
    """Return once the W&B run file ``path`` holds its exit record (the last one the wandb
    service writes); raise a RuntimeError naming the file after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    size = None  # the file's size when last read
    while True:
        now = Path(path).stat().st_size if Path(path).is_file() else None
        if now is not None and now != size:
            size = now
            records = wandb_records(path)
            if records and records[-1].WhichOneof("record_type") == "exit":
                return
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"W&B run file {path} has no exit record {timeout_s:g}s after run.finish(): the wandb "
                f"service did not write the run out, so `wandb sync` would miss its last records. "
                f"See {Path(path).parent / 'logs' / 'debug-internal.log'}.")
        time.sleep(0.05)


class WandbBackend:
    """A W&B run: ``project``, ``entity``, ``name`` (default: the run's name), ``tags``."""

    def __init__(self, run_dir: Path, *, project: str, entity: str | None, name: str, tags: list[str],
                 config: dict[str, Any] | None):
        import wandb

        id_file = Path(run_dir) / "wandb_run_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B run ids: lower-case letters and digits
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=project, entity=entity, name=name, tags=tags or None, config=config, id=run_id,
            resume="allow", dir=os.environ.get("WANDB_DIR") or str(run_dir),
        )
        # The graceful stop owns the driver's signals; take them back should wandb change them.
        stop.reinstall()
        self.stages: set[str] = set()

    def log(self, stage: str, step: int, wall_time: float, values: dict[str, float]) -> None:
        if stage not in self.stages:
            # Each stage has its own x axis: SFT and ERPO steps both start at 1.
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        row = {f"{stage}/{k}": v for k, v in values.items()}
        row[f"{stage}/step"] = step
        self.run.log(row)

    def close(self) -> None:
        # finish() returns once the service has the run's last records, not once it has written
        # them: it only tells the service to close the run's file (wandb 0.31: inform_finish is
        # a publish, not a request). Wait for the file, so a resumed run or `wandb sync` sees all.
        # WANDB_MODE=disabled writes no file, nor does an online run told to skip it.
        settings = self.run.settings
        writes_file = settings.mode != "disabled" and not settings.x_skip_transaction_log
        run_file = Path(settings.sync_file) if writes_file else None
        self.run.finish()
        if run_file is not None:
            wait_for_wandb_run_file(run_file, WANDB_FLUSH_TIMEOUT_S)


def open_backends(track, run_dir: Path, *, run_name: str, config: dict[str, Any] | None = None) -> list:
    """The backends ``track`` (a :class:`safer_dist.config.TrackSection`) enables for ``run_dir``."""
    out: list = []
    if track is None:
        return out
    if track.tensorboard:
        out.append(TensorBoardBackend(Path(run_dir) / "tensorboard"))
        log.info("TensorBoard event files: %s", Path(run_dir) / "tensorboard")
    if track.wandb:
        tags = [t.strip() for t in track.wandb_tags.split(",") if t.strip()]
        out.append(WandbBackend(run_dir, project=track.wandb_project, entity=track.wandb_entity,
                                name=track.wandb_run_name or run_name, tags=tags, config=config))
    return out
