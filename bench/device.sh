#!/usr/bin/env bash
# Every GPU check in one command, for a session's few minutes on an offline GPU host:
# tests/gpu, bench/gpu.py (learner vs plain loop vs TRL), bench/rollout.py --device cuda (rules
# and answer steps) and bench/gpu_run.py (`safer run` on one GPU, phase by phase). Each step has
# its own time limit and the whole stays under ~9 minutes; a step that fails or times out is
# recorded and the next one still runs.
#
#   bench/device.sh [OUT]        OUT default: bench/results/<gpu>-<date>/
#
# With wheels from bench/gpu-wheels.sh in .whl/ (deepspeed, ray, datasets, trl, ...), they are
# installed into /tmp/site first and put on PYTHONPATH. Writes OUT/*.json, OUT/*.log, OUT/env.txt
# and prints one summary table at the end (bench/device_summary.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
out=${1:-bench/results/${gpu:-cpu}-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
if [ -d .whl ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
  git rev-parse HEAD 2>/dev/null
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

start=$SECONDS
budget=${DEVICE_BUDGET_S:-530}
step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 30 ]; then
    echo "skipped (budget spent)" > "$out/$name.log"; echo "$name: skipped, budget spent"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
  tail -3 "$out/$name.log"
}

step tests-gpu 150 "$PY" -m pytest -q -x tests/gpu
step gpu-run 240 "$PY" bench/gpu_run.py --json "$out/gpu-run.json"
step tinyllama-1.1b 150 "$PY" bench/gpu.py --shape tinyllama-1.1b --repeats 2 --json "$out/tinyllama-1.1b.json"
step rollout-rules 60 "$PY" bench/rollout.py --device cuda --shape tinyllama-1.1b --prefixes 256 --n 8 \
  --batch-rows 256 --repeats 2 --json "$out/rollout-rules.json"
step rollout-answer 60 "$PY" bench/rollout.py --device cuda --shape tinyllama-1.1b --prefixes 64 --n 8 \
  --batch-rows 256 --repeats 2 --step answer --max-new-tokens 128 --json "$out/rollout-answer.json"

echo "total: $((SECONDS - start)) s; results in $out"
"$PY" bench/device_summary.py "$out"
