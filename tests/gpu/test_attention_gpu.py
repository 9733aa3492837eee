"""The real CUDA attention paths: PyTorch varlen flash kernel vs SDPA, and a bf16 train step."""

from __future__ import annotations

import pytest
import torch

from safer_dist.train import attention
from safer_dist.train.attention import resolve_attn_implementation
from safer_dist.train.models import init_model, load_model, load_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEQ_LENS = (37, 130, 5, 64)


def _packed(seqs):
    input_ids = torch.tensor([sum(seqs, [])], device="cuda")
    position_ids = torch.tensor([[p for s in seqs for p in range(len(s))]], device="cuda")
    return input_ids, position_ids


@pytest.fixture(scope="module")
def sequences(tiny_model_dir):
    vocab = len(load_tokenizer(tiny_model_dir))
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in SEQ_LENS]


@pytest.mark.skipif(not attention.torch_varlen_available(), reason="torch without varlen_attn")
def test_varlen_packed_equals_sdpa_per_sequence(tiny_model_dir, sequences, monkeypatch):
    calls = []
    real_kernel = attention._varlen_kernel
    monkeypatch.setattr(attention, "_varlen_kernel", lambda *a, **k: calls.append(1) or real_kernel(*a, **k))
    varlen = load_model(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="safer_varlen", device="cuda")
    sdpa = load_model(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device="cuda")
    input_ids, position_ids = _packed(sequences)
    with torch.no_grad():
        packed = varlen(input_ids=input_ids, position_ids=position_ids).logits[0].float()
        alone = torch.cat([sdpa(input_ids=torch.tensor([s], device="cuda")).logits[0] for s in sequences]).float()
    assert len(calls) == varlen.config.num_hidden_layers  # the kernel ran, not the fallback
    torch.testing.assert_close(packed, alone, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not attention.torch_varlen_available(), reason="torch without varlen_attn")
def test_varlen_gqa_tiny_preset_bf16(tmp_path, tiny_model_dir, sequences):
    """bench-style GQA shapes (4 query heads, 2 kv heads) through the real kernel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register_varlen_attention()
    config = LlamaConfig(
        vocab_size=300, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    seqs = [[t % 300 for t in s] for s in sequences]
    input_ids, position_ids = _packed(seqs)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([s], device="cuda")).logits[0] for s in seqs]).float()
        model.set_attn_implementation("safer_varlen")
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0].float()
    torch.testing.assert_close(packed, alone, atol=3e-2, rtol=3e-2)


def test_auto_forward_backward_tiny_bf16(tmp_path, tiny_model_dir, sequences):
    tokenizer = load_tokenizer(tiny_model_dir)
    path = init_model("tiny", tokenizer, tmp_path / "tiny")
    model = load_model(path, dtype=torch.bfloat16, attn_implementation="auto", device="cuda")
    assert model.config._attn_implementation == resolve_attn_implementation("auto", "cuda")
    assert model.config._attn_implementation != "eager"
    model.train()
    input_ids, position_ids = _packed(sequences)
    out = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
