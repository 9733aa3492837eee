"""The chunked linear + cross-entropy path equals the full-logits one and never holds [T, V]."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from safer_dist.train.lm_head import LMHead, head_scale
from safer_dist.train.losses import (
    IGNORE_INDEX,
    chunked_token_logprobs,
    sequence_logprobs,
    sft_loss,
    sum_by_sequence,
    token_logprobs,
)

B, T, H, V = 2, 13, 8, 50


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 6:8] = IGNORE_INDEX  # a boundary between packed sequences
    return hidden, weight, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 5, T * B, 1000])  # 3, 5 do not divide 21 labelled tokens; 1000 > T
def test_token_logprobs_and_gradients_equal_full_logits(chunk):
    hidden, weight, labels = _inputs()
    full, full_mask = token_logprobs(hidden @ weight.T, labels)
    chunked, mask = chunked_token_logprobs(hidden, weight, labels, chunk)
    assert torch.equal(mask, full_mask) and chunked.dtype == torch.float32
    _close(chunked, full)
    assert (chunked[~mask] == 0).all()
    # An arbitrary upstream gradient reaches hidden states and weight as through full logits.
    w = torch.randn(B, T - 1, generator=torch.Generator().manual_seed(1))
    for a, b in zip(_grads((chunked * w).sum(), hidden, weight), _grads((full * w).sum(), hidden, weight)):
        _close(a, b)


@pytest.mark.parametrize("chunk", [4, 64])
def test_sft_loss_and_sequence_logprobs_equal_full_logits(chunk):
    hidden, weight, labels = _inputs(2)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())  # 21 labelled next tokens
    logp, mask = chunked_token_logprobs(hidden, weight, labels, chunk)
    full = sft_loss(hidden @ weight.T, labels, n)
    _close(-logp.sum() / n, full)
    for a, b in zip(_grads(-logp.sum() / n, hidden, weight), _grads(full, hidden, weight)):
        _close(a, b)
    # Step-DPO's per-sequence sums over a packed row of three sequences.
    seq_ids = torch.tensor([[0] * 5 + [1] * 3 + [2] * 5])
    sums, counts = sum_by_sequence(*chunked_token_logprobs(hidden[:1], weight, labels[:1], chunk), seq_ids, 3)
    full_sums, full_counts = sequence_logprobs(hidden[:1] @ weight.T, labels[:1], seq_ids, 3)
    _close(sums, full_sums)
    assert torch.equal(counts, full_counts)
    coef = torch.tensor([1.0, -2.0, 0.5])
    for a, b in zip(_grads((sums * coef).sum(), hidden, weight), _grads((full_sums * coef).sum(), hidden, weight)):
        _close(a, b)


def test_no_labelled_token_gives_zero_logprobs_and_zero_gradients():
    hidden, weight, _ = _inputs()
    labels = torch.full((B, T), IGNORE_INDEX)
    logp, mask = chunked_token_logprobs(hidden, weight, labels, 4)
    assert not mask.any() and torch.equal(logp, torch.zeros(B, T - 1))
    gh, gw = _grads(-logp.sum(), hidden, weight)
    assert torch.equal(gh, torch.zeros_like(hidden)) and torch.equal(gw, torch.zeros_like(weight))


def test_bf16_gradients_keep_their_dtype_and_track_fp32():
    hidden, weight, labels = _inputs(3)
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    logp, _ = chunked_token_logprobs(h16, w16, labels, 4)
    gh, gw = _grads(logp.sum(), h16, w16)
    assert logp.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    ref = _grads(chunked_token_logprobs(hidden, weight, labels, 4)[0].sum(), hidden, weight)
    torch.testing.assert_close(gh.float(), ref[0], atol=0.05, rtol=0.05)
    torch.testing.assert_close(gw.float(), ref[1], atol=0.05, rtol=0.05)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (forward and backward), by element count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_path_never_creates_or_saves_a_tokens_by_vocab_tensor():
    b, t, h, v, chunk = 1, 64, 4, 512, 8  # T*V = 32768 >> chunk*V = 4096 > V*H = 2048
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)

    def run(loss_fn):
        saved = []

        def pack(x):
            saved.append(x.numel())
            return x

        with _LargestTensor() as probe, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss_fn().backward()
        return probe.largest, max(saved)

    created, saved = run(lambda: -chunked_token_logprobs(hidden, weight, labels, chunk)[0].sum())
    assert created <= chunk * v and saved <= v * h, (created, saved)
    # The probe does see [T, V] logits when a path makes them.
    created_full, saved_full = run(lambda: -token_logprobs(hidden @ weight.T, labels)[0].sum())
    assert created_full >= (t - 1) * v and saved_full >= (t - 1) * v


# -- through a model --------------------------------------------------------------------------

def _packed_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = (9, 6, 11)
    input_ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = input_ids.clone()
    labels[0, :3] = IGNORE_INDEX
    labels[0, 9:11] = IGNORE_INDEX
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "seq_ids": seq_ids}


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _close_model_grads(model, a, b):
    # Gradients of every parameter, after a few layers of backward where the order of summation
    # differs (the tied embedding adds its lookup and projection gradients in another order).
    for x, y in zip(_param_grads(model, a), _param_grads(model, b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def _assert_paths_agree(model, chunk: int = 5):
    batch = _packed_batch(model.config.vocab_size)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    full, chunked = LMHead(model, 0, "cpu"), LMHead(model, chunk, "cpu")
    assert full.mode == "full" and chunked.mode == "chunked"
    a, b = chunked.sft_loss(model, batch, n), full.sft_loss(model, batch, n)
    _close(a, b)
    _close_model_grads(model, a, b)
    sums, _ = sum_by_sequence(*chunked.token_logprobs(model, batch), batch["seq_ids"], 3)
    ref, _ = sum_by_sequence(*full.token_logprobs(model, batch), batch["seq_ids"], 3)
    _close(sums, ref)
    _close_model_grads(model, sums.sum(), ref.sum())


def test_lm_head_matches_model_logits_on_tiny_llama(tiny_model_dir):
    from safer_dist.train.models import load_model

    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="safer_segments")
    assert model.config.tie_word_embeddings and head_scale(model) == (1.0, "")
    _assert_paths_agree(model)
    # The patched forwards are gone afterwards: a plain call gives logits again.
    assert "forward" not in model.__dict__ and "forward" not in model.get_output_embeddings().__dict__
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_logit_scale_is_applied_and_softcapping_falls_back():
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    small = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    cohere = CohereForCausalLM(CohereConfig(logit_scale=0.25, **small))
    assert head_scale(cohere) == (0.25, "")
    _assert_paths_agree(cohere)
    gemma2 = Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=30.0, head_dim=8, **small))
    scale, why = head_scale(gemma2)
    assert scale is None and "softcapping" in why
    assert LMHead(gemma2, 4096, "cpu").mode == "full"
