#!/usr/bin/env bash
# Inside a SLURM allocation: start Ray on every node, run the driver, stop Ray.
#
#   slurm/ray-cluster.sh <driver command> [args...]
#
# Runs on the allocation's first node (the batch script's node):
#   1. srun the Ray head on the first node;
#   2. srun one Ray worker on each other node (one step for all of them), together with 1;
#   3. poll (slurm/ray_wait.py) until every node is ALIVE in Ray with its CPUs/GPUs, or
#      fail naming the nodes that are missing;
#   4. export RAY_ADDRESS and run the driver; USR1/TERM/INT are forwarded to it;
#   5. on exit, stop the Ray steps and exit with the driver's exit status.
#
# Each node's task finds the address Ray will use (the route to 8.8.8.8, as Ray does), takes a
# block of ports no other job on that node holds (slurm/ray_ports.py: derived from the job id,
# locked and probed; no fixed 6379), writes $STATE_DIR/node-<host>.ip and, on the head,
# $STATE_DIR/head.address (ip:GCS port, what workers and the driver connect to), then runs
# `ray start`. The state dir is on the shared filesystem (the run dir). Each Ray step asks
# srun for the job's CPUs per node (--cpus-per-task): since Slurm 22.05 a step does not
# inherit the batch job's --cpus-per-task, and would get one CPU; and for the node's GPUs
# (--gpus-per-node, when the job has GPUs), so Ray sees the GPUs it is told it has.
#
# Environment (all optional):
#   SAFER_VENV                 virtualenv with ray (default: <repo>/.venv)
#   SAFER_RUN_DIR              run directory; Ray logs/state go to
#                              $SAFER_RUN_DIR/slurm/ray-<job>-r<restart>/ (default: submit dir)
#   SAFER_RAY_PORT_RANGE       ports Ray may use on each node (default 20000-32767);
#                              each node of a job takes a block of it (slurm/ray_ports.py)
#   SAFER_RAY_PORT_LOCK_DIR    where the blocks are locked (default /tmp/safer-ray-ports;
#                              must be node-local and shared by all jobs on the node)
#   SAFER_RAY_READY_TIMEOUT_S  how long to wait for all nodes (default 300)
#   SAFER_RAY_CPUS_PER_NODE    default: SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE
#   SAFER_RAY_GPUS_PER_NODE    default: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE, else
#                              Ray's own detection (and GPUs are not checked)
#   SAFER_RAY_OBJECT_STORE_BYTES  object store size per node (default: Ray's)
#   SAFER_RAY_TMP_ROOT         parent of each node's Ray temp dir (default /tmp)
#   RAY_AUTH_MODE              default "disabled" (Ray 2.60 otherwise enables token auth
#                              and a driver must present the same token)
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SCRIPT")")

if [[ -n ${SAFER_VENV:-} ]]; then
    VENV_BIN=$SAFER_VENV/bin
    [[ -x $VENV_BIN/ray ]] || VENV_BIN=$SAFER_VENV   # also accept the bin dir itself
else
    VENV_BIN=$REPO/.venv/bin
fi
RAY=$VENV_BIN/ray
PYTHON=$VENV_BIN/python
[[ -x $RAY ]] || { echo "ray-cluster: no ray at $RAY (set SAFER_VENV)" >&2; exit 2; }

# Every Ray process and the driver must agree on the auth mode.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# =0 would make Ray bind 127.0.0.1 and refuse other nodes; a caller may have it set for
# single-machine tests, and srun would pass it on.
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
export RAY_USAGE_STATS_ENABLED=0

# ---------------------------------------------------------------------------------------
# Node side: run by srun on each node with SAFER_RAY_NODE_ROLE=head|worker.
if [[ -n ${SAFER_RAY_NODE_ROLE:-} ]]; then
    # $SLURMD_NODENAME, not `hostname`: nodes of the local dev cluster share one hostname.
    host=${SLURMD_NODENAME:-$(hostname -s)}
    exec >"$SAFER_RAY_STATE_DIR/ray-$SAFER_RAY_NODE_ROLE-$host.log" 2>&1
    # The address Ray itself would pick on this node: the source address of the route to
    # 8.8.8.8 (a route lookup; no packet is sent). Pinning it keeps head, workers and driver
    # consistent. `ip` answers in milliseconds; importing ray to ask it takes a second or two.
    ip=$(ip -4 route get 8.8.8.8 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
    [[ -n $ip ]] || ip=$("$PYTHON" -c 'import ray.util; print(ray.util.get_node_ip_address())')
    tmp_dir=${SAFER_RAY_TMP_ROOT:-/tmp}/ray-$SLURM_JOB_ID-$host
    # On SIGTERM Ray 2.60 first "drains" the node for up to 30 s; we stop the whole cluster
    # at once (and slurm signals every process of the step, GCS included, so the drain RPC
    # only times out): skip it.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
    opts=(--block --node-ip-address="$ip" --temp-dir="$tmp_dir" --disable-usage-stats
        --num-cpus="$SAFER_RAY_NUM_CPUS")
    [[ -n ${SAFER_RAY_NUM_GPUS:-} ]] && opts+=(--num-gpus="$SAFER_RAY_NUM_GPUS")
    [[ -n ${SAFER_RAY_OBJECT_STORE_BYTES:-} ]] &&
        opts+=(--object-store-memory="$SAFER_RAY_OBJECT_STORE_BYTES")
    ports_opts=(--job-id "$SLURM_JOB_ID" --host "$host" --ip "$ip" --num-cpus "$SAFER_RAY_NUM_CPUS"
        --state-dir "$SAFER_RAY_STATE_DIR")
    if [[ $SAFER_RAY_NODE_ROLE == head ]]; then
        ports_opts+=(--head)
        opts+=(--head --include-dashboard=false)
    else
        # Workers start together with the head; they only need its address (a worker's
        # `ray start` retries until the head's GCS answers).
        head_file=$SAFER_RAY_STATE_DIR/head.address
        deadline=$((SECONDS + ${SAFER_RAY_READY_TIMEOUT_S:-300}))
        until [[ -s $head_file ]]; do
            ((SECONDS < deadline)) || { echo "ray-cluster: no $head_file in time" >&2; exit 1; }
            sleep 0.1
        done
        opts+=(--address="$(<"$head_file")")
    fi
    # ray_ports.py takes the ports, writes node-<host>.ip (and head.address), then runs
    # `ray start` in its own process, which holds the ports' locks for as long as Ray runs.
    exec "$PYTHON" "$REPO/slurm/ray_ports.py" "${ports_opts[@]}" -- "${opts[@]}"
fi

# ---------------------------------------------------------------------------------------
# Batch side.
log() { echo "ray-cluster: $*" >&2; }
die() { echo "ray-cluster: error: $*" >&2; exit 1; }

(($# > 0)) || die "usage: $0 <driver command> [args...]"
[[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] || die "not inside a SLURM allocation"

# A signal before the driver runs (e.g. preemption during bring-up) must not kill this
# script with Ray half up: remember it, and exit 75 ("preempted") instead of starting.
driver_pid=
pending_signal=
forwarded=
forward() {
    if [[ -n $driver_pid ]]; then
        forwarded=$1
        kill -"$1" "$driver_pid" 2>/dev/null || true
    else
        pending_signal=$1
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
WORKERS=("${NODES[@]:1}")

export SAFER_RAY_NUM_CPUS=${SAFER_RAY_CPUS_PER_NODE:-${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}}
gpus=${SAFER_RAY_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
export SAFER_RAY_NUM_GPUS=${gpus##*:}   # "a100:4" -> "4"
run_dir=${SAFER_RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
export SAFER_RAY_STATE_DIR=$run_dir/slurm/ray-$SLURM_JOB_ID-r${SLURM_RESTART_COUNT:-0}
mkdir -p "$SAFER_RAY_STATE_DIR"
rm -f "$SAFER_RAY_STATE_DIR"/node-*.ip "$SAFER_RAY_STATE_DIR/head.address"
unset RAY_ADDRESS

# The Ray steps ask for the node's GPUs themselves: a step is not promised the job's GPUs.
gpu_args=()
[[ -n $SAFER_RAY_NUM_GPUS && $SAFER_RAY_NUM_GPUS != 0 ]] && gpu_args=(--gpus-per-node="$SAFER_RAY_NUM_GPUS")
wait_args=(--state-dir "$SAFER_RAY_STATE_DIR" --cpus-per-node "$SAFER_RAY_NUM_CPUS")
[[ -n $SAFER_RAY_NUM_GPUS ]] && wait_args+=(--gpus-per-node "$SAFER_RAY_NUM_GPUS")
timeout_s=${SAFER_RAY_READY_TIMEOUT_S:-300}

ray_pids=()
stop_ray() {
    ((${#ray_pids[@]} > 0)) || return 0
    # SIGTERM to the tasks (not to srun, which would SIGKILL them): `ray start --block`
    # then stops its node's daemons cleanly (they would also die with it: Ray sets
    # PR_SET_PDEATHSIG). srun exits when its tasks have.
    local step
    for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' | awk '$2 ~ /^safer-ray-/ { print $1 }'); do
        scancel --signal=TERM "$step" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 30)) pid alive
    while :; do
        alive=()
        for pid in "${ray_pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        ((${#alive[@]} == 0)) && break
        if ((SECONDS >= deadline)); then
            log "Ray steps still running after 30 s; terminating srun ${alive[*]}"
            kill -TERM "${alive[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    wait "${ray_pids[@]}" 2>/dev/null || true
    ray_pids=()
}
trap stop_ray EXIT

t0=$(date +%s.%N)
log "job $SLURM_JOB_ID: head $HEAD, workers ${WORKERS[*]:-none}; logs in $SAFER_RAY_STATE_DIR"
# --cpus-per-task: a step does not inherit the job's (Slurm >= 22.05) and would get one CPU.
SAFER_RAY_NODE_ROLE="head" srun --job-name=safer-ray-head --nodes=1 --ntasks=1 -w "$HEAD" \
    --cpus-per-task="$SAFER_RAY_NUM_CPUS" ${gpu_args[@]+"${gpu_args[@]}"} --overlap --input=none "$SCRIPT" \
    2>"$SAFER_RAY_STATE_DIR/srun-head.log" &
ray_pids+=($!)
if ((${#WORKERS[@]} > 0)); then
    SAFER_RAY_NODE_ROLE=worker SAFER_RAY_HEAD_HOST=$HEAD srun --job-name=safer-ray-worker \
        --nodes=${#WORKERS[@]} --ntasks=${#WORKERS[@]} --ntasks-per-node=1 \
        --cpus-per-task="$SAFER_RAY_NUM_CPUS" ${gpu_args[@]+"${gpu_args[@]}"} --exclude="$HEAD" --overlap \
        --input=none "$SCRIPT" \
        2>"$SAFER_RAY_STATE_DIR/srun-workers.log" &
    ray_pids+=($!)
fi
"$PYTHON" "$REPO/slurm/ray_wait.py" --hosts "${NODES[@]}" --watch-pid "${ray_pids[@]}" \
    --timeout-s "$timeout_s" "${wait_args[@]}" ||
    die "Ray did not come up on all nodes; see ray-{head,worker}-<node>.log and srun-*.log in $SAFER_RAY_STATE_DIR"
head_address=$(<"$SAFER_RAY_STATE_DIR/head.address")
ready_at=$(date +%s.%N)
ready_s=$(awk -v a="$t0" -v b="$ready_at" 'BEGIN { printf "%.1f", b - a }')
log "Ray ready: ${#NODES[@]} node(s), $SAFER_RAY_NUM_CPUS CPU(s)${SAFER_RAY_NUM_GPUS:+ and $SAFER_RAY_NUM_GPUS GPU(s)} each, in ${ready_s}s; RAY_ADDRESS=$head_address"
# For measurements: when Ray became ready (epoch seconds) and how long this script took.
printf '{"ready_at": %s, "bringup_s": %s}\n' "$ready_at" "$ready_s" >"$SAFER_RAY_STATE_DIR/ready.json"

if [[ -n $pending_signal ]]; then
    log "got SIG$pending_signal during bring-up; not starting the driver (exit 75: preempted)"
    exit 75
fi

export RAY_ADDRESS=$head_address
"$@" &
driver_pid=$!
# `wait` returns >128 when a trapped signal interrupts it: keep waiting for the real status.
while :; do
    rc=0
    wait "$driver_pid" || rc=$?
    ((rc > 128)) || break
    kill -0 "$driver_pid" 2>/dev/null && continue
    rc2=0
    wait "$driver_pid" || rc2=$?   # 127: the status above was already the real one
    ((rc2 != 127)) && rc=$rc2
    break
done
driver_pid=
log "driver exited with $rc"
# A signal that arrives while the driver is still starting (before it installs its handler)
# kills it: nothing past its last checkpoint is lost, so that is a preemption too.
if [[ $forwarded == USR1 || $forwarded == TERM ]] && ((rc == 128 + $(kill -l "$forwarded"))); then
    log "the driver died of SIG$forwarded before it could checkpoint; exit 75 (preempted: resume from its last checkpoint)"
    rc=75
fi
stop_ray
exit "$rc"
