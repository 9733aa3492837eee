"""Fixtures of the CLI tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def logs():
    """The messages the library logs (logger ``safer``) during the test."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("safer")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
