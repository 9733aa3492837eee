"""A packed batch's sequence boundaries, computed once on the host (``packed_layout``) and passed
to every layer's attention: the same results as deriving them per layer, and no derivation left
in the layers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safer_dist.train import attention_kernels, tree_attention
from safer_dist.train.attention_kernels import register_varlen_attention
from safer_dist.train.lm_head import LMHead
from safer_dist.train.tree_attention import LAYOUT_KWARG, Segment, packed_layout


def test_layout_of_plain_packing_by_hand():
    # sequences of 3, 2 and 4 tokens: starts 0, 3, 5; end 9; longest 4
    layout = packed_layout(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 9] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_seqlen == 4 and not layout.has_branches
    assert layout.segments == (Segment(0, 3), Segment(3, 5), Segment(5, 9))
    kwargs = layout.model_kwargs()
    assert kwargs[LAYOUT_KWARG] is layout
    assert kwargs["cu_seq_lens_q"] is kwargs["cu_seq_lens_k"] is layout.cu_seqlens
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4


def test_layout_of_a_tree_by_hand():
    # context of 4 (positions 0-3) + chosen of 2 (4, 5); the rejected branch repeats the context's
    # last token at 3 and continues 4, 5 (it shares the context's first 3 tokens); then a new sequence
    layout = packed_layout(torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5, 0, 1]]))
    assert layout.segments == (Segment(0, 6), Segment(6, 9, 0, 3), Segment(9, 11))
    assert layout.cu_seqlens.tolist() == [0, 6, 9, 11] and layout.max_seqlen == 6 and layout.has_branches
    # transformers' varlen arguments would make the branch an independent sequence: not passed
    assert set(layout.model_kwargs()) == {LAYOUT_KWARG}


def test_layout_of_two_rows_by_hand():
    # [1, T] position_ids broadcast to 2 rows: every row starts a sequence
    layout = packed_layout(torch.tensor([[0, 1, 0]]), batch_size=2)
    assert layout.cu_seqlens.tolist() == [0, 2, 3, 5, 6] and layout.max_seqlen == 2
    assert (layout.batch_size, layout.seq_len) == (2, 3)


def _model(num_layers=2):
    """A random fp32 Llama, 4 query heads over 2 kv heads, and a pack of 3 sequences (7, 13, 5)."""
    register_varlen_attention()
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         attn_implementation="safer_segments", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    lens = (7, 13, 5)
    input_ids = torch.randint(0, 50, (1, sum(lens)))
    position_ids = torch.tensor([[p for n in lens for p in range(n)]])
    return model, input_ids, position_ids


@pytest.fixture
def derivations(monkeypatch):
    """Counts every derivation of boundaries from position_ids inside the attention functions."""
    counts = {"segments": 0, "cu_seqlens": 0, "trees": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention_kernels, "tree_segments", counting("segments", attention_kernels.tree_segments))
    monkeypatch.setattr(attention_kernels, "packed_cu_seqlens", counting("cu_seqlens", attention_kernels.packed_cu_seqlens))
    monkeypatch.setattr(attention_kernels, "_rows_with_drops", counting("trees", attention_kernels._rows_with_drops))
    return counts


def _logits_and_grads(model, input_ids, position_ids, **kwargs):
    model.zero_grad()
    logits = model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b):
    assert torch.equal(a[0], b[0])
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def test_segments_with_layout_derives_nothing_per_layer(derivations):
    """safer_segments: with the layout passed, logits and gradients are bit-identical to the
    per-layer derivation, and no layer derives boundaries (without it, each of the 2 layers does)."""
    model, input_ids, position_ids = _model()
    derived = _logits_and_grads(model, input_ids, position_ids)
    assert derivations["segments"] == 2
    derivations["segments"] = 0
    given = _logits_and_grads(model, input_ids, position_ids, **packed_layout(position_ids).model_kwargs())
    assert derivations == {"segments": 0, "cu_seqlens": 0, "trees": 0}
    _assert_same(given, derived)


def _recording_kernel(calls):
    def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
               enable_gqa=False):
        """torch 2.12+'s signature, computed per sequence with SDPA."""
        calls.append((cu_seq_q, max_q))
        outs = []
        bounds = cu_seq_q.tolist()
        for a, b in zip(bounds, bounds[1:]):
            q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa)
            outs.append(out.transpose(0, 1))
        return torch.cat(outs)

    return kernel


def test_varlen_kernel_gets_the_layout_boundaries(monkeypatch, derivations):
    """safer_varlen's kernel path (a reference kernel on CPU): with the layout, every layer's kernel
    call receives the layout's own cu_seqlens tensor and max length, nothing is derived per layer,
    and logits and gradients equal the per-layer derivation's bit for bit."""
    calls = []
    monkeypatch.setattr(attention_kernels, "_use_varlen_kernel", lambda q: True)
    monkeypatch.setattr(attention_kernels, "_varlen_kernel", lambda: _recording_kernel(calls))
    model, input_ids, position_ids = _model()
    model.set_attn_implementation("safer_varlen")
    derived = _logits_and_grads(model, input_ids, position_ids)
    assert derivations["cu_seqlens"] == 2 and derivations["trees"] == 2
    derivations.update(cu_seqlens=0, trees=0)
    calls.clear()
    layout = packed_layout(position_ids)
    given = _logits_and_grads(model, input_ids, position_ids, **layout.model_kwargs())
    assert derivations == {"segments": 0, "cu_seqlens": 0, "trees": 0}
    assert len(calls) == 2 and all(cu is layout.cu_seqlens and m == 13 for cu, m in calls)
    _assert_same(given, derived)


def test_varlen_tree_row_goes_to_flex_with_the_layout(monkeypatch, derivations):
    """A tree row under safer_varlen's kernel path goes to flex_tree with the layout (no per-layer
    tree detection); flex_tree is replaced by the per-segment SDPA it must equal."""
    flex_calls = []

    def fake_flex(query, key, value, scaling, position_ids, *, layout=None, compiled=True):
        flex_calls.append(layout)
        return tree_attention.sdpa_tree(query, key, value, scaling, list(layout.segments))

    monkeypatch.setattr(attention_kernels, "_use_varlen_kernel", lambda q: True)
    monkeypatch.setattr(attention_kernels, "flex_tree", fake_flex)
    model, input_ids, _ = _model()
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5, 0, 1]])
    input_ids = input_ids[:, :11]
    layout = packed_layout(position_ids)
    with torch.no_grad():
        model.set_attn_implementation("safer_segments")
        reference = model(input_ids=input_ids, position_ids=position_ids).logits
        model.set_attn_implementation("safer_varlen")
        got = model(input_ids=input_ids, position_ids=position_ids, **layout.model_kwargs()).logits
    assert flex_calls == [layout, layout] and derivations["trees"] == 0
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)


def test_flex_block_mask_built_once_per_layout(monkeypatch):
    """flex_tree builds the block mask of a layout once and reuses it in later layers."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    built = []
    real = tree_attention.token_layout
    monkeypatch.setattr(tree_attention, "token_layout", lambda *a, **k: built.append(1) or real(*a, **k))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5, 0, 1]])
    layout = packed_layout(position_ids)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 16) for _ in range(3))
    with torch.no_grad():
        outs = [tree_attention.flex_tree(q, k, v, None, None, compiled=False, layout=layout) for _ in range(2)]
        ref = tree_attention.sdpa_tree(q, k, v, None, list(layout.segments))
    assert len(built) == 1
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_layout_for_another_batch_is_refused():
    model, input_ids, position_ids = _model()
    other = packed_layout(position_ids[:, :10])
    with pytest.raises(ValueError, match="safer_packed_layout describes a \\[1, 10\\] batch"):
        model(input_ids=input_ids, position_ids=position_ids, **other.model_kwargs())


def test_lm_head_passes_the_layout(derivations):
    """LMHead (the learner's loss head, chunked and full): with the layout, token log-probs equal
    those derived per layer bit for bit, and no layer derives boundaries."""
    model, input_ids, position_ids = _model()
    labels = input_ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    layout = packed_layout(position_ids)
    for chunk in (4, 0):  # chunked, full logits
        head = LMHead(model, chunk, "cpu")
        with torch.no_grad():
            derived = head.token_logprobs(model, batch)[0]
            derivations["segments"] = 0
            given = head.token_logprobs(model, batch, layout)[0]
            loss = head.sft_loss(model, batch, torch.tensor(22.0), layout)  # a 0-d fp32 count: as a number
        assert derivations["segments"] == 0, head.mode
        assert torch.equal(given, derived), head.mode
        assert torch.equal(loss, -derived.sum() / 22.0), head.mode
