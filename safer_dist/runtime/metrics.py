"""metrics.jsonl (fanned out to the tracking backends) and progress output for long loops."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from safer_dist.runtime.io import atomic_write_text
from safer_dist.runtime.log import get_logger
from safer_dist.runtime.tracking import open_backends, scalars

log = get_logger("metrics")


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (flushed each line) and
    hands every row to the tracking backends ``track`` enables (TensorBoard, W&B:
    :mod:`safer_dist.runtime.tracking`), which live in the same run directory.

    Every row gets ``time``, the wall-clock time it was written (unix seconds), unless it has
    one. ``track`` is a :class:`safer_dist.config.TrackSection` (None: metrics.jsonl only);
    ``config`` the resolved config, recorded by W&B. :meth:`close` ends the backends' runs.
    """

    def __init__(self, path: Path, track=None, *, run_name: str = "", config: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.backends = open_backends(track, self.path.parent, run_name=run_name or self.path.parent.name, config=config)

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop lines of ``stage`` beyond ``step`` (logged after the checkpoint we resume from)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if rec.get("stage") == stage and rec.get("step", 0) > step:
                continue
            keep.append(line)
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def write(self, record: dict) -> None:
        record = {**record, "time": record.get("time", round(time.time(), 3))}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.backends:
            values = scalars(record)
            for backend in self.backends:
                backend.log(record["stage"], record["step"], record["time"], values)

    def close(self) -> None:
        """Flush and end the tracking backends (metrics.jsonl needs nothing)."""
        for backend in self.backends:
            backend.close()
        self.backends = []


def read_metrics(path: Path, stage: str | None = None) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if stage is None or rec.get("stage") == stage:
            out.append(rec)
    return out


class Progress:
    """A tqdm bar with ETA on a terminal; elsewhere a log line every ``every`` updates."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", every: int = 10):
        self.total, self.n, self.desc, self.every = total, initial, desc, every
        self.t0, self.n0 = time.monotonic(), initial
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()})
            return
        if self.n % self.every == 0 or self.n == self.total:
            rate = (self.n - self.n0) / max(time.monotonic() - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
            log.info("%s %d/%d (%.2f/s, ETA %s) %s", self.desc, self.n, self.total, rate, _fmt_s(eta), extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_s(s: float) -> str:
    if s == float("inf"):
        return "?"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
