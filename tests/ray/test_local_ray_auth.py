"""A local run starts Ray with token authentication on and without Ray's warning about it."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def ray_warnings():
    """Warnings of Ray's token-auth set-up (that logger does not propagate to pytest's)."""
    records: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_local_ray_keeps_token_auth_and_does_not_warn(monkeypatch, ray_warnings):
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from safer_dist.cluster.group import start_ray, stop_ray
    from safer_dist.config import Config

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    cfg = Config()
    cfg.launch.device, cfg.launch.num_cpus = "cpu", 1
    start_ray(cfg)
    try:
        assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=120) == 42
        assert get_authentication_mode() == AuthenticationMode.TOKEN
    finally:
        stop_ray()
    assert not [m for m in ray_warnings if "oken authentication" in m], ray_warnings
