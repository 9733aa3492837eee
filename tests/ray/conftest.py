"""Fixtures for tests on a real local Ray instance (in-process, loopback, CPU)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from safer_dist.config import Config
    from safer_dist.cluster.group import start_ray, stop_ray

    cfg = Config()
    cfg.launch.device = "cpu"
    cfg.launch.num_cpus = 4
    start_ray(cfg)
    yield ray
    stop_ray()

