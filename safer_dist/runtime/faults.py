"""Fault-injection points for the crash tests (never active unless the variable is set).

``SAFER_TEST_DIE_AT=<point>`` makes the driver SIGKILL its whole process group when it
reaches ``<point>`` — a whole-job crash at an exact place, which a test can then resume.
Points used: ``erpo_sample:<iteration>:<chunk>`` (after a sampled chunk is written) and
``erpo_train:<iteration>:<step>`` (after a step-DPO step and any checkpoint it triggers).
"""

from __future__ import annotations

import os
import signal

ENV = "SAFER_TEST_DIE_AT"


def die_if(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.killpg(os.getpgrp(), signal.SIGKILL)
