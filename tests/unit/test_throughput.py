"""Tokens/s and MFU arithmetic, the peak table, and the non-embedding parameter count."""

from __future__ import annotations

import math

import pytest

from safer_dist.train.throughput import Throughput, device_peak_flops, mfu, non_embedding_params, peak_tflops_of


def test_mfu_by_hand():
    # 2 learners at 1 TFLOP/s each; 5,000 tokens in 2 s = 2,500 tokens/s;
    # 6 * 1e6 params * 2,500 tokens/s = 1.5e10 FLOP/s of 2e12 -> 0.0075.
    speed = Throughput([{"num_params_non_embedding": 1_000_000, "peak_flops": 1e12}] * 2)(5000, 2.0)
    assert speed["tokens_per_s"] == 2500.0
    assert math.isclose(speed["mfu"], 0.0075, rel_tol=1e-12)
    assert math.isclose(mfu(1_000_000, 2500.0, 2e12), 0.0075, rel_tol=1e-12)
    # H100 SXM: a 1.1B model at 19,500 tokens/s on one device -> 6*1.1e9*19.5e3/989e12 = 0.13014
    assert math.isclose(mfu(1_100_000_000, 19_500, 989e12), 0.1301314459, rel_tol=1e-9)


def test_mfu_with_adapters_by_hand():
    # LoRA: forward 2N, backward 2N (input gradients) + 2T (weight gradients of the T trained
    # parameters only): (4 * 1e6 + 2 * 5e4) * 2500 tokens/s / 2e12 = 4.1e6 * 2500 / 2e12 = 0.005125
    infos = [{"num_params_non_embedding": 1_000_000, "num_params_trained": 50_000, "peak_flops": 1e12}] * 2
    assert math.isclose(Throughput(infos)(5000, 2.0)["mfu"], 0.005125, rel_tol=1e-12)
    assert math.isclose(mfu(1_000_000, 2500.0, 2e12, num_trained=50_000), 0.005125, rel_tol=1e-12)
    assert mfu(1_000_000, 2500.0, 2e12, num_trained=1_000_000) == mfu(1_000_000, 2500.0, 2e12)


def test_no_mfu_without_a_known_peak():
    # One learner without a peak (CPU, no learner.peak_tflops) leaves MFU out for the group.
    speed = Throughput([{"num_params_non_embedding": 10, "peak_flops": 1e12},
                        {"num_params_non_embedding": 10, "peak_flops": None}])(300, 3.0)
    assert speed == {"tokens_per_s": 100.0}
    assert device_peak_flops("cpu", None) is None
    assert device_peak_flops("cpu", 2.5) == 2.5e12


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("Tesla T4", None),
])
def test_peak_table_by_device_name(name, tflops):
    assert peak_tflops_of(name) == tflops


def test_non_embedding_params_by_hand():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2)
    # Per layer: q, k, v, o 4*8*8 = 256; gate, up, down 3*8*16 = 384; two norms 16 -> 656.
    # Two layers 1312, final norm 8 -> 1320; the 100 x 8 input embedding (a lookup) is left out.
    untied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **cfg))
    assert non_embedding_params(untied) == 1320 + 800  # + the untied output projection
    # Tied: the one 100 x 8 matrix is counted once, as the output projection's matmul.
    tied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **cfg))
    assert non_embedding_params(tied) == 1320 + 800
    assert sum(p.numel() for p in tied.parameters()) == 1320 + 800
