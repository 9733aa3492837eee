"""Attention backend choice, and packed == per-sequence for every backend we train with.

The ``safer_varlen`` kernel is CUDA-only; here its plumbing (cu_seqlens, layouts, GQA, scale)
is run on CPU against reference kernels with each released ``varlen_attn`` signature, written
in plain PyTorch, and its SDPA fallback (padding, KV-cache decoding, fp32) is run for real.
tests/gpu runs the real kernel.
"""

from __future__ import annotations

import functools
import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from safer_dist.train import attention, attention_kernels
from safer_dist.train.attention import resolve_attn_implementation
from safer_dist.train.attention_kernels import packed_cu_seqlens, register_varlen_attention
from safer_dist.train.models import load_model, load_tokenizer

SEQ_LENS = (7, 13, 5)


# ---------------------------------------------------------------- backend choice


def test_resolve_auto_on_cpu_is_segments():
    assert resolve_attn_implementation("auto", "cpu") == "safer_segments"
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "safer_segments"
    assert resolve_attn_implementation("sdpa", "cpu") == "sdpa"  # still selectable
    assert resolve_attn_implementation("safer_segments", "cuda") == "safer_segments"


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the warn-once state of a fresh process."""
    monkeypatch.setattr(attention_kernels, "_WARNED", set())


@pytest.mark.parametrize(
    ("flash", "varlen", "sm80", "expected"),
    [
        (True, True, True, "flash_attention_2"),
        (True, False, False, "flash_attention_2"),
        (False, True, True, "safer_varlen"),
        (False, True, False, "safer_segments"),  # pre-Ampere GPU
        (False, False, True, "safer_segments"),  # torch without varlen_attn
    ],
)
def test_resolve_auto_on_cuda(monkeypatch, flash, varlen, sm80, expected):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash)
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: kernel_window if varlen else None)
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
    with pytest.raises(ValueError, match="pip install flash-attn --no-build-isolation"):
        resolve_attn_implementation("flash_attention_2", "cuda")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert resolve_attn_implementation("flash_attention_2", "cuda") == "flash_attention_2"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_attn_implementation("flash_attention_2", "cpu")
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: None)
    with pytest.raises(ValueError, match=r"torch .* has no torch.nn.attention.varlen.varlen_attn"):
        resolve_attn_implementation("safer_varlen", "cuda")
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: kernel_no_causal)
    with pytest.raises(ValueError, match="neither window_size nor is_causal"):
        resolve_attn_implementation("safer_varlen", "cuda")


def test_register_is_idempotent():
    register_varlen_attention()
    register_varlen_attention()
    assert AttentionInterface()["safer_varlen"] is attention_kernels.varlen_attention_forward
    assert AttentionInterface()["safer_segments"] is attention_kernels.segments_attention_forward
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


# Reference kernels with each signature torch.nn.attention.varlen.varlen_attn has had; like the
# real kernel, those without enable_gqa reject key/value with fewer heads than the query.


def _per_sequence(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, scale=None, gqa=False):
    """Packed ``[T, H, D]`` attention, SDPA once per sequence of ``cu_q``."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    bounds = cu_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    if k.shape[1] != q.shape[1] and not gqa:
        raise RuntimeError(f"varlen_attn: key has {k.shape[1]} heads, query {q.shape[1]}")
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def kernel_window_gqa(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None,
):  # fmt: skip
    """torch 2.12+ (enable_gqa)."""
    assert window_size in ((-1, -1), (-1, 0)) and isinstance(window_size, tuple) and return_aux is None
    return _per_sequence(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=window_size == (-1, 0), scale=scale, gqa=enable_gqa
    )


def kernel_window(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    """torch 2.11: scale and window_size, no enable_gqa."""
    assert window_size in ((-1, -1), (-1, 0)) and isinstance(window_size, tuple) and return_aux is None
    causal = window_size == (-1, 0)
    return _per_sequence(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=causal, scale=scale)


def kernel_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The first releases: is_causal, no scale (always head_dim ** -0.5), no enable_gqa."""
    assert return_aux is None
    return _per_sequence(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


def kernel_no_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
    """A kernel that cannot express causal attention: never usable."""
    raise AssertionError("must not be called")


KERNELS = [kernel_window_gqa, kernel_window, kernel_is_causal]


def _recording(kernel, calls):
    """``kernel`` with its signature (functools.wraps), appending (cu_seqlens, q heads, kv heads) per call."""

    @functools.wraps(kernel)
    def wrapper(*args, **kwargs):
        calls.append((args[3].tolist(), args[0].shape[1], args[1].shape[1]))
        return kernel(*args, **kwargs)

    return wrapper


@pytest.fixture
def fake_varlen_kernel(monkeypatch):
    """Route safer_varlen through its kernel path on CPU with a reference kernel."""
    calls = []
    kernel = _recording(kernel_window_gqa, calls)
    monkeypatch.setattr(attention_kernels, "_use_varlen_kernel", lambda q: True)
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: kernel)
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
        assert [c[0] for c in calls[:2]] == [[0, 7, 20, 25]] * 2


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


def test_varlen_api_read_from_signature():
    read = attention_kernels._read_varlen_api
    assert read(kernel_window_gqa) == attention_kernels.VarlenApi("window_size", takes_scale=True, takes_gqa=True)
    assert read(kernel_window) == attention_kernels.VarlenApi("window_size", takes_scale=True, takes_gqa=False)
    assert read(kernel_is_causal) == attention_kernels.VarlenApi("is_causal", takes_scale=False, takes_gqa=False)
    assert "neither window_size nor is_causal" in read(kernel_no_causal)
    # the pinned CPU torch (2.13) has the newest signature
    assert attention_kernels.varlen_api() == attention_kernels.VarlenApi("window_size", takes_scale=True, takes_gqa=True)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_varlen_kernel_signatures_gqa_logits_and_grads(monkeypatch, kernel):
    """4 query heads over 2 kv heads through each kernel signature: logits and every gradient of a
    2-layer model equal per-sequence SDPA within 1e-5 (fp32). Kernels without enable_gqa get kv
    heads repeated to 4; the signature is read once, not per call."""
    calls, reads = [], []
    fresh = _recording(kernel, calls)  # a new object: nothing cached for it yet
    real_signature = inspect.signature

    def spy_signature(f, *args, **kwargs):
        if f is fresh:
            reads.append(f)
        return real_signature(f, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", spy_signature)
    monkeypatch.setattr(attention_kernels, "_use_varlen_kernel", lambda q: True)
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: fresh)
    model, seqs, input_ids, position_ids = _gqa_model(num_layers=2)

    alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    alone.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation("safer_varlen")
    for _ in range(2):
        model.zero_grad()
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]
        packed.square().sum().backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    kv_heads = 2 if kernel is kernel_window_gqa else 4
    assert calls == [([0, 7, 20, 25], 4, kv_heads)] * 4  # 2 layers x 2 forwards
    assert len(reads) == 1


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_varlen_kernel_signatures_custom_scale(monkeypatch, kernel):
    """A scaling other than head_dim ** -0.5 (0.3 vs 8 ** -0.5 = 0.354): passed as ``scale`` where
    the kernel takes one, else folded into the query; forward and q/k/v gradients equal
    per-sequence SDPA with scale 0.3 within 1e-5."""
    monkeypatch.setattr(attention_kernels, "_use_varlen_kernel", lambda q: True)
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: kernel)
    torch.manual_seed(0)
    total = sum(SEQ_LENS)
    q = torch.randn(1, 4, total, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, total, 8, requires_grad=True) for _ in range(2))
    position_ids = _packed([[0] * n for n in SEQ_LENS])[1]
    out, _ = attention_kernels.varlen_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=0.3, position_ids=position_ids
    )
    out.square().sum().backward()
    got = (out.detach(), q.grad, k.grad, v.grad)

    q.grad = k.grad = v.grad = None
    cu = torch.tensor([0, 7, 20, 25], dtype=torch.int32)
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]  # [T, H, D]
    ref = _per_sequence(*flat, cu, cu, 13, 13, causal=True, scale=0.3, gqa=True)[None]  # [1, T, H, D]
    ref.square().sum().backward()
    for a, b in zip(got, (ref.detach(), q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


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
    assert [c[0] for c in fake_varlen_kernel] == [[0, len(a)]] * 2  # prefill only, once per layer


# ---------------------------------------------------------------- no silent dense mask on CUDA


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if " W " in line]


@pytest.mark.parametrize(
    ("kernel", "reason"),
    [
        (None, r"torch \S+ has no torch.nn.attention.varlen.varlen_attn"),
        (kernel_no_causal, "neither window_size nor is_causal"),
    ],
)
def test_auto_on_cuda_without_varlen_picks_segments_and_warns_once(monkeypatch, capsys, kernel, reason):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: kernel)
    assert [resolve_attn_implementation("auto", "cuda") for _ in range(3)] == ["safer_segments"] * 3
    (warning,) = _warnings(capsys)
    assert re.search(reason, warning) and "dense" in warning and "safer_segments" in warning
    assert resolve_attn_implementation("auto", "cpu") == "safer_segments"
    assert _warnings(capsys) == []  # CPU: safer_segments is simply the default


def test_explicit_dense_backends_on_cuda_warn_once(capsys):
    for _ in range(2):
        assert resolve_attn_implementation("sdpa", "cuda") == "sdpa"
        assert resolve_attn_implementation("eager", "cuda") == "eager"
        assert resolve_attn_implementation("sdpa", "cpu") == "sdpa"
    warnings = _warnings(capsys)
    assert len(warnings) == 2 and all("dense" in w for w in warnings)
    assert "'sdpa' on CUDA" in warnings[0] and "'eager' on CUDA" in warnings[1]


def test_dense_fallback_of_a_packed_cuda_row_warns_once(monkeypatch, capsys):
    """A packed row with a padding mask takes the explicit-mask SDPA fallback: still correct,
    and on CUDA (simulated) it says so once. An unpacked padded batch does not warn."""
    monkeypatch.setattr(attention_kernels, "_is_cuda", lambda t: True)
    torch.manual_seed(0)
    total = sum(SEQ_LENS)
    q, k, v = (torch.randn(1, 2, total, 8) for _ in range(3))
    position_ids = _packed([[0] * n for n in SEQ_LENS])[1]
    mask = torch.ones(1, total, dtype=torch.bool)
    for _ in range(2):
        out, _ = attention_kernels.segments_attention_forward(torch.nn.Module(), q, k, v, mask, position_ids=position_ids)
    cu = torch.tensor([0, 7, 20, 25], dtype=torch.int32)
    want = _per_sequence(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, cu, 13, 13, causal=True)
    torch.testing.assert_close(out[0], want, atol=1e-5, rtol=0)
    (warning,) = _warnings(capsys)
    assert "packed CUDA batch with a padding mask" in warning and "dense" in warning
    attention_kernels._WARNED.clear()
    attention_kernels.segments_attention_forward(torch.nn.Module(), q, k, v, mask, position_ids=torch.arange(total)[None])
    assert _warnings(capsys) == []


def test_varlen_without_kernel_on_cuda_runs_segments_and_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(attention_kernels, "_use_varlen_kernel", lambda q: True)
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: None)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, sum(SEQ_LENS), 8) for _ in range(3))
    position_ids = _packed([[0] * n for n in SEQ_LENS])[1]
    for _ in range(2):
        out, _ = attention_kernels.varlen_attention_forward(torch.nn.Module(), q, k, v, None, position_ids=position_ids)
    want, _ = attention_kernels.segments_attention_forward(torch.nn.Module(), q, k, v, None, position_ids=position_ids)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    (warning,) = _warnings(capsys)
    assert "has no torch.nn.attention.varlen.varlen_attn" in warning


def test_varlen_rejects_dropout():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="dropout"):
        attention_kernels.varlen_attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)


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

    F.scaled_dot_product_attention = spy  # the module object every kernel calls through
    try:
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]
    finally:
        F.scaled_dot_product_attention = real_sdpa
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
        attention_kernels.segments_attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)
