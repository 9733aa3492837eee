"""slurm/ray_ports.py: each node of a SLURM job takes its own block of Ray ports.

Real sockets and real file locks; the two-jobs-on-two-nodes case on a real SLURM cluster is in
tests/slurm/test_sft_slurm.py.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest

from safer_dist.cluster.slurm import REPO

_spec = importlib.util.spec_from_file_location("ray_ports", REPO / "slurm" / "ray_ports.py")
ray_ports = importlib.util.module_from_spec(_spec)
sys.modules["ray_ports"] = ray_ports  # dataclasses look their module up there
_spec.loader.exec_module(ray_ports)

RANGE = ray_ports.DEFAULT_RANGE
RAY_DEFAULTS = {6379, 8265, 10001, 52365}  # GCS, dashboard, client server, dashboard agent


def _ports(args: list[str]) -> dict[str, int]:
    return {a.split("=")[0]: int(a.split("=")[1]) for a in args}


def test_block_size_grows_with_the_nodes_cpus():
    # 10 named ports + max(190, 4 x CPUs) worker ports, in units of 100
    assert ray_ports.block_units(2) == 2  # 10 + 190
    assert ray_ports.block_units(48) == 3  # 10 + 192 = 202
    assert ray_ports.block_units(64) == 3  # 10 + 256 = 266
    assert ray_ports.block_units(192) == 8  # 10 + 768 = 778


def test_the_first_block_comes_from_the_job_id():
    # 20000-32767 holds 12768 // 200 = 63 blocks of 2 units; job 130: 130 % 63 = 4 -> 20000 + 4 x 200
    bases = ray_ports.candidates(130, 2, *RANGE)
    assert bases[:3] == [20800, 21000, 21200] and len(bases) == 63
    assert sorted(bases) == list(range(20000, 32600, 200))
    assert ray_ports.candidates(130 + 63, 2, *RANGE)[0] == 20800
    with pytest.raises(ValueError, match="smaller than one node's block"):
        ray_ports.candidates(1, 3, 20000, 20250)


def test_every_ray_port_is_set_and_inside_the_block():
    ports = ray_ports.Ports(20800, 200)
    head = _ports(ports.ray_start_args(head=True))
    assert set(head) == {
        "--port", "--ray-client-server-port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
        "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port",
        "--runtime-env-agent-port", "--min-worker-port", "--max-worker-port",
    }
    assert head["--port"] == 20800 and (head["--min-worker-port"], head["--max-worker-port"]) == (20810, 20999)
    named = [v for k, v in head.items() if "worker" not in k]
    assert len(set(named)) == len(named) and all(20800 <= v < 20810 for v in named)
    worker = _ports(ports.ray_start_args(head=False))
    assert "--port" not in worker and "--ray-client-server-port" not in worker and "--dashboard-port" not in worker
    assert worker.items() <= head.items()
    assert "--ray-client-server-port" not in _ports(ports.ray_start_args(head=True, client_server=False))


def _reserve(job_id, tmp_path, num_cpus=2):
    return ray_ports.reserve(job_id, num_cpus, host="n1", lock_root=tmp_path / "locks", port_range=RANGE)


def _block(p) -> set[int]:
    return set(range(p.base, p.base + p.size))


def test_two_jobs_on_one_node_never_share_a_port(tmp_path):
    # Jobs 130 and 193 want the same first block (130 % 63 == 193 % 63): the second takes another.
    a, fds_a = _reserve(130, tmp_path)
    b, fds_b = _reserve(193, tmp_path)
    try:
        assert not _block(a) & _block(b)
        assert not (_block(a) | _block(b)) & RAY_DEFAULTS
        assert all(RANGE[0] <= p <= RANGE[1] for p in _block(a) | _block(b))
        # the same job on another node (its own lock directory) is not held back by these
        c, fds_c = ray_ports.reserve(130, 2, host="n2", lock_root=tmp_path / "locks", port_range=RANGE)
        assert c.base == a.base
        for fd in fds_c:
            os.close(fd)
    finally:
        for fd in fds_a + fds_b:
            os.close(fd)
    # the locks go with the descriptors: the block is free again
    again, fds = _reserve(130, tmp_path)
    assert again.base == a.base
    for fd in fds:
        os.close(fd)


def test_a_block_with_a_port_in_use_is_skipped(tmp_path):
    first = ray_ports.candidates(130, 2, *RANGE)[0]
    with socket.socket() as other:  # someone else (not a safer job) listens in the job's first block
        other.bind(("", first + 57))
        other.listen()
        p, fds = _reserve(130, tmp_path)
        for fd in fds:
            os.close(fd)
    assert first + 57 not in _block(p)


def test_locks_hold_across_processes(tmp_path):
    """A lock taken by one process (a node's running Ray) keeps another job's process off the block."""
    a, fds = _reserve(130, tmp_path)
    try:
        code = (f"import pathlib, sys; sys.path.insert(0, {str(REPO / 'slurm')!r}); import ray_ports; "
                f"print(ray_ports.reserve(193, 2, host='n1', lock_root=pathlib.Path({str(tmp_path / 'locks')!r}), "
                f"port_range={RANGE!r})[0].base)")
        other = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    finally:
        for fd in fds:
            os.close(fd)
    assert other != a.base


def test_port_range_is_checked():
    assert ray_ports.parse_range("21000-22999") == (21000, 22999)
    for bad in ("6379", "30000-20000", "80-2000", "a-b"):
        with pytest.raises(ValueError, match="SAFER_RAY_PORT_RANGE"):
            ray_ports.parse_range(bad)
