"""Poll a Ray cluster until every expected SLURM node has joined; used by ray-cluster.sh.

    python slurm/ray_wait.py --state-dir DIR --hosts n1 n2 \
        [--cpus-per-node N] [--gpus-per-node N] [--timeout-s 300] [--watch-pid PID ...]

The GCS address is DIR/head.address (``ip:port``, written by the head's task once it has
its ports, slurm/ray_ports.py). A node counts as joined when the file DIR/node-<host>.ip
exists (written by the node's task just before `ray start`) and Ray has an ALIVE node with
that address whose total
resources include the expected CPUs/GPUs. Exits 0 when all have joined; exits 1 naming
the missing hosts on timeout, or at once when a watched process (the `srun` running a
node's `ray start`) has exited, since that node will never join.

Reads the node table straight from the GCS (one RPC per poll, no driver registered), so
polling costs ~0.1 s and leaves no trace in the cluster.
"""

import argparse
import os
import sys
import time

POLL_INTERVAL_S = 0.25


def _alive_nodes(gcs_client, rpc_timeout_s: float) -> dict:
    """Map node address -> total resources, for ALIVE nodes only."""
    from ray.core.generated import gcs_pb2

    nodes = gcs_client.get_all_node_info(timeout=rpc_timeout_s)
    alive = {}
    for info in nodes.values():
        if info.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE:
            alive[info.node_manager_address] = dict(info.resources_total)
    return alive


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", required=True)
    p.add_argument("--hosts", nargs="+", required=True)
    p.add_argument("--cpus-per-node", type=float, default=None)
    p.add_argument("--gpus-per-node", type=float, default=None)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--watch-pid", type=int, nargs="*", default=[])
    args = p.parse_args()

    from ray._raylet import GcsClient

    deadline = time.monotonic() + args.timeout_s
    gcs_client = None
    missing: dict = {}
    while True:
        host_ip = {}
        for host in args.hosts:
            path = os.path.join(args.state_dir, f"node-{host}.ip")
            if os.path.exists(path):
                with open(path) as f:
                    host_ip[host] = f.read().strip()
        alive = {}
        missing_reason = "head has not written its address yet"
        head_file = os.path.join(args.state_dir, "head.address")
        if os.path.exists(head_file):
            with open(head_file) as f:
                address = f.read().strip()
            try:
                if gcs_client is None:
                    gcs_client = GcsClient(address=address)
                alive = _alive_nodes(gcs_client, rpc_timeout_s=2.0)
            except Exception as e:  # GCS not up yet: every node is missing
                missing_reason = f"GCS at {address} not answering ({type(e).__name__})"
            else:
                missing_reason = "not alive in Ray"
        missing = {}
        for host in args.hosts:
            ip = host_ip.get(host)
            if ip is None:
                missing[host] = "has not started `ray start` yet (no node-%s.ip)" % host
                continue
            res = alive.get(ip)
            if res is None:
                missing[host] = f"{ip} {missing_reason}"
            elif args.cpus_per_node is not None and res.get("CPU", 0) < args.cpus_per_node:
                missing[host] = f"{ip} has CPU={res.get('CPU', 0)}, want {args.cpus_per_node}"
            elif args.gpus_per_node is not None and res.get("GPU", 0) < args.gpus_per_node:
                missing[host] = f"{ip} has GPU={res.get('GPU', 0)}, want {args.gpus_per_node}"
        if not missing:
            return 0
        dead = [pid for pid in args.watch_pid if not _pid_alive(pid)]
        if dead or time.monotonic() >= deadline:
            why = (
                f"process(es) {dead} running `ray start` exited"
                if dead
                else f"timed out after {args.timeout_s:.0f}s"
            )
            print(f"ray_wait: {why}; nodes not ready:", file=sys.stderr)
            for host, reason in missing.items():
                print(f"  {host}: {reason}", file=sys.stderr)
            return 1
        time.sleep(POLL_INTERVAL_S)


if __name__ == "__main__":
    sys.exit(main())
