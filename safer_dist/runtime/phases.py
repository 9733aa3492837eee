"""Where a job's wall time goes: ``<run>/phases.jsonl``, one line per timed phase.

The driver wraps each phase of a job (SFT training, an evaluation, ERPO sampling calls, judging,
reference log-probs, step-DPO, weight sync, export) in :func:`phase`::

    {"phase": "erpo_sample", "start": 1733568000.123, "end": 1733568004.567, "wall_s": 4.444}

``start``/``end`` are wall-clock unix seconds, so the lines line up with anything else sampled on
the same host during the run (``bench/gpu_run.py`` aligns them with GPU utilisation and memory
samples). Phases may nest (``erpo_sample`` inside ``erpo_sampling``). The file is a timing log
only: nothing resumes from it, and a resumed run appends to it.

Until :func:`open_log` names a file (``jobs.open_run_dir`` and ``jobs.eval_job`` do), phases are
timed and dropped. The log is per driver process: the jobs of one ``safer`` command share it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

_path: Path | None = None


def open_log(path: Path | None) -> None:
    """Append later phases to ``path`` (None: stop writing)."""
    global _path
    _path = Path(path) if path is not None else None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the ``with`` block as phase ``name``; written also when the block raises."""
    start = time.time()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if _path is not None and _path.parent.is_dir():  # a run dir removed since (tests) takes no line
            rec = {"phase": name, "start": round(start, 3), "end": round(time.time(), 3),
                   "wall_s": round(time.perf_counter() - t0, 4)}
            with _path.open("a") as f:
                f.write(json.dumps(rec) + "\n")


def read(path: Path) -> list[dict]:
    """The phases of ``path`` in order (a line cut by a crash is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def totals(records: list[dict]) -> dict[str, dict]:
    """Per phase name: ``count``, ``wall_s`` (sum), ``first_start``, ``last_end``."""
    out: dict[str, dict] = {}
    for r in records:
        t = out.setdefault(r["phase"], {"count": 0, "wall_s": 0.0, "first_start": r["start"], "last_end": r["end"]})
        t["count"] += 1
        t["wall_s"] += r["wall_s"]
        t["first_start"] = min(t["first_start"], r["start"])
        t["last_end"] = max(t["last_end"], r["end"])
    return out
