"""Reserve this node's Ray ports for one SLURM job, then run `ray start` with them; used by ray-cluster.sh.

    python slurm/ray_ports.py --job-id ID --host NODE --ip IP --num-cpus N --state-dir DIR [--head] \
        -- [ray start options ...]

Two jobs that share a node must not share a port: Ray's defaults (GCS 6379, client server
10001, dashboard agent 52365, workers 10002-19999) are the same for every job. So each node of
a job takes its own block of ports:

- The block lies in SAFER_RAY_PORT_RANGE (default 20000-32767: below Linux's ephemeral range,
  32768 and up, so no outgoing connection holds one of them). It is a whole number of units
  of ``UNIT`` ports: ``SERVICE_PORTS`` named ports (GCS, client server, dashboard, node
  manager, object manager, dashboard agent gRPC and HTTP, metrics export, runtime-env agent)
  followed by the worker ports (``4 x num_cpus``, at least ``MIN_WORKER_PORTS``: Ray keeps up
  to one idle worker per CPU besides one per actor or running task).
- The first block tried is derived from the job id, so concurrent jobs start apart; a block is
  taken when every unit's lock file (``SAFER_RAY_PORT_LOCK_DIR``/<node>/unit-<port>.lock,
  default /tmp/safer-ray-ports) can be locked (``flock``) and every port of it can be bound
  now. Otherwise the next block is tried.
- The locks are held by this process, which then runs `ray start --block` in-process and lives
  as long as the node's Ray; they are released when it exits, whatever the cause.

Before `ray start` it writes DIR/node-<node>.ip (the node's address: ray_wait.py looks for
that node in Ray) and, on the head, DIR/head.address (``ip:gcs_port``: workers and the
driver connect to it). Prints the ports it took.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import importlib.util
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT = 100
SERVICE_PORTS = 10  # 9 named ports and one spare; the worker ports follow
MIN_WORKER_PORTS = 190
DEFAULT_RANGE = (20000, 32767)
DEFAULT_LOCK_DIR = "/tmp/safer-ray-ports"


@dataclass(frozen=True)
class Ports:
    """One node's Ray ports: ``base`` .. ``base + SERVICE_PORTS - 1`` named, then the workers'."""

    base: int
    size: int

    @property
    def gcs(self) -> int:
        return self.base

    @property
    def min_worker(self) -> int:
        return self.base + SERVICE_PORTS

    @property
    def max_worker(self) -> int:
        return self.base + self.size - 1

    def ray_start_args(self, head: bool, client_server: bool = True) -> list[str]:
        """`ray start` options for these ports (``client_server``: ray[client]'s grpc is installed)."""
        b = self.base
        args = [
            f"--node-manager-port={b + 3}", f"--object-manager-port={b + 4}",
            f"--dashboard-agent-grpc-port={b + 5}", f"--dashboard-agent-listen-port={b + 6}",
            f"--metrics-export-port={b + 7}", f"--runtime-env-agent-port={b + 8}",
            f"--min-worker-port={self.min_worker}", f"--max-worker-port={self.max_worker}",
        ]
        if head:
            args = [f"--port={self.gcs}", f"--dashboard-port={b + 2}", *args]
            if client_server:
                args.insert(1, f"--ray-client-server-port={b + 1}")
        return args


def block_units(num_cpus: float) -> int:
    """Units of ``UNIT`` ports one node's block needs."""
    ports = SERVICE_PORTS + max(MIN_WORKER_PORTS, 4 * int(num_cpus))
    return -(-ports // UNIT)


def candidates(job_id: int, units: int, lo: int, hi: int) -> list[int]:
    """Base ports of the aligned blocks of ``units`` units in [lo, hi], the job's own first."""
    n_blocks = (hi - lo + 1) // (units * UNIT)
    if n_blocks < 1:
        raise ValueError(f"SAFER_RAY_PORT_RANGE {lo}-{hi} is smaller than one node's block ({units * UNIT} ports)")
    first = job_id % n_blocks
    return [lo + ((first + i) % n_blocks) * units * UNIT for i in range(n_blocks)]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _lock_dir(root: Path, host: str) -> Path:
    """root/host, world-writable and sticky like /tmp: every user's jobs lock in the same place."""
    d = root / host
    for p in (root, d):
        try:
            p.mkdir(mode=0o1777)
            p.chmod(0o1777)  # mkdir's mode is cut by the umask
        except FileExistsError:
            pass
    return d


def reserve(job_id: int, num_cpus: float, *, host: str, lock_root: Path,
            port_range: tuple[int, int]) -> tuple[Ports, list[int]]:
    """Take a free block: (its ports, the open lock file descriptors to keep while Ray runs).
    Raises RuntimeError when every block in the range is locked or has a port in use."""
    units = block_units(num_cpus)
    lock_dir = _lock_dir(lock_root, host)
    busy = []
    for base in candidates(job_id, units, *port_range):
        fds = []
        try:
            for u in range(units):
                path = lock_dir / f"unit-{base + u * UNIT}.lock"
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy.append(f"{base} (locked)")
        else:
            in_use = next((p for p in range(base, base + units * UNIT) if not _bindable(p)), None)
            if in_use is None:
                return Ports(base, units * UNIT), fds
            busy.append(f"{base} (port {in_use} in use)")
        for fd in fds:
            os.close(fd)
    raise RuntimeError(f"no free block of {units * UNIT} Ray ports in {port_range[0]}-{port_range[1]} on {host}: "
                       f"{', '.join(busy)}; set SAFER_RAY_PORT_RANGE to a wider free range")


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"SAFER_RAY_PORT_RANGE must be LO-HI, e.g. 20000-32767 (got {text!r})") from None
    if not 1024 <= lo < hi <= 65535:
        raise ValueError(f"SAFER_RAY_PORT_RANGE {text}: need 1024 <= LO < HI <= 65535")
    return lo, hi


def _write(path: Path, text: str) -> None:
    """Readers poll for the file: it must appear whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job-id", type=int, required=True)
    p.add_argument("--host", required=True, help="SLURM node name (nodes of the dev cluster share a hostname)")
    p.add_argument("--ip", required=True, help="the address Ray uses on this node")
    p.add_argument("--num-cpus", type=float, required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--head", action="store_true")
    p.add_argument("ray_args", nargs=argparse.REMAINDER, help="-- then `ray start` options")
    args = p.parse_args(argv)
    ray_args = args.ray_args[1:] if args.ray_args[:1] == ["--"] else args.ray_args

    port_range = parse_range(os.environ.get("SAFER_RAY_PORT_RANGE", "%d-%d" % DEFAULT_RANGE))
    lock_root = Path(os.environ.get("SAFER_RAY_PORT_LOCK_DIR", DEFAULT_LOCK_DIR))
    ports, _locks = reserve(args.job_id, args.num_cpus, host=args.host, lock_root=lock_root, port_range=port_range)
    # `--ray-client-server-port` is refused when ray[client]'s grpc is missing.
    start_args = ports.ray_start_args(args.head, client_server=importlib.util.find_spec("grpc") is not None)
    print(f"ray_ports: {args.host}: ports {ports.base}-{ports.max_worker} "
          f"(GCS {ports.gcs}, workers {ports.min_worker}-{ports.max_worker})", flush=True)
    state = Path(args.state_dir)
    if args.head:
        _write(state / "head.address", f"{args.ip}:{ports.gcs}")
    _write(state / f"node-{args.host}.ip", args.ip)

    from ray.scripts.scripts import main as ray_main  # what the `ray` command runs

    sys.argv = ["ray", "start", *ray_args, *start_args]
    print(f"ray_ports: {args.host} ({args.ip}): {' '.join(sys.argv)}", flush=True)
    # The lock descriptors stay open for as long as `ray start --block` runs here.
    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
