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
  without a network; files go to ``$WANDB_DIR`` or else the run directory.

Both packages are optional (``pip install 'safer[track]'``); the config fails with a
ConfigError naming the key when an enabled backend is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
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
        self.run.finish()


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
