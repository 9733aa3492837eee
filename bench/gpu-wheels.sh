#!/usr/bin/env bash
# Wheels that install safer's runtime dependencies on an offline CUDA host whose Python 3.12
# image already has torch (2.11), transformers, triton, accelerate, peft, pytest, numpy, pandas,
# pyarrow, pyyaml, msgpack, psutil, tqdm, fsspec and huggingface-hub, but lacks deepspeed, ray and
# datasets. It also carries TRL (the peer of bench/gpu.py) and liger-kernel (Triton kernels, e.g.
# fused linear cross-entropy); never torch, which the image provides. Output stays under 42 MiB:
# ray is repacked without its Java jar, dashboard UI and unused libraries (rllib, serve, llm,
# data, train, tune, air, workflow), with its three native binaries stripped.
#
#   usage: bench/gpu-wheels.sh [OUTDIR]        (default OUTDIR: .whl in the current directory)
#
# On the offline host (docs/BENCHMARKS.md, "On a GPU"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site OUTDIR/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
out=$(realpath -m "${1:-.whl}")
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

python3 -m pip install -q wheel >/dev/null
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/dl" \
  ray==2.60.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5 \
  hjson==3.1.0 jsonschema==4.26.0 jsonschema_specifications==2025.9.1 referencing==0.37.0 \
  rpds_py==2026.9.1 trl==1.16.0 liger-kernel==0.8.5

# deepspeed is published as source only; with DS_BUILD_OPS=0 it builds a pure-Python wheel
# whose CUDA ops are compiled just in time on the GPU host.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-cache-dir -w "$work/dl" deepspeed==0.19.8

# Slim ray.
( cd "$work" && python3 -m wheel unpack -d unpacked dl/ray-*.whl >/dev/null )
r=$(ls -d "$work"/unpacked/ray-*)
rm -rf "$r"/ray/{jars,dashboard/client/build,rllib,serve,llm,data,train,tune,air,workflow}
strip --strip-unneeded "$r"/ray/_raylet.so "$r"/ray/core/src/ray/raylet/raylet \
  "$r"/ray/core/src/ray/gcs/gcs_server
rm -f "$work"/dl/ray-*.whl
python3 -m wheel pack -d "$work/dl" "$r" >/dev/null

rm -f "$out"/*.whl
mv "$work"/dl/*.whl "$out"/
du -ch "$out"/*.whl | tail -1
