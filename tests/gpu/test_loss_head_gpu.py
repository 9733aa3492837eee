"""The learner's loss head on CUDA in bf16: the chunked linear + cross-entropy (and liger-kernel's
fused one, where installed) give the SFT loss and gradients of full logits, in less memory.

The model is a random Llama with TinyLlama's hidden size (2048) and vocabulary (32000), one
layer, on one sequence of 4096 tokens: the full-logits path holds [4095, 32000] fp32 logits
(524 MB), the chunked path [1024, 32000] at a time.

Tolerances, with u = 2^-8 (bf16's unit roundoff: 8 significant bits):
- loss: both paths round the same fp32-accumulated products to bf16 logits (possibly in other
  cuBLAS kernels, so a logit may land one rounding apart) and take the log-softmax in fp32; a
  relative change of at most u in some logits moves the mean NLL by less than u relative.
- gradients, compared by norm (single entries cancel to near zero, where a relative test means
  nothing): full logits accumulate the LM head's weight gradient in one matmul and round once;
  a path of k chunks adds k bf16-rounded partial sums, a recursive sum of k terms whose error is
  at most about k u relative. So ||g - g_full|| <= (k + 1) u ||g_full||. The body's gradients are
  linear in the hidden states' gradient, which differs by about u per entry, and stay within
  the same bound. liger-kernel also scales both gradients by the loss's upstream gradient in
  bf16 (one more rounding): (k + 2) u.
"""

from __future__ import annotations

import math

import pytest
import torch

from safer_dist.train import lm_head
from safer_dist.train.lm_head import LMHead
from safer_dist.train.losses import IGNORE_INDEX

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HIDDEN, VOCAB, TOKENS, CHUNK = 2048, 32000, 4096, 1024
U = 2.0**-8


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=2048, vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=TOKENS,
        attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).train()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (1, TOKENS), generator=g)
    labels = input_ids.clone()
    labels[0, :96] = IGNORE_INDEX  # a prompt
    labels[0, 2000:2040] = IGNORE_INDEX  # a second sequence's prompt
    return {"input_ids": input_ids.cuda(), "position_ids": torch.arange(TOKENS)[None].cuda(), "labels": labels.cuda()}


def _num_labelled(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # 4095 - 95 - 40 = 3960


def _loss_and_grads(model, head: LMHead, batch):
    loss = head.sft_loss(model, batch, _num_labelled(batch))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), dict(zip(names, grads))


def _assert_matches_full(model, head: LMHead, batch, num_chunks: int, extra_roundings: int = 0):
    full = LMHead(model, 0, "cuda")
    assert full.mode == "full"
    loss, grads = _loss_and_grads(model, head, batch)
    ref_loss, ref_grads = _loss_and_grads(model, full, batch)
    assert ref_loss == pytest.approx(math.log(VOCAB), rel=0.1)  # a random model: about uniform
    assert abs(loss - ref_loss) <= U * ref_loss, (loss, ref_loss)
    tol = (num_chunks + 1 + extra_roundings) * U
    for name, ref in ref_grads.items():
        g = grads[name]
        assert g.dtype == ref.dtype == torch.bfloat16
        err = float((g.float() - ref.float()).norm() / ref.float().norm())
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.2e}"


def test_chunked_head_matches_full_logits_in_bf16(model, batch, monkeypatch):
    monkeypatch.setattr(lm_head, "liger_available", lambda: False)
    head = LMHead(model, CHUNK, "cuda")
    assert head.mode == "chunked"
    # Only labelled positions are projected: 3960 of them in chunks of 1024.
    _assert_matches_full(model, head, batch, num_chunks=math.ceil(_num_labelled(batch) / CHUNK))


@pytest.mark.skipif(not lm_head.liger_available(), reason="liger_kernel is not installed")
def test_liger_head_matches_full_logits_in_bf16(model, batch):
    head = LMHead(model, CHUNK, "cuda")
    assert head.mode == "liger"
    # liger-kernel (0.8) projects every position, in chunks of
    # next_pow2(ceil(T / ceil(V / H))) = next_pow2(ceil(4096 / 16)) = 256 rows: 16 chunks.
    rows_per_chunk = 1 << (math.ceil(TOKENS / math.ceil(VOCAB / HIDDEN)) - 1).bit_length()
    _assert_matches_full(model, head, batch, num_chunks=math.ceil(TOKENS / rows_per_chunk), extra_roundings=1)


def _peak_bytes(model, head: LMHead, batch) -> int:
    """Peak CUDA memory of one forward + backward above what was allocated before it."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    head.sft_loss(model, batch, _num_labelled(batch)).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    model.zero_grad(set_to_none=True)
    return peak


def test_chunked_head_peak_memory_below_full_logits(model, batch, monkeypatch):
    monkeypatch.setattr(lm_head, "liger_available", lambda: False)
    chunked = _peak_bytes(model, LMHead(model, CHUNK, "cuda"), batch)
    full = _peak_bytes(model, LMHead(model, 0, "cuda"), batch)
    fp32_logits = (TOKENS - 1) * VOCAB * 4  # 524,160,000 bytes
    # The full path's log-softmax allocates its fp32 output while its fp32 input exists.
    assert full >= 2 * fp32_logits, full
    # The chunked path's largest temporaries are a few [1024, V] tensors (~0.13 GB each in
    # fp32), so it saves at least one full set of fp32 logits.
    assert full - chunked >= fp32_logits, (chunked, full)
