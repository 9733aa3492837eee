"""Decode-step attention with each prefix's KV stored once: equal to attention over per-row
copies of the prefix, for grouped-query heads, ragged groups and left padding; the model's own
attention is restored after sampling; a grouped-query model samples what ``generate`` does."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from safer_dist.rollout.decode import SHARED_PREFIX_NAME, _attention_implementation, shared_prefix_attention
from safer_dist.rollout.sampling import sample_candidates
from safer_dist.train.models import load_tokenizer
from safer_dist.train.sft_data import encode_prompt


def _copied_prefix_reference(query, own_k, own_v, prefix_k, prefix_v, groups, mask, scaling):
    """SDPA per row over ``[its group's prefix, its own tokens]`` with the prefix copied into the row."""
    rep = query.shape[1] // own_k.shape[1]
    keys = torch.cat([prefix_k[groups], own_k], dim=2).repeat_interleave(rep, dim=1)
    values = torch.cat([prefix_v[groups], own_v], dim=2).repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None, None, :], scale=scaling)
    return out.transpose(1, 2)  # [B, 1, H, D]


# Ragged groups: group 0 keeps slots 0 and 2, group 1 all three, group 2 only slot 1 (rows that
# ended left the batch while their siblings go on); and every group with all its rows.
RAGGED = [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (2, 1)]
FULL = [(g, s) for g in range(3) for s in range(3)]


@pytest.mark.parametrize("placed", [RAGGED, FULL], ids=["ragged", "full"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3)])
def test_equals_attention_over_copied_prefixes(heads, kv_heads, placed):
    torch.manual_seed(0)
    d, width, prefix_len, own_len = 8, 3, 7, 5
    groups = torch.tensor([g for g, _ in placed])
    rows = len(placed)
    prefix_k, prefix_v = torch.randn(2, 3, kv_heads, prefix_len, d).unbind(0)
    own_k, own_v = torch.randn(2, rows, kv_heads, own_len, d).unbind(0)
    query = torch.randn(rows, heads, 1, d)
    pmask = torch.ones(3, prefix_len, dtype=torch.bool)
    pmask[0, :2] = False  # shorter prefixes are left-padded
    pmask[2, :4] = False
    smask = torch.ones(rows, own_len, dtype=torch.bool)
    smask[3, :3] = False  # a row that joined later has fewer own tokens
    step_mask = torch.cat([pmask[groups], smask], dim=1)
    batch = SimpleNamespace(prefix=[None, (prefix_k, prefix_v)], width=width,
                            slot=torch.tensor([g * width + s for g, s in placed]), step_mask=step_mask)
    got, weights = shared_prefix_attention(SimpleNamespace(layer_idx=1), query, own_k, own_v, None, scaling=0.3,
                                           safer_shared_prefix=batch)
    want = _copied_prefix_reference(query, own_k, own_v, prefix_k, prefix_v, groups, step_mask, 0.3)
    assert weights is None and got.shape == (rows, 1, heads, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Masked columns do not count: garbage there changes nothing.
    prefix_k[0, :, :2], own_k[3, :, :3] = 1e4, -1e4
    again, _ = shared_prefix_attention(SimpleNamespace(layer_idx=1), query, own_k, own_v, None, scaling=0.3,
                                       safer_shared_prefix=batch)
    torch.testing.assert_close(again, got, atol=1e-5, rtol=1e-5)


def test_refuses_calls_outside_sampling_and_unsupported_options():
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="only inside candidate sampling"):
        shared_prefix_attention(SimpleNamespace(layer_idx=0), q, q, q, None)
    batch = SimpleNamespace(prefix=[(q, q)], width=1, slot=torch.tensor([0]),
                            step_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="softcap"):
        shared_prefix_attention(SimpleNamespace(layer_idx=0), q, q, q, None, softcap=30.0, safer_shared_prefix=batch)


def test_the_models_attention_is_restored(tiny_model_dir):
    from safer_dist.train.models import load_model

    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with pytest.raises(KeyError):
        with _attention_implementation(model, SHARED_PREFIX_NAME):
            assert model.config._attn_implementation == SHARED_PREFIX_NAME
            raise KeyError("a failure inside a decode step")
    assert model.config._attn_implementation == "sdpa"
    tok = load_tokenizer(tiny_model_dir)
    sample_candidates(model, tok, [encode_prompt(tok, "tax")], 2, max_new_tokens=3, temperature=1.0)
    assert model.config._attn_implementation == "sdpa"


def test_grouped_query_model_samples_what_generate_does(tiny_model_dir):
    """A model with 4 query heads over 2 KV heads: greedy candidates equal ``generate`` on each
    prefix alone, and seeded samples do not depend on prefix sharing or batch size."""
    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    prefixes = [encode_prompt(tok, p) for p in ("bake bread", "How do I write a poem about code?", "tax")]
    greedy = sample_candidates(model, tok, prefixes, 2, max_new_tokens=8, temperature=0.0, batch_rows=4)
    for prefix, cands in zip(prefixes, greedy):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prefix]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = alone[0, len(prefix):].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert [c["text"] for c in cands] == [tok.decode(new, skip_special_tokens=False)] * 2
    kw = dict(max_new_tokens=10, temperature=1.0, seed=3, stop_strings=["e"])
    ref = sample_candidates(model, tok, prefixes, 3, **kw)
    assert len({c["num_tokens"] for cs in ref for c in cs}) >= 3  # rows of one prefix end apart
    assert sample_candidates(model, tok, prefixes, 3, **kw, batch_rows=5, reuse_prefix=False) == ref
    assert sample_candidates(model, tok, prefixes, 3, **kw, batch_rows=3) == ref
    # 5 rows: a prefix joins as soon as one row ends, so the batch holds prefixes with fewer rows.
    assert sample_candidates(model, tok, prefixes, 3, **kw, batch_rows=5) == ref
