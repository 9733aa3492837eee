"""Graceful stop: SIGTERM or SIGUSR1 asks the driver to finish the step, checkpoint and exit.

The training loop polls :func:`requested` after every step. On a stop it writes a
checkpoint and raises :class:`Preempted`; the CLI turns that into exit code
``EXIT_PREEMPTED`` (75, EX_TEMPFAIL), which the SLURM batch script answers with a requeue.
A second signal while stopping, or the grace period (``launch.stop_grace_s``) running out,
exits at once with the same code: the last complete checkpoint is still there.

``ray.init`` installs its own SIGTERM handler (``sys.exit``) in the driver; :func:`reinstall`
(called by :func:`safer_dist.cluster.group.start_ray` right after it) puts ours back.
"""

from __future__ import annotations

import os
import signal
import threading

from safer_dist.runtime.log import get_logger

log = get_logger("stop")

EXIT_PREEMPTED = 75

_requested = threading.Event()
_grace_s: float | None = None  # set once install() ran
_timer: threading.Timer | None = None  # the grace period of a stop in progress


class Preempted(Exception):
    """The run stopped on request after writing a checkpoint."""


def requested() -> bool:
    return _requested.is_set()


def install(grace_s: float) -> None:
    """Handle SIGTERM/SIGUSR1 in the main thread of the driver."""
    global _grace_s
    _grace_s = grace_s

    def handler(signum, _frame):
        global _timer
        name = signal.Signals(signum).name
        if _requested.is_set():
            log.warning("second %s: exiting now", name)
            os._exit(EXIT_PREEMPTED)
        _requested.set()
        log.warning("%s received: finishing the current step, then checkpointing (grace %.0f s)", name, grace_s)
        _timer = threading.Timer(grace_s, _expire, args=(grace_s,))
        _timer.daemon = True
        _timer.start()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def reinstall() -> None:
    """Install the handlers again if :func:`install` ran (after a library replaced them)."""
    if _grace_s is not None and threading.current_thread() is threading.main_thread():
        install(_grace_s)


def _expire(grace_s: float) -> None:
    log.error("graceful stop did not finish within %.0f s; exiting", grace_s)
    os._exit(EXIT_PREEMPTED)


def reset() -> None:
    """Forget a stop request and cancel its grace timer (for tests and in-process reuse)."""
    global _timer
    _requested.clear()
    if _timer is not None:
        _timer.cancel()
        _timer = None
