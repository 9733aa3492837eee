"""Candidate sampling on CUDA: the packed prefill and the shared-prefix decode attention.

fp32 on the GPU: greedy candidates equal ``generate`` on each prefix alone, and seeded samples
do not depend on prefix sharing; bf16 (what rollout workers run): shared-prefix attention
equals SDPA over per-row copies of the prefix within bf16 tolerance, and sampling from a bf16
model under the model's own CUDA attention (``auto``) runs and restores it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from safer_dist.rollout.decode import shared_prefix_attention
from safer_dist.rollout.sampling import sample_candidates
from safer_dist.train.attention import resolve_attn_implementation
from safer_dist.train.models import load_model, load_tokenizer
from safer_dist.train.sft_data import encode_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ("bake bread", "How do I write a poem about python code, number 7?", "tax")


def test_greedy_equals_generate_and_sharing_changes_no_sample(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa", device="cuda").eval()
    prefixes = [encode_prompt(tok, p) for p in PROMPTS]
    greedy = sample_candidates(model, tok, prefixes, 2, max_new_tokens=10, temperature=0.0, batch_rows=3)
    for prefix, cands in zip(prefixes, greedy):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prefix], device="cuda"), max_new_tokens=10, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = alone[0, len(prefix):].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert [c["text"] for c in cands] == [tok.decode(new, skip_special_tokens=False)] * 2
    kw = dict(max_new_tokens=12, stop_strings=["e"], temperature=1.0, seed=7)
    ref = sample_candidates(model, tok, prefixes, 3, **kw)
    assert sample_candidates(model, tok, prefixes, 3, **kw, batch_rows=5, reuse_prefix=False) == ref


def test_bf16_shared_prefix_attention_matches_copied_prefixes():
    gen = torch.Generator(device="cuda").manual_seed(0)
    g, w, hkv, rep, d, p, s = 8, 4, 4, 8, 64, 300, 40  # tinyllama-like heads: 32 over 4 KV heads
    bf16 = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    pk, pv = torch.randn(g, hkv, p, d, **bf16), torch.randn(g, hkv, p, d, **bf16)
    ok, ov = torch.randn(g * w, hkv, s, d, **bf16), torch.randn(g * w, hkv, s, d, **bf16)
    q = torch.randn(g * w, hkv * rep, 1, d, **bf16)
    mask = torch.ones(g * w, p + s, dtype=torch.bool, device="cuda")
    mask[: w, : p // 3] = False  # the first prefix is shorter (left-padded)
    batch = SimpleNamespace(prefix=[(pk, pv)], width=w, slot=torch.arange(g * w, device="cuda"), step_mask=mask)
    got, _ = shared_prefix_attention(SimpleNamespace(layer_idx=0), q, ok, ov, None, scaling=d**-0.5,
                                     safer_shared_prefix=batch)
    groups = torch.arange(g, device="cuda").repeat_interleave(w)
    keys = torch.cat([pk[groups], ok], dim=2).repeat_interleave(rep, dim=1)
    values = torch.cat([pv[groups], ov], dim=2).repeat_interleave(rep, dim=1)
    want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(got.float(), want.transpose(1, 2), atol=2e-2, rtol=2e-2)


def test_bf16_sampling_under_the_models_cuda_attention(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    impl = resolve_attn_implementation("auto", "cuda")
    model = load_model(tiny_model_dir, dtype=torch.bfloat16, attn_implementation=impl, device="cuda").eval()
    prefixes = [encode_prompt(tok, p) for p in PROMPTS]
    out = sample_candidates(model, tok, prefixes, 4, max_new_tokens=16, temperature=1.0, seed=1, batch_rows=8)
    assert [len(c) for c in out] == [4, 4, 4]
    assert model.config._attn_implementation == impl
