"""Graceful stop: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) asks the driver to finish the step,
checkpoint and exit.

The training loop polls :func:`requested` after every step. On a stop it writes a
checkpoint and raises :class:`Preempted` ("stopped at step N; run the same command to
resume"); the CLI turns that into the exit code of the signal: ``EXIT_PREEMPTED`` (75,
EX_TEMPFAIL) for SIGTERM/SIGUSR1, which the SLURM batch script answers with a requeue, and
``EXIT_INTERRUPTED`` (130, the shell's code for SIGINT) for Ctrl-C. A second signal while
stopping (a second Ctrl-C), or the grace period (``launch.stop_grace_s``) running out, exits at
once with the same code: the last complete checkpoint is still there.

``ray.init`` installs its own SIGTERM handler (``sys.exit``) in the driver; :func:`reinstall`
(called by :func:`safer_dist.cluster.group.start_ray` right after it) puts ours back; it
leaves SIGINT alone. A terminal sends Ctrl-C to its whole foreground process group: that
reaches the driver and the Ray daemons it started, which run with SIGINT blocked (Ray starts
them so), while the Ray workers — learners, rollout workers — sit in process groups of their
own and inherit that blocked mask. So only the driver acts on a Ctrl-C, and the learners live
to write the checkpoint (tests/ray/test_learner_group.py and tests/e2e/test_resume_faults.py
check both).
"""

from __future__ import annotations

import os
import signal
import threading

from safer_dist.runtime.log import get_logger

log = get_logger("stop")

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_requested = threading.Event()
_signum: int | None = None  # the signal that asked for the stop in progress
_grace_s: float | None = None  # set once install() ran
_timer: threading.Timer | None = None  # the grace period of a stop in progress


class Preempted(Exception):
    """The run stopped on request after writing a checkpoint. ``exit_code``: the process's
    exit status for the signal that asked (130 for SIGINT, 75 otherwise)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.exit_code = exit_code()


def requested() -> bool:
    return _requested.is_set()


def exit_code() -> int:
    """The exit status for the stop in progress (75 when none was asked for by SIGINT)."""
    return EXIT_INTERRUPTED if _signum == signal.SIGINT else EXIT_PREEMPTED


def stopped_at(step: int) -> Preempted:
    """The exception a training loop raises after checkpointing ``step`` on a stop request."""
    return Preempted(f"stopped at step {step}; run the same command to resume")


def install(grace_s: float) -> None:
    """Handle SIGTERM/SIGUSR1/SIGINT in the main thread of the driver."""
    global _grace_s
    _grace_s = grace_s

    def handler(signum, _frame):
        global _timer, _signum
        name = signal.Signals(signum).name
        if _requested.is_set():
            log.warning("second %s: exiting now without a checkpoint of this step", name)
            os._exit(EXIT_INTERRUPTED if signum == signal.SIGINT else exit_code())
        _signum = signum
        _requested.set()
        again = "; Ctrl-C again to abort at once" if signum == signal.SIGINT else ""
        log.warning("%s received: finishing the current step, then checkpointing (grace %.0f s)%s", name, grace_s, again)
        _timer = threading.Timer(grace_s, _expire, args=(grace_s,))
        _timer.daemon = True
        _timer.start()

    for sig in SIGNALS:
        signal.signal(sig, handler)


def reinstall() -> None:
    """Install the handlers again if :func:`install` ran (after a library replaced them)."""
    if _grace_s is not None and threading.current_thread() is threading.main_thread():
        install(_grace_s)


def _expire(grace_s: float) -> None:
    log.error("graceful stop did not finish within %.0f s; exiting", grace_s)
    os._exit(exit_code())


def reset() -> None:
    """Forget a stop request and cancel its grace timer (for tests and in-process reuse)."""
    global _timer, _signum
    _requested.clear()
    _signum = None
    if _timer is not None:
        _timer.cancel()
        _timer = None
