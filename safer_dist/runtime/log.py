"""One rank-aware logger for the library.

Only rank 0 (or the driver, which has no rank) logs at INFO; other ranks log warnings and
errors, prefixed with their rank, so a 64-rank job does not print everything 64 times.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_FORMAT = "%(asctime)s %(levelname).1s %(rank_tag)s%(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = os.environ.get("RANK")
        record.rank_tag = f"[rank {rank}] " if rank not in (None, "0") else ""
        if rank not in (None, "0") and record.levelno < logging.WARNING:
            return False
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the one at creation
    (so redirections such as pytest's ``capsys`` see messages of loggers created earlier)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str = "safer") -> logging.Logger:
    logger = logging.getLogger(name if name.startswith("safer") else f"safer.{name}")
    root = logging.getLogger("safer")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("SAFER_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logger


def set_level(level: str) -> None:
    logging.getLogger("safer").setLevel(level.upper())


def quiet_libraries() -> None:
    """Silence per-step library chatter (progress bars on load, deprecation noise) in workers."""
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
