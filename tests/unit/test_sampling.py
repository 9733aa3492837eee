"""Candidate sampling with one prefill per prefix equals unbatched, unpadded generation."""

import torch

from safer_dist.train.models import load_model, load_tokenizer
from safer_dist.erpo.sampling import continuation_logprobs, cut_at_stop, sample_candidates
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
