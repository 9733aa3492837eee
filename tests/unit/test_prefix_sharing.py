"""Prefix-shared (tree) packing: a pair's context (or the system prompt SFT examples share)
encoded once gives the log-probs and gradients of the unshared packing, in the learner's loss
head, the rollout workers' reference pass and every attention path that takes trees (SDPA per
segment, the explicit-mask fallback, and flex_attention's forward, which is all flex runs on CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safer_dist.erpo.pairs import append_continuations, pack_pairs, packed_length
from safer_dist.rollout.sampling import continuation_logprobs
from safer_dist.train import attention, attention_kernels, tree_attention
from safer_dist.train.attention import tree_packing_unsupported
from safer_dist.train.attention_kernels import register_varlen_attention
from safer_dist.train.lm_head import LMHead
from safer_dist.train.losses import IGNORE_INDEX, sft_loss, sum_by_sequence
from safer_dist.train.sft_data import MIN_SHARED_PREFIX, Encoded, num_label_tokens, pack, shared_prompt_length
from safer_dist.train.tree_attention import Segment, sdpa_tree, tree_mask, tree_segments

# ---------------------------------------------------------------- structure from position_ids


def test_tree_segments_by_hand():
    #        root 0..4       branch p=2   root   branch p=1  p=5 > root len 2: independent
    pos = [0, 1, 2, 3, 4, 2, 3, 4, 0, 1, 1, 2, 5, 6]
    segs = tree_segments(torch.tensor([pos]), 1, len(pos))
    assert segs == [Segment(0, 5), Segment(5, 8, 0, 2), Segment(8, 10), Segment(10, 12, 8, 1), Segment(12, 14)]
    # a branch shares with the latest root of its row only; a row start is never a branch
    two_rows = torch.tensor([[0, 1, 2, 1, 2], [1, 2, 0, 1, 1]])
    assert tree_segments(two_rows, 2, 5) == [
        Segment(0, 3), Segment(3, 5, 0, 1), Segment(5, 7), Segment(7, 9), Segment(9, 10, 7, 1),
    ]
    # plain packing is unchanged: every segment a root, boundaries where positions restart
    assert tree_segments(torch.tensor([[0, 1, 2, 0, 1]]), 1, 5) == [Segment(0, 3), Segment(3, 5)]
    assert tree_segments(None, 2, 3) == [Segment(0, 3), Segment(3, 6)]


def test_tree_mask_by_hand():
    # tokens c0 c1 w0 | c1' r0  (positions 0 1 2 | 1 2): the branch sees c0 and itself, never w0
    mask = tree_mask(tree_segments(torch.tensor([[0, 1, 2, 1, 2]]), 1, 5))
    expected = torch.tensor([
        [1, 0, 0, 0, 0],  # c0
        [1, 1, 0, 0, 0],  # c1
        [1, 1, 1, 0, 0],  # w0
        [1, 0, 0, 1, 0],  # c1' (the context's last token again)
        [1, 0, 0, 1, 1],  # r0
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(mask, expected)


def test_pack_pairs_shared_layout():
    enc = [
        {"ctx": [1, 2], "chosen": [3], "rejected": [4, 5], "ref_chosen": -1.0, "ref_rejected": -2.0},
        {"ctx": [6], "chosen": [7, 8], "rejected": [9], "ref_chosen": -3.0, "ref_rejected": -4.0},
    ]
    b = pack_pairs(enc, share_prefix=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 2, 4, 5, 6, 7, 8, 6, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, -100, 3, -100, 4, 5, -100, 7, 8, -100, 9]]
    assert b["seq_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]]
    # unshared: (2+1) + (2+2) + (1+2) + (1+1) = 12 tokens; shared: 11
    assert int(b["num_pair_tokens"]) == 12 == pack_pairs(enc)["input_ids"].numel()
    assert packed_length(2, [1, 2], share_prefix=True) == 6 and packed_length(2, [1, 2], share_prefix=False) == 7
    assert packed_length(5, [3, 3, 3], share_prefix=True) == 5 + 9 + 2


def test_which_backends_take_trees(monkeypatch):
    assert tree_packing_unsupported("safer_segments", "cpu") is None
    assert tree_packing_unsupported("safer_segments", "cuda") is None
    assert tree_packing_unsupported("safer_varlen", "cuda") is None  # torch 2.13 has flex_attention
    for name in ("flash_attention_2", "sdpa", "eager"):
        assert "cannot take a shared prefix" in tree_packing_unsupported(name, "cuda")
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    assert "flex_attention" in tree_packing_unsupported("safer_varlen", "cuda")


# ---------------------------------------------------------------- kernels on random q, k, v

POSITIONS = [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 3, 4, 0, 1, 2, 1, 2, 3, 0, 1, 2, 3]  # two trees, 3 + 2 branches, a root


def _qkv(num_tokens: int, grad: bool = False):
    torch.manual_seed(0)
    q = torch.randn(1, 4, num_tokens, 8, requires_grad=grad)
    k = torch.randn(1, 2, num_tokens, 8, requires_grad=grad)
    v = torch.randn(1, 2, num_tokens, 8, requires_grad=grad)
    return q, k, v


def _dense(q, k, v, mask, scaling=None):
    """Reference: one SDPA over the whole row with the dense tree mask; [B, T, H, D]."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def test_sdpa_tree_equals_dense_tree_mask():
    pos = torch.tensor([POSITIONS])
    segs = tree_segments(pos, 1, pos.shape[1])
    q, k, v = _qkv(pos.shape[1], grad=True)
    got = sdpa_tree(q, k, v, 0.3, segs)
    got.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    want = _dense(q, k, v, tree_mask(segs), 0.3)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for g, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=0)


def test_explicit_mask_fallback_takes_trees():
    """A padding mask sends a packed row to the explicit-mask SDPA fallback, which builds the tree."""
    pos = torch.tensor([POSITIONS])
    q, k, v = _qkv(pos.shape[1])
    no_padding = torch.ones(1, pos.shape[1], dtype=torch.bool)
    layer = torch.nn.Module()
    layer.num_key_value_groups = 2  # transformers' SDPA repeats the 2 kv heads to 4 by it
    got, _ = attention_kernels.segments_attention_forward(layer, q, k, v, no_padding, position_ids=pos)
    want = _dense(q, k, v, tree_mask(tree_segments(pos, 1, pos.shape[1])))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.fixture
def eager_flex(monkeypatch):
    """flex_attention without compile (on CPU flex has a forward only), its warning silenced."""
    monkeypatch.setattr(tree_attention, "_compiled_flex", tree_attention._eager_flex)
    monkeypatch.setattr(tree_attention, "_BLOCK_MASKS", tree_attention._BlockMaskCache())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def test_flex_tree_forward_equals_sdpa_tree(eager_flex):
    pos = torch.tensor([POSITIONS * 2])  # 44 tokens: a row longer than one tree
    q, k, v = _qkv(pos.shape[1])
    with torch.no_grad():
        got = tree_attention.flex_tree(q, k, v, 0.3, pos)
        again = tree_attention.flex_tree(q, k, v, 0.3, pos)  # the cached block mask
    want = sdpa_tree(q, k, v, 0.3, tree_segments(pos, 1, pos.shape[1]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


# ---------------------------------------------------------------- a model: shared == unshared


@pytest.fixture(scope="module")
def model():
    """A random fp32 Llama, 4 query heads over 2 kv heads (GQA), rotary positions."""
    register_varlen_attention()
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, attn_implementation="safer_segments",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _pairs(seed: int = 1) -> list[dict]:
    """Pairs with contexts of 1..17 tokens (1: the branch is a sequence of its own)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, 50, (n,), generator=g).tolist()  # noqa: E731
    return [
        {"ctx": rand(c), "chosen": rand(w), "rejected": rand(r), "ref_chosen": 0.0, "ref_rejected": 0.0}
        for c, w, r in ((9, 4, 6), (1, 3, 2), (17, 5, 1), (4, 2, 7))
    ]


def _logps(model, batch, *, chunk_tokens: int = 3) -> torch.Tensor:
    """Per-sequence summed log-probs [2P] through the learner's loss head (chunked, as in dpo_step)."""
    head = LMHead(model, chunk_tokens, "cpu")
    logp, _ = sum_by_sequence(*head.token_logprobs(model, batch), batch["seq_ids"], 2 * int(batch["num_pairs"]))
    return logp


@pytest.mark.parametrize("attn", ["safer_segments", "safer_varlen"])
def test_shared_logprobs_and_gradients_equal_unshared(model, attn):
    """The learner's per-sequence log-probs and every parameter gradient of a DPO-like loss are
    the same (fp32, 1e-5) whether each pair's context is packed once or twice; ``safer_varlen``
    on CPU runs the same per-segment SDPA."""
    model.set_attn_implementation(attn)
    enc = _pairs()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5])  # any fixed combination
    saved = _shared_equals_unshared(model, lambda share: pack_pairs(enc, share_prefix=share),
                                    lambda batch: weights * _logps(model, batch), atol=1e-5)
    # each pair's rejected step repeats 1 of its C context tokens instead of all C: C - 1 fewer
    assert saved == (9 - 1) + (1 - 1) + (17 - 1) + (4 - 1)


def _shared_equals_unshared(model, batch_of, outputs_of, *, atol: float) -> int:
    """Checks that ``outputs_of(batch_of(share))`` and the gradients of their sum are the same
    (``atol``; gradients 1e-5) unshared and shared; returns the tokens sharing saved."""
    results = {}
    for share in (False, True):
        batch = batch_of(share)
        model.zero_grad()
        out = outputs_of(batch)
        out.sum().backward()
        results[share] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                          batch["input_ids"].numel())
    model.zero_grad()
    (o0, g0, n0), (o1, g1, n1) = results[False], results[True]
    torch.testing.assert_close(o1, o0, atol=atol, rtol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)
    return n0 - n1


def test_flex_path_forward_equals_unshared(model, monkeypatch, eager_flex):
    """``safer_varlen`` as on CUDA (16-bit rows to the kernel): a tree row goes to flex_attention;
    the forward is run here (CPU flex has no backward), gradients in tests/gpu."""
    monkeypatch.setattr(attention_kernels, "_use_varlen_kernel", lambda q: True)
    calls = []
    real = tree_attention.flex_tree
    monkeypatch.setattr(attention_kernels, "flex_tree", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model.set_attn_implementation("safer_varlen")
    enc = _pairs(seed=2)
    with torch.no_grad():
        shared = _logps(model, pack_pairs(enc, share_prefix=True))
        model.set_attn_implementation("safer_segments")
        unshared = _logps(model, pack_pairs(enc, share_prefix=False))
    torch.testing.assert_close(shared, unshared, atol=1e-5, rtol=0)
    assert len(calls) == 2  # one per layer


def test_reference_logprobs_shared_equal_unshared(model):
    """The rollout workers' reference pass groups items by context (here 3 candidates of one
    context, interleaved with others) and packs each group once; sums and counts as unshared."""
    model.set_attn_implementation("safer_segments")
    enc = _pairs(seed=3)
    items = []
    for e in enc:
        items += [(e["ctx"], e["chosen"]), (e["ctx"], e["rejected"])]
    items.insert(3, (enc[0]["ctx"], enc[1]["chosen"]))
    tokens = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: tokens.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        with torch.no_grad():
            shared = continuation_logprobs(model, items, max_tokens_per_pack=30)  # several packs
            n_shared = sum(tokens)
            tokens.clear()
            unshared = continuation_logprobs(model, items, share_prefix=False)
            n_unshared = sum(tokens)
            tokens.clear()
            model.set_attn_implementation("sdpa")  # cannot take trees: packed unshared
            dense = continuation_logprobs(model, items)
            n_dense = sum(tokens)
    finally:
        hook.remove()
        model.set_attn_implementation("safer_segments")
    assert [n for _, n in shared] == [n for _, n in unshared] == [len(c) for _, c in items]
    for (a, _), (b, _), (c, _) in zip(shared, unshared, dense):
        assert abs(a - b) < 1e-5 and abs(c - b) < 1e-5
    # a context of C tokens with k continuations: C * k tokens unshared, C + (k - 1) shared, so
    # (C - 1)(k - 1) fewer; contexts 9 (k = 3), 1, 17, 4 (k = 2): 16 + 0 + 16 + 3
    assert n_unshared - n_shared == 35
    assert n_dense == n_unshared


def test_append_continuations_unshared_is_the_old_layout():
    cols = {"input_ids": [], "position_ids": [], "labels": [], "seq_ids": []}
    append_continuations(cols, [1, 2], [[3], [4, 5]], [0, 1], share_prefix=False)
    assert cols == {
        "input_ids": [1, 2, 3, 1, 2, 4, 5], "position_ids": [0, 1, 2, 0, 1, 2, 3],
        "labels": [-100, -100, 3, -100, -100, 4, 5], "seq_ids": [0, 0, 0, 1, 1, 1, 1],
    }


# ---------------------------------------------------------------- SFT rows sharing a system prompt


def _sft_examples(shared: int, seed: int = 3) -> list[Encoded]:
    """Examples that begin with the same ``shared`` prompt tokens, then a prompt and a response of their own."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, 50, (n,), generator=g).tolist()  # noqa: E731
    system = rand(shared)
    out = []
    for p, r in ((3, 5), (1, 2), (6, 4)):
        prompt, response = system + rand(p), rand(r)
        out.append(Encoded(prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return out


def test_sft_pack_shares_the_common_prompt_prefix_by_hand():
    prompt = list(range(1, 17))  # 16 tokens: MIN_SHARED_PREFIX
    assert MIN_SHARED_PREFIX == 16
    a = Encoded(prompt + [20, 21], [IGNORE_INDEX] * 16 + [20, 21])
    b = Encoded(prompt + [30, 31, 32], [IGNORE_INDEX] * 17 + [31, 32])  # one more prompt token
    row = pack([a, b], share_prefix=True)
    assert row["input_ids"].tolist() == [prompt + [20, 21] + [16, 30, 31, 32]]
    assert row["position_ids"].tolist() == [list(range(18)) + [15, 16, 17, 18]]
    assert row["labels"].tolist() == [[IGNORE_INDEX] * 16 + [20, 21] + [IGNORE_INDEX, IGNORE_INDEX, 31, 32]]
    assert row["seq_ids"].tolist() == [[0] * 18 + [1] * 4]
    assert num_label_tokens(row) == num_label_tokens(pack([a, b])) == 4
    # the shared part stops at the first labelled token of any example, and below 16 tokens nothing is shared
    c = Encoded(prompt[:15] + [20, 21], [IGNORE_INDEX] * 15 + [20, 21])
    assert shared_prompt_length([a, c]) == 15
    assert torch.equal(pack([a, c], share_prefix=True)["input_ids"], pack([a, c])["input_ids"])
    assert shared_prompt_length([a, b, Encoded([1, 2, 9], [IGNORE_INDEX] * 3)]) == 2
    assert torch.equal(pack([a], share_prefix=True)["input_ids"], pack([a])["input_ids"])


@pytest.mark.parametrize("attn", ["safer_segments", "safer_varlen"])
def test_sft_shared_prefix_loss_and_gradients_equal_unshared(model, attn):
    """The SFT loss and every parameter gradient are the same (fp32, 1e-5) with the examples'
    common 20-token system prompt packed once or three times."""
    model.set_attn_implementation(attn)
    examples = _sft_examples(shared=20)

    def loss(batch):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        return sft_loss(logits, batch["labels"], num_label_tokens(batch))

    saved = _shared_equals_unshared(model, lambda share: pack(examples, share_prefix=share), loss, atol=1e-6)
    assert saved == 2 * (20 - 1)  # the second and third example repeat one prefix token instead of 20
