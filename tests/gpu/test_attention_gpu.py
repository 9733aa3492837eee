"""The real CUDA attention paths: PyTorch varlen flash kernel vs SDPA, and a bf16 train step.

Written for every torch with ``torch.nn.attention.varlen`` (2.11 has no ``enable_gqa``: GQA then
runs with repeated KV heads); without it the varlen tests skip and ``auto`` is checked to pick
``safer_segments``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from safer_dist.train import attention_kernels
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


def _count_kernel_calls(monkeypatch) -> list:
    """Record (q heads, kv heads) of every real kernel call; the wrapper keeps the kernel's
    signature (functools.wraps), which is what safer_varlen reads."""
    calls = []
    real_kernel = attention_kernels._varlen_kernel()

    @functools.wraps(real_kernel)
    def counting(*args, **kwargs):
        calls.append((args[0].shape[1], args[1].shape[1]))
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: counting)
    return calls


def test_varlen_api_detected():
    api, reason = attention_kernels.varlen_api(), attention_kernels.varlen_unavailable_reason()
    assert (api is None) == (reason is not None)
    if api is None:
        assert resolve_attn_implementation("auto", "cuda") in ("flash_attention_2", "safer_segments")


@pytest.mark.skipif(not attention_kernels.torch_varlen_available(), reason="torch without varlen_attn")
def test_varlen_packed_equals_sdpa_per_sequence(tiny_model_dir, sequences, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    varlen = load_model(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="safer_varlen", device="cuda")
    sdpa = load_model(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device="cuda")
    input_ids, position_ids = _packed(sequences)
    with torch.no_grad():
        packed = varlen(input_ids=input_ids, position_ids=position_ids).logits[0].float()
        alone = torch.cat([sdpa(input_ids=torch.tensor([s], device="cuda")).logits[0] for s in sequences]).float()
    assert len(calls) == varlen.config.num_hidden_layers  # the kernel ran, not the fallback
    torch.testing.assert_close(packed, alone, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not attention_kernels.torch_varlen_available(), reason="torch without varlen_attn")
def test_varlen_with_layout_equals_derived_boundaries(tiny_model_dir, sequences, monkeypatch):
    """The batch's PackedLayout (built on the host, as the learner does) passed to the real kernel:
    logits and gradients equal those of the per-layer derivation from position_ids (the same
    kernel on the same boundaries; gradients up to the kernel's own run-to-run order), and no layer
    derives boundaries."""
    from safer_dist.train.tree_attention import packed_layout

    calls = _count_kernel_calls(monkeypatch)
    derived_calls = []
    real_cu = attention_kernels.packed_cu_seqlens
    monkeypatch.setattr(attention_kernels, "packed_cu_seqlens", lambda *a: derived_calls.append(1) or real_cu(*a))
    model = load_model(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="safer_varlen", device="cuda")
    input_ids, position_ids = _packed(sequences)
    results = []
    for kwargs in ({}, packed_layout(position_ids.cpu()).to("cuda").model_kwargs()):
        model.zero_grad()
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).logits
        logits.float().square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers and len(derived_calls) == layers  # only the forward without the layout
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):  # flash backward may accumulate in another order
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-2)


@pytest.mark.skipif(not attention_kernels.torch_varlen_available(), reason="torch without varlen_attn")
def test_varlen_gqa_tiny_preset_bf16(tmp_path, tiny_model_dir, sequences, monkeypatch):
    """bench-style GQA shapes (4 query heads, 2 kv heads) through the real kernel: with
    enable_gqa where this torch has it, else with the kv heads repeated to 4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    calls = _count_kernel_calls(monkeypatch)
    attention_kernels.register_varlen_attention()
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
    kv_heads = 2 if attention_kernels.varlen_api().takes_gqa else 4
    assert calls == [(4, kv_heads)] * 2  # the kernel ran in both layers, not the fallback


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


def _tree_batches(sequences):
    """Pairs (context, chosen, rejected) cut from ``sequences``, packed with the context once and twice."""
    from safer_dist.erpo.pairs import pack_pairs

    enc = [{"ctx": s[: len(s) // 2], "chosen": s[len(s) // 2 :], "rejected": s[len(s) // 2 :][::-1][:7],
            "ref_chosen": 0.0, "ref_rejected": 0.0} for s in sequences]
    return [{k: v.cuda() for k, v in pack_pairs(enc, share_prefix=share).items()} for share in (True, False)]


def _tree_logps(model, batch):
    from safer_dist.train.lm_head import LMHead
    from safer_dist.train.losses import sum_by_sequence

    head = LMHead(model, 64, "cuda")
    return sum_by_sequence(*head.token_logprobs(model, batch), batch["seq_ids"], 2 * int(batch["num_pairs"]))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_tree_logprobs_and_grads_equal_unshared(tiny_model_dir, sequences, monkeypatch, dtype):
    """safer_varlen sends a prefix-shared row through compiled flex_attention (fp32 forced onto
    that path too, for a tight comparison): per-sequence log-probs and gradients equal those of
    the unshared packing run by SDPA per sequence (fp32 1e-4; bf16 a few percent)."""
    from safer_dist.train import tree_attention

    calls = []
    real = tree_attention.flex_tree
    monkeypatch.setattr(attention_kernels, "flex_tree", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(attention_kernels, "_use_varlen_kernel", lambda q: True)
    model = load_model(tiny_model_dir, dtype=dtype, attn_implementation="safer_varlen", device="cuda")
    shared_batch, unshared_batch = _tree_batches(sequences)
    results = []
    for batch, attn in ((shared_batch, "safer_varlen"), (unshared_batch, "safer_segments")):
        model.set_attn_implementation(attn)  # the reference: SDPA per sequence (the kernel takes no fp32)
        model.zero_grad()
        logp = _tree_logps(model, batch)
        logp.sum().backward()
        results.append((logp.detach().float(), [p.grad.float().clone() for p in model.parameters()]))
    assert len(calls) == model.config.num_hidden_layers  # the shared row went through flex, once per layer
    (lp_s, g_s), (lp_u, g_u) = results
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(lp_s, lp_u, atol=tol * max(1.0, float(lp_u.abs().max())), rtol=0)
    for a, b in zip(g_s, g_u):
        assert float((a - b).norm()) <= tol * max(float(b.norm()), 1e-6)
