"""The CUDA-IPC weight hand-over (weights/channel.py) between two processes on ONE GPU, as
colocated placement puts learner rank 0 and rollout worker 0: the receiver ends up with the
sender's weights bit for bit, bucket by bucket, and refuses another dtype. Skipped without CUDA
(not yet run: no GPU was available when it was written)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from safer_dist.weights.channel import Channel, receive_weights, send_weights
from safer_dist.weights.layout import layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)).to("cuda", dtype)


def _member(rank: int, port: int, receiver_dtype: torch.dtype, out) -> None:
    members = layout(["node/gpu0", "node/gpu0"])  # both on the same GPU: the IPC hand-over
    channel = Channel("127.0.0.1", port, members[rank], "nccl", local_ip="127.0.0.1", timeout_s=120)
    assert channel.group is None
    if rank == 0:
        send_weights(_model(1, torch.bfloat16), channel, rank=0, zero3=False, version=3, bucket_mb=0.05)
        return
    model = _model(2, receiver_dtype)
    try:
        receive_weights(model, channel, version=3, bucket_mb=0.05)  # 0.05 MiB: several buckets
    except ValueError as e:
        out.put(str(e))
        return
    want = _model(1, torch.bfloat16)
    out.put(all(torch.equal(a, b) for a, b in zip(model.parameters(), want.parameters())))


def _run(receiver_dtype: torch.dtype):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, port, receiver_dtype, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=120)
    procs[1].join(timeout=60)
    procs[0].join(timeout=5 if isinstance(result, str) else 60)  # a refused sender waits for its peer
    for p in procs:
        if p.is_alive():
            p.kill()
    return result


def test_ipc_hand_over_on_one_gpu_gives_the_senders_weights():
    assert _run(torch.bfloat16) is True


def test_ipc_hand_over_refuses_another_dtype():
    message = _run(torch.float32)
    assert "the learners send dtype:elements torch.bfloat16:" in message and "holds torch.float32:" in message
