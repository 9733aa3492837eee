"""Attention backend choice, and packed == per-sequence for every backend we train with.

The ``safer_varlen`` kernel is CUDA-only; here its plumbing (cu_seqlens, layouts, GQA) is run
on CPU against a reference kernel with the same signature, and its SDPA fallback (padding,
KV-cache decoding, fp32) is run for real. tests/gpu runs the real kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from safer_dist.train import attention
from safer_dist.train.attention import packed_cu_seqlens, register_varlen_attention, resolve_attn_implementation
from safer_dist.train.models import load_model, load_tokenizer

SEQ_LENS = (7, 13, 5)


# ---------------------------------------------------------------- backend choice


def test_resolve_auto_on_cpu_is_segments():
    assert resolve_attn_implementation("auto", "cpu") == "safer_segments"
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "safer_segments"
    assert resolve_attn_implementation("sdpa", "cpu") == "sdpa"  # still selectable
    assert resolve_attn_implementation("safer_segments", "cuda") == "safer_segments"


@pytest.mark.parametrize(
    ("flash", "varlen", "sm80", "expected"),
    [
        (True, True, True, "flash_attention_2"),
        (True, False, False, "flash_attention_2"),
        (False, True, True, "safer_varlen"),
        (False, True, False, "sdpa"),  # pre-Ampere GPU
        (False, False, True, "sdpa"),  # torch without varlen_attn
    ],
)
def test_resolve_auto_on_cuda(monkeypatch, flash, varlen, sm80, expected):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: varlen)
    monkeypatch.setattr(attention, "_cuda_supports_flash", lambda: sm80)
    assert resolve_attn_implementation("auto", "cuda") == expected
    assert resolve_attn_implementation("auto", "cuda:1") == expected


def test_resolve_explicit_choices_and_errors(monkeypatch):
    assert resolve_attn_implementation("sdpa", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
    assert resolve_attn_implementation("sdpa", "cuda") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        resolve_attn_implementation("flash", "cpu")
    with pytest.raises(ValueError, match="runs only on CUDA"):
        resolve_attn_implementation("safer_varlen", "cpu")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'safer\[gpu\]'"):
        resolve_attn_implementation("flash_attention_2", "cuda")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert resolve_attn_implementation("flash_attention_2", "cuda") == "flash_attention_2"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_attn_implementation("flash_attention_2", "cpu")
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: False)
    with pytest.raises(ValueError, match="torch.nn.attention.varlen"):
        resolve_attn_implementation("safer_varlen", "cuda")


def test_register_is_idempotent():
    register_varlen_attention()
    register_varlen_attention()
    assert AttentionInterface()["safer_varlen"] is attention.varlen_attention_forward
    assert AttentionInterface()["safer_segments"] is attention.segments_attention_forward
    assert "safer_varlen" in AttentionMaskInterface._global_mapping
    assert "safer_segments" in AttentionMaskInterface._global_mapping


# ---------------------------------------------------------------- cu_seqlens


def test_packed_cu_seqlens_by_hand():
    # three sequences of 3, 2, 4 tokens: starts at 0, 3, 5; total 9
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, max_len = packed_cu_seqlens(pos, 1, 9)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and max_len == 4
    # two rows, no packing: one sequence per row
    cu, max_len = packed_cu_seqlens(None, 2, 6)
    assert cu.tolist() == [0, 6, 12] and max_len == 6
    # two rows, each packed; a row boundary always starts a sequence even if positions continue
    pos = torch.tensor([[0, 1, 0, 1, 2], [2, 3, 4, 0, 1]])
    cu, max_len = packed_cu_seqlens(pos, 2, 5)
    assert cu.tolist() == [0, 2, 5, 8, 10] and max_len == 3
    # position_ids broadcast from [1, T]
    cu, _ = packed_cu_seqlens(torch.arange(4)[None], 3, 4)
    assert cu.tolist() == [0, 4, 8, 12]


# ---------------------------------------------------------------- packed == per sequence


@pytest.fixture(scope="module")
def sequences(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    text = "<ex_ante>\n<assessment>Intent: bake bread. Risk category: C03.</assessment>\nSure, here is how."
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) >= max(SEQ_LENS)
    return [ids[i : i + n] for i, n in zip((0, 2, 4), SEQ_LENS)]


def _packed(seqs):
    input_ids = torch.tensor([sum(seqs, [])])
    position_ids = torch.tensor([[p for s in seqs for p in range(len(s))]])
    return input_ids, position_ids


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa):
    """Same contract as torch.nn.attention.varlen.varlen_attn, one sequence at a time."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    bounds = cu_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def fake_varlen_kernel(monkeypatch):
    """Route safer_varlen through its kernel path on CPU with a reference kernel."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[3].tolist())
        return _reference_varlen(*args, **kwargs)

    monkeypatch.setattr(attention, "_use_varlen_kernel", lambda q: True)
    monkeypatch.setattr(attention, "_varlen_kernel", kernel)
    return calls


def _model(tiny_model_dir, attn):
    if attn == "safer_varlen":  # not allowed on CPU through load_model; switch after loading
        model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
        model.set_attn_implementation("safer_varlen")
        return model.eval()
    return load_model(tiny_model_dir, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager", "safer_segments", "safer_varlen", "safer_varlen-kernel"])
def test_packed_equals_per_sequence(tiny_model_dir, sequences, attn, request):
    calls = request.getfixturevalue("fake_varlen_kernel") if attn.endswith("-kernel") else None
    model = _model(tiny_model_dir, attn.removesuffix("-kernel"))
    input_ids, position_ids = _packed(sequences)
    with torch.no_grad():
        # no use_cache argument: load_model's config.use_cache=False is what makes this correct
        packed = model(input_ids=input_ids, position_ids=position_ids).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in sequences])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    if calls is not None:
        # 2 layers, one call each, with the boundaries of the packed batch
        assert calls[:2] == [[0, 7, 20, 25]] * 2


def test_sdpa_packing_needs_use_cache_false(tiny_model_dir, sequences):
    """Documents the transformers 5 behaviour behind "always train with use_cache=False"."""
    model = _model(tiny_model_dir, "sdpa")
    input_ids, position_ids = _packed(sequences)
    with torch.no_grad():
        good = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        cached = model(input_ids=input_ids, position_ids=position_ids, use_cache=True).logits
    assert not torch.allclose(good, cached, atol=1e-3)  # sequences attended across boundaries


def _gqa_model(num_layers: int):
    """A random Llama with 4 query heads over 2 kv heads, SEQ_LENS random sequences and their pack."""
    register_varlen_attention()
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    seqs = [torch.randint(0, 50, (n,)).tolist() for n in SEQ_LENS]
    return (model, seqs, *_packed(seqs))


def test_varlen_kernel_path_gqa_and_grads(fake_varlen_kernel):
    """4 query heads over 2 kv heads; gradients match per-sequence SDPA too."""
    model, seqs, input_ids, position_ids = _gqa_model(num_layers=1)

    alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    alone.square().sum().backward()
    ref_grad = model.model.layers[0].self_attn.k_proj.weight.grad.clone()
    model.zero_grad()
    model.set_attn_implementation("safer_varlen")
    packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]
    packed.square().sum().backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.model.layers[0].self_attn.k_proj.weight.grad, ref_grad, atol=1e-4, rtol=1e-4)
    assert fake_varlen_kernel == [[0, 7, 20, 25]]


def test_varlen_padding_and_generation_match_sdpa(tiny_model_dir, sequences, fake_varlen_kernel):
    """Padded batches and KV-cache decoding take the SDPA fallback and agree with sdpa."""
    sdpa, varlen = _model(tiny_model_dir, "sdpa"), _model(tiny_model_dir, "safer_varlen")
    a, b = sequences[0], sequences[1]
    pad = 0
    for side in ("right", "left"):
        rows = [a + [pad] * (len(b) - len(a)), b] if side == "right" else [[pad] * (len(b) - len(a)) + a, b]
        if side == "right":
            mask = torch.tensor([[1] * len(a) + [0] * (len(b) - len(a)), [1] * len(b)])
        else:
            mask = torch.tensor([[0] * (len(b) - len(a)) + [1] * len(a), [1] * len(b)])
        ids = torch.tensor(rows)
        with torch.no_grad():
            want = sdpa(input_ids=ids, attention_mask=mask).logits
            got = varlen(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
        if side == "left":
            gen_kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
            with torch.no_grad():
                want_ids = sdpa.generate(ids, **gen_kwargs)
                got_ids = varlen.generate(ids, **gen_kwargs)
            assert torch.equal(got_ids, want_ids)
    # Unpadded generation: the prefill runs the kernel, each decode step the fallback.
    fake_varlen_kernel.clear()
    ids = torch.tensor([a])
    with torch.no_grad():
        want_ids = sdpa.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        got_ids = varlen.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(got_ids, want_ids)
    assert fake_varlen_kernel == [[0, len(a)]] * 2  # prefill only, once per layer


def test_varlen_rejects_dropout():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="dropout"):
        attention.varlen_attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)


# ---------------------------------------------------------------- safer_segments (the CPU default)


def test_segments_packed_equals_per_sequence_logits_and_grads():
    """Forward and backward of a packed row equal per-sequence SDPA (fp32, within 1e-5), GQA
    (4 query heads over 2 kv heads), and no T x T mask is built: SDPA sees one sequence at a time."""
    model, seqs, input_ids, position_ids = _gqa_model(num_layers=2)

    alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    alone.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation("safer_segments")
    shapes = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2], kwargs.get("attn_mask")))
        return real_sdpa(q, k, v, **kwargs)

    attention.F.scaled_dot_product_attention = spy
    try:
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]
    finally:
        attention.F.scaled_dot_product_attention = real_sdpa
    packed.square().sum().backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    assert shapes == [(n, n, None) for n in SEQ_LENS] * 2  # 2 layers, one call per sequence


def test_segments_padding_and_generation_match_sdpa(tiny_model_dir, sequences):
    """Padded batches and KV-cache decoding take the explicit-mask fallback and agree with sdpa."""
    sdpa, seg = _model(tiny_model_dir, "sdpa"), _model(tiny_model_dir, "safer_segments")
    a, b = sequences[0], sequences[1]
    gap = len(b) - len(a)
    ids = torch.tensor([[0] * gap + a, b])
    mask = torch.tensor([[0] * gap + [1] * len(a), [1] * len(b)])
    with torch.no_grad():
        torch.testing.assert_close(
            seg(input_ids=ids, attention_mask=mask).logits[mask.bool()],
            sdpa(input_ids=ids, attention_mask=mask).logits[mask.bool()], atol=1e-5, rtol=0,
        )
        gen_kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(seg.generate(ids, **gen_kwargs), sdpa.generate(ids, **gen_kwargs))
        one = torch.tensor([a])
        assert torch.equal(
            seg.generate(one, max_new_tokens=5, min_new_tokens=5, do_sample=False),
            sdpa.generate(one, max_new_tokens=5, min_new_tokens=5, do_sample=False),
        )


def test_segments_rejects_dropout():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="dropout"):
        attention.segments_attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)
