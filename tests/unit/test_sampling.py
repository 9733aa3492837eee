"""Candidate sampling with one prefill per prefix and continuous batching: greedy equals
unbatched, unpadded generation; a row's sample depends on its prefix, seed and index only."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from safer_dist.rollout.decode import _check_full_attention
from safer_dist.rollout.draw import Reseed, draw, row_rng
from safer_dist.rollout.sampling import continuation_logprobs, cut_at_stop, sample_candidates
from safer_dist.train.models import load_model, load_tokenizer
from safer_dist.train.sft_data import encode_prompt


def setup(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = ["bake bread", "How do I write a poem about python code, number 7?", "tax"]
    return tok, model, [encode_prompt(tok, p) for p in prompts]


def test_prefix_reuse_equals_each_prefix_alone(tiny_model_dir):
    tok, model, prefixes = setup(tiny_model_dir)
    assert len({len(p) for p in prefixes}) == 3, "different lengths exercise the left padding"
    batched = sample_candidates(model, tok, prefixes, 2, max_new_tokens=10, temperature=0.0)
    # 3 rows at most: prefixes enter one at a time, next to rows of another prefix.
    assert sample_candidates(model, tok, prefixes, 2, max_new_tokens=10, temperature=0.0, batch_rows=3) == batched
    for prefix, cands in zip(prefixes, batched):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prefix]), max_new_tokens=10, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = alone[0, len(prefix):].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        want = tok.decode(new, skip_special_tokens=False)
        assert [c["text"] for c in cands] == [want, want]
    # Seeded sampling: the reuse path and the re-encoding path draw the same candidates.
    a = sample_candidates(model, tok, prefixes, 3, max_new_tokens=8, temperature=1.0, seed=5)
    b = sample_candidates(model, tok, prefixes, 3, max_new_tokens=8, temperature=1.0, seed=5, reuse_prefix=False)
    assert a == b


def test_rows_do_not_depend_on_batch_composition(tiny_model_dir):
    tok, model, prefixes = setup(tiny_model_dir)
    # "e" is frequent in the tiny model's text: rows end at different steps, so rows leave and
    # waiting prefixes join a running batch of another width.
    kw = dict(max_new_tokens=12, stop_strings=["e"], temperature=1.0, seed=7)
    ref = sample_candidates(model, tok, prefixes, 3, **kw)
    ends = [c["num_tokens"] for cs in ref for c in cs]
    assert len(set(ends)) >= 3 and any(c["stopped"] for cs in ref for c in cs), ends
    assert all(c["text"].endswith("e") for cs in ref for c in cs if c["stopped"])
    assert sample_candidates(model, tok, prefixes, 3, **kw, batch_rows=4) == ref  # one prefix at a time
    assert sample_candidates(model, tok, prefixes, 3, **kw, batch_rows=5, reuse_prefix=False) == ref
    # Another prefix in the middle changes that prefix's rows only.
    other = sample_candidates(model, tok, [prefixes[0], prefixes[0][:-2], prefixes[2]], 3, **kw, batch_rows=4)
    assert other[0] == ref[0] and other[2] == ref[2] and other[1] != ref[1]
    assert sample_candidates(model, tok, prefixes, 3, **{**kw, "seed": 8}) != ref


def test_draw_matches_softmax_and_top_p():
    # probabilities 0.5, 0.3, 0.15, 0.05; top_p 0.7 drops the tokens whose cumulative probability
    # from the least likely up is <= 1 - 0.7 = 0.3: 0.05 (cum 0.05) and 0.15 (cum 0.20), keeping
    # 0.3 (cum 0.50) and 0.5, renormalised to 0.5 / 0.8 = 0.625 and 0.3 / 0.8 = 0.375.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    rngs = [random.Random(i) for i in range(4000)]
    got = draw(logits, rngs, temperature=1.0, top_p=0.7)
    assert set(got) == {0, 1} and abs(got.count(0) / 4000 - 0.625) < 0.03  # 4 sigma: 4 * sqrt(.625 * .375 / 4000)
    got = draw(logits, [random.Random(i) for i in range(4000)], temperature=1.0, top_p=1.0)
    for t, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert abs(got.count(t) / 4000 - p) < 4 * math.sqrt(p * (1 - p) / 4000) + 1e-9, (t, got.count(t))
    # Temperature 2 flattens to p^(1/2) / sum: 0.7071, 0.5477, 0.3873, 0.2236 over 1.8657.
    got = draw(logits, [random.Random(i) for i in range(4000)], temperature=2.0, top_p=1.0)
    assert abs(got.count(3) / 4000 - 0.2236 / 1.8657) < 0.021
    # The nucleus is transformers' TopPLogitsWarper's, on random logits; temperature 0 is argmax.
    wide = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    kept = TopPLogitsWarper(0.9)(None, wide.clone()) > float("-inf")
    drawn = draw(wide, [random.Random(i) for i in range(64)], temperature=1.0, top_p=0.9)
    assert all(kept[i, t] for i, t in enumerate(drawn))
    assert draw(wide, [], temperature=0.0, top_p=0.9) == wide.argmax(-1).tolist()


def test_sliding_window_models_are_refused():
    full = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention"] * 2, sliding_window=4096))
    _check_full_attention(full)
    with pytest.raises(ValueError, match="sliding-window"):
        _check_full_attention(SimpleNamespace(config=SimpleNamespace(layer_types=["sliding_attention", "full_attention"])))
    with pytest.raises(ValueError, match="sliding-window"):
        _check_full_attention(SimpleNamespace(config=SimpleNamespace(sliding_window=4096)))


def test_token_counts_and_stops(tiny_model_dir):
    tok, model, prefixes = setup(tiny_model_dir)
    free = sample_candidates(model, tok, prefixes, 1, max_new_tokens=12, temperature=0.0)
    text = free[1][0]["text"]
    stop = tok.decode(tok.encode(text, add_special_tokens=False)[2:3])
    cut = sample_candidates(model, tok, prefixes, 1, max_new_tokens=12, temperature=0.0, stop_strings=[stop])
    c = cut[1][0]
    assert c["stopped"] and c["text"] == cut_at_stop(text, [stop])[0]
    # The count is of the kept text, not of the padded batch row.
    assert c["num_tokens"] == len(tok.encode(c["text"], add_special_tokens=False)) < 12
    assert cut_at_stop("a</x>b</y>", ["</y>", "</x>"]) == ("a</x>", True)
    assert cut_at_stop("abc", ["</x>"]) == ("abc", False)


def test_continuation_logprobs_match_unpacked(tiny_model_dir):
    tok, model, prefixes = setup(tiny_model_dir)
    items = [(p, tok.encode(" and more", add_special_tokens=False)) for p in prefixes]
    got = continuation_logprobs(model, items, max_tokens_per_pack=40)  # forces several packs
    for (ctx, cont), (lp, n) in zip(items, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont]), use_cache=False).logits[0]
        want = torch.log_softmax(logits, -1)[len(ctx) - 1 : -1].gather(1, torch.tensor(cont)[:, None]).sum()
        assert abs(lp - float(want)) < 1e-4 and n == len(cont)


def test_a_row_s_sample_depends_on_its_prefix_not_its_place(tiny_model_dir):
    tok, model, prefixes = setup(tiny_model_dir)
    kw = dict(max_new_tokens=10, temperature=1.0, seed=3)
    ref = sample_candidates(model, tok, prefixes, 3, **kw)
    assert len({c["text"] for cs in ref for c in cs}) >= 6, "seeded samples must differ between rows"
    # Alone, at another index, among other prefixes, in smaller batches, twice in one call: a
    # prefix's candidates are its own (rollout workers get interleaved shards of a call's items).
    assert sample_candidates(model, tok, prefixes[1:2], 3, **kw) == ref[1:2]
    assert sample_candidates(model, tok, prefixes[::-1], 3, **kw, batch_rows=4) == ref[::-1]
    assert sample_candidates(model, tok, [prefixes[2], prefixes[2]], 3, **kw) == [ref[2], ref[2]]
    assert sample_candidates(model, tok, prefixes[:1], 3, **{**kw, "seed": 4}) != ref[:1]


def test_reseed_redraws_the_picked_rows_only(tiny_model_dir):
    # Streams: a Reseed picks a fixed share of rows by hash and gives those another seed's stream.
    prefixes = [[1, 2, k] for k in range(400)]
    spec = Reseed(11, 0.05, 99)
    picked = [(p, c) for p in range(400) for c in range(4)
              if row_rng(spec, prefixes[p], c).random() != row_rng(11, prefixes[p], c).random()]
    assert 40 <= len(picked) <= 120, len(picked)  # 5% of 1,600 rows, by hash
    for p, c in picked:
        assert row_rng(spec, prefixes[p], c).random() == row_rng(99, prefixes[p], c).random()
    assert all(row_rng(Reseed(11, 0.0, 99), x, 0).random() == row_rng(11, x, 0).random() for x in prefixes)
    assert all(row_rng(Reseed(11, 1.0, 99), x, 0).random() == row_rng(99, x, 0).random() for x in prefixes)
    # Sampling: with half the rows redrawn, those rows (and only those) change, and the same rows
    # change wherever the prefix sits.
    tok, model, prefixes = setup(tiny_model_dir)
    kw = dict(max_new_tokens=10, temperature=1.0)
    ref = sample_candidates(model, tok, prefixes, 4, seed=3, **kw)
    other = sample_candidates(model, tok, prefixes, 4, seed=8, **kw)
    mixed = sample_candidates(model, tok, prefixes, 4, seed=Reseed(3, 0.5, 8), **kw)
    changed = [(p, c) for p in range(3) for c in range(4) if mixed[p][c] != ref[p][c]]
    assert 2 <= len(changed) <= 10, changed
    assert all(mixed[p][c] == other[p][c] for p, c in changed)
    assert sample_candidates(model, tok, prefixes[::-1], 4, seed=Reseed(3, 0.5, 8), batch_rows=4, **kw) == mixed[::-1]


def test_a_row_s_logits_do_not_depend_on_its_batch(tiny_model_dir, monkeypatch):
    """Every decode step's logits of a row, bit for bit, whatever prefixes share its prefill and
    its batch (oneDNN linear layers, the CPU default): the prefill runs the same SDPA kernel for a
    prefix alone or packed, and decode attention takes its softmax in float64."""
    import safer_dist.rollout.decode as decode

    tok, model, prefixes = setup(tiny_model_dir)
    prefixes = prefixes + [encode_prompt(tok, "explain the history of chemistry in some detail")]
    seen: dict[int, list[torch.Tensor]] = {}
    real_draw = decode.draw

    def spy(logits, rngs, temperature, top_p):
        for g, row in zip(rngs, logits):
            seen.setdefault(id(g), []).append(row.clone())
        return real_draw(logits, rngs, temperature, top_p)

    def steps(batch: list[list[int]], **kw) -> dict[tuple, list[torch.Tensor]]:
        made = []
        real_rng = decode.row_rng
        monkeypatch.setattr(decode, "row_rng", lambda s, p, c: made.append((tuple(p), c, real_rng(s, p, c))) or made[-1][2])
        seen.clear()
        # "e" ends rows at different steps, so rows of other prefixes join and leave the batch.
        sample_candidates(model, tok, batch, 2, max_new_tokens=10, stop_strings=["e"], temperature=1.0, seed=1, **kw)
        return {(p, c): seen[id(g)] for p, c, g in made}

    monkeypatch.setattr(decode, "draw", spy)
    ref = steps(prefixes)
    alone = steps(prefixes[1:2])
    mixed = steps([prefixes[3], prefixes[1], prefixes[0]], batch_rows=4)
    assert max(len(v) for v in ref.values()) >= 3, "rows must run several decode steps"
    for got in (alone, mixed):
        for key, rows in got.items():
            assert len(rows) == len(ref[key])
            for a, b in zip(rows, ref[key]):
                assert torch.equal(a, b), key


def test_sampled_evaluation_answer_depends_on_its_prompt_and_seed_only(tiny_model_dir):
    from safer_dist.config import load_config
    from safer_dist.rollout.worker import RolloutWorker

    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    w = RolloutWorker(cfg.model, cfg.rollout, device="cpu")
    prompts = ["bake bread", "How do I write a poem about python code, number 7?", "tax", "a cat story"]
    kw = dict(max_new_tokens=10, temperature=1.0, seed=3)

    def texts(ps, **more):
        return [g["text"] for g in w.generate(ps, **{**kw, **more})]

    ref = texts(prompts)
    assert len(set(ref)) == len(ref), ref
    # Alone, in another order, with other batch sizes, next to other prompts: the same answer.
    assert [texts([p])[0] for p in prompts] == ref
    assert texts(prompts[::-1]) == ref[::-1]
    assert texts(prompts, batch_size=1) == ref and texts(prompts, batch_size=3) == ref
    assert texts(["an unrelated prompt", prompts[2], "and one more"])[1] == ref[2]
    # The same stream as an ERPO candidate of the prompt with an empty prefix.
    (cands,) = w.sample([(prompts[1], "")], n=1, stop_strings=None, max_new_tokens=10, temperature=1.0, seed=3)
    assert cands[0]["text"] == ref[1]
    # Another seed draws other answers; greedy is model.generate's argmax, whatever the seed.
    assert texts(prompts, seed=4) != ref
    greedy = texts(prompts, temperature=0.0)
    assert texts(prompts, temperature=0.0, seed=9) == greedy != ref
