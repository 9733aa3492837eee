"""safer_dist/cluster/host_memory.py: the host memory per node `safer slurm submit` asks for.

The GPU cases (Llama-3-8B) are in test_slurm_submit.py; here a small CPU model, by hand."""

from __future__ import annotations

import json

from safer_dist.cluster.host_memory import HostMemory, host_memory
from safer_dist.cluster.gpu_memory import GIB
from safer_dist.cluster.slurm import REPO
from safer_dist.config import load_config


def _cfg(tmp_path, *overrides):
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": True,
    }))
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.path={model}", "model.init_preset=null", "data.max_seq_len=256", "train.micro_batch_size=4",
        "train.global_batch_size=8", "rollout.batch_size=32", *overrides])


# P = 2 x (64x64 + 2x64x64 + 64x64 + 3x64x128 + 2x64) + 1000x64 (tied) + 64 = 146,240
P = 146_240
# CPU learner, ZeRO-2 over 2 learners, fp32: weights 4P = 584,960; grads 4P/2 = 292,480;
# Adam 8P/2 = 584,960; activations 2 layers x (8x64 + 2x64 + 4x128) x 4 bytes x 1024 tokens =
# 9,437,184; logits (one chunk: 1024 tokens x 1000 x 8) = 8,192,000; buckets up to 4P = 584,960
LEARNER_TENSORS = 584_960 + 292_480 + 584_960 + 9_437_184 + 8_192_000 + 584_960  # 19,676,544
# CPU rollout worker, fp32 (2 x bf16): weights 2P = 292,480; KV 2 x 2 x 2 layers x 64 x 32 rows
# x 256 tokens = 4,194,304; scoring logits 8192 x 1000 x 6 = 49,152,000 -> 2 x 53,638,784
WORKER_TENSORS = 107_277_568


def test_cpu_sft_one_learner_per_node(tmp_path):
    cfg = _cfg(tmp_path, "learner.placement=STRICT_SPREAD")
    m = host_memory(cfg, nodes=2, gpus_per_node=0, cpus_per_node=1, stage="sft")
    assert (m.learners, m.workers) == (1, 0)
    assert m.learner_bytes == 1.5 * GIB + LEARNER_TENSORS
    # 2 + 1.5 GiB + 18.8 MiB = 3.52 GiB -> 4G
    assert m.per_node == 3.5 * GIB + LEARNER_TENSORS and m.slurm_mem() == "4G"


def test_the_fullest_node_of_any_phase_is_asked_for(tmp_path):
    cfg = _cfg(tmp_path)  # PACK: both learners on one node if it has room
    full = host_memory(cfg, nodes=2, gpus_per_node=0, cpus_per_node=2, stage="run")
    # sft: 2 learners on node 0; eval: 2 workers on node 0; erpo: 2 learners on node 0, 2 workers
    # on node 1. A worker (1.5 GiB + 102.3 MiB) outweighs a learner (1.5 GiB + 18.8 MiB).
    assert (full.learners, full.workers) == (0, 2)
    roomy = host_memory(cfg, nodes=2, gpus_per_node=0, cpus_per_node=4, stage="run")
    assert (roomy.learners, roomy.workers) == (2, 2)
    assert roomy.worker_bytes == 1.5 * GIB + WORKER_TENSORS
    # 2 + 2 x (1.5 GiB + 18.8 MiB) + 2 x (1.5 GiB + 102.3 MiB) = 8.24 GiB -> 9G
    assert roomy.slurm_mem() == "9G"
    # the judge's rollout group doubles the workers
    judged = host_memory(_cfg(tmp_path, "judge.kind=model", "judge.model_path=/x"), nodes=2, gpus_per_node=0,
                         cpus_per_node=8, stage="erpo")
    assert (judged.learners, judged.workers) == (2, 4)
    # and so does the SFT reference (rollout.placement=colocate: the same processes, shared bundles)
    both = host_memory(_cfg(tmp_path, "judge.kind=model", "judge.model_path=/x", "erpo.reference=sft",
                            "rollout.placement=colocate"), nodes=2, gpus_per_node=0, cpus_per_node=8, stage="erpo")
    assert (both.learners, both.workers) == (2, 6)


def test_tensor_parallel_workers_are_k_processes_with_a_kth_each(tmp_path):
    # rollout.tensor_parallel=2: 2 workers are 4 processes. On 2 nodes of 4 CPUs the evaluation
    # puts both workers' 2 ranks on node 0 (STRICT_PACK each, PACK fills node 0 first): 4 rank
    # processes, heavier than ERPO's node 0 (2 learners + worker 0's 2 ranks).
    # Each holds, fp32 (2 x bf16): weights 2P / 2 = 146,240; KV 4,194,304 / 2 = 2,097,152;
    # scoring logits 49,152,000 (whole on every rank) -> 2 x 51,395,392 = 102,790,784
    m = host_memory(_cfg(tmp_path, "rollout.tensor_parallel=2"), nodes=2, gpus_per_node=0, cpus_per_node=4,
                    stage="run")
    assert (m.learners, m.workers) == (0, 4)
    assert m.worker_bytes == 1.5 * GIB + 102_790_784
    wide = host_memory(_cfg(tmp_path, "rollout.tensor_parallel=2"), nodes=2, gpus_per_node=0, cpus_per_node=8,
                       stage="run")
    assert (wide.learners, wide.workers) == (2, 4)  # ERPO: everything on node 0


def test_describe_says_how_it_adds_up():
    m = HostMemory(learners=8, workers=0, learner_bytes=18 * GIB, worker_bytes=0)
    assert m.describe() == "Ray + driver 2.0 + 8 learner(s) x 18.0 = 146.0 GiB per node"
    assert m.slurm_mem() == "146G"


def test_an_asynchronous_checkpoint_adds_its_host_copy(tmp_path):
    """Each learner copies its checkpoint files to host memory: 12P / W of optimizer partition
    (fp32 weights, Adam m and v), and under ZeRO-1/2 rank 0 the whole fp32 module (4P) once."""
    kw = dict(nodes=1, gpus_per_node=0, cpus_per_node=4, stage="sft")
    sync = host_memory(_cfg(tmp_path), **kw)
    z2 = host_memory(_cfg(tmp_path, "checkpoint.async_save=true"), **kw)
    assert z2.learners == 2 and z2.learner_bytes == sync.learner_bytes + 12 * P / 2
    assert z2.once_bytes == 4 * P and z2.per_node == sync.per_node + 2 * 12 * P / 2 + 4 * P
    assert "asynchronous checkpoint copy" in z2.describe()
    z3 = host_memory(_cfg(tmp_path, "checkpoint.async_save=true", "learner.zero_stage=3"), **kw)
    sync3 = host_memory(_cfg(tmp_path, "learner.zero_stage=3"), **kw)
    assert z3.learner_bytes == sync3.learner_bytes + (12 + 4) * P / 2 and z3.once_bytes == 0
