import random

import pytest
import torch

from safer_dist.train.losses import IGNORE_INDEX
from safer_dist.train.models import load_model, load_tokenizer
from safer_dist.train.sft_data import (
    Encoded, SFTData, encode_example, encode_prompt, eval_micro_batches, num_label_tokens, pack, split_segments,
    split_valid,
)


def test_split_segments_concatenates_back_and_is_seeded():
    text = "How do I terminate a stuck Python process quickly?"
    a = split_segments(text, 0.5, random.Random("x"))
    assert "".join(a) == text and len(a) > 1
    assert a == split_segments(text, 0.5, random.Random("x"))
    assert split_segments(text, 0.0, random.Random("x")) == [text]


def test_loss_only_on_response_and_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ex = encode_example(tok, "hi there", "<ex_ante>\nok", max_seq_len=512, overlong="truncate")
    prompt_len = len(encode_prompt(tok, "hi there"))
    assert ex.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[prompt_len:-1]) == "<ex_ante>\nok"


def test_overlong_truncate_or_drop(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    long = "word " * 200
    t = encode_example(tok, "q", long, max_seq_len=32, overlong="truncate")
    assert t.truncated and len(t.input_ids) == 32
    assert encode_example(tok, "q", long, max_seq_len=32, overlong="drop") is None


def test_pack_positions_and_boundaries(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    exs = [encode_example(tok, p, r, max_seq_len=512, overlong="truncate") for p, r in (("a", "b"), ("cc dd", "ee ff gg"))]
    b = pack(exs)
    n0 = len(exs[0].input_ids)
    assert b["position_ids"][0, n0].item() == 0 and b["position_ids"][0, n0 - 1].item() == n0 - 1
    assert b["labels"][0, n0].item() == IGNORE_INDEX  # never predicted across the boundary
    assert num_label_tokens(b) == sum(sum(x != IGNORE_INDEX for x in e.labels[1:]) for e in exs)


def test_packed_logits_equal_unpacked(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    exs = [encode_example(tok, p, r, max_seq_len=512, overlong="truncate")
           for p, r in (("bake bread", "first, second"), ("cook pasta now", "third"), ("x", "python code is here"))]
    b = pack(exs)
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in exs:
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(e.input_ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(e.input_ids)


def test_global_batches_deterministic_and_cover_epoch(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    recs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    d = SFTData(recs, tok, seed=3, max_seq_len=64, overlong="truncate", segment_dropout=0.1)
    e = SFTData(recs, tok, seed=3, max_seq_len=64, overlong="truncate", segment_dropout=0.1)
    first_epoch = [i for s in range(5) for _, i in d.global_batch(s, 2)]
    assert sorted(first_epoch) == list(range(10))
    assert d.global_batch(7, 2) == e.global_batch(7, 2)  # a fresh process derives the same position
    assert d.global_batch(5, 2)[0][0] == 1  # step 5 starts epoch 1
    other = SFTData(recs, tok, seed=4, max_seq_len=64, overlong="truncate", segment_dropout=0.1)
    assert [i for s in range(5) for _, i in other.global_batch(s, 2)] != first_epoch
    # Ranks take disjoint contiguous shards of the same global batch.
    mb0, _ = d.micro_batches(0, global_batch_size=4, rank=0, world_size=2, micro_batch_size=1)
    mb1, _ = d.micro_batches(0, global_batch_size=4, rank=1, world_size=2, micro_batch_size=1)
    (whole,), _ = d.micro_batches(0, global_batch_size=4, rank=0, world_size=1, micro_batch_size=4)
    parts = torch.cat([m["input_ids"] for m in mb0 + mb1], dim=1)
    assert torch.equal(parts, whole["input_ids"])
    with pytest.raises(ValueError, match="empty"):
        SFTData([], tok, seed=0, max_seq_len=64, overlong="truncate", segment_dropout=0.0)


def test_split_valid_is_seeded_disjoint_and_keeps_order():
    recs = [{"prompt": f"p{i}", "response": "r"} for i in range(40)]
    train, valid = split_valid(recs, 0.1, seed=3)
    assert len(valid) == 4 and len(train) == 36  # round(40 * 0.1)
    assert sorted(r["prompt"] for r in train + valid) == sorted(r["prompt"] for r in recs)
    assert train == [r for r in recs if r in train] and valid == [r for r in recs if r in valid]
    assert split_valid(recs, 0.1, seed=3) == (train, valid)
    assert split_valid(recs, 0.1, seed=4)[1] != valid
    assert split_valid(recs, 0.0, seed=3) == (recs, [])
    assert len(split_valid(recs[:3], 0.01, seed=0)[1]) == 1  # at least one example
    with pytest.raises(ValueError, match="too few to split"):
        split_valid(recs[:1], 0.5, seed=0)


def test_eval_micro_batches_cover_every_example_once_with_equal_counts_per_rank():
    # 7 examples (one dropped for length) over 2 ranks, 2 per micro-batch: shards of 4 and 3,
    # both ranks run ceil(4 / 2) = 2 micro-batches.
    examples = [Encoded([i, i + 100], [-100, i + 100]) for i in range(7)]
    examples[2] = None
    ranks = [eval_micro_batches(examples, rank=r, world_size=2, micro_batch_size=2) for r in (0, 1)]
    assert [len(b) for b in ranks] == [2, 2]
    seen = [int(x) for bs in ranks for b in bs if b is not None for x in b["input_ids"][0] if x < 100]
    assert seen == [0, 1, 3, 4, 5, 6]
    ranks = [eval_micro_batches(examples[3:6], rank=r, world_size=2, micro_batch_size=2) for r in (0, 1)]
    assert [[b is None for b in bs] for bs in ranks] == [[False], [False]]
    ranks = [eval_micro_batches(examples[:1], rank=r, world_size=2, micro_batch_size=2) for r in (0, 1)]
    assert [[b is None for b in bs] for bs in ranks] == [[False], [True]]  # rank 1 runs an empty pass


def test_step_prefetcher_returns_the_same_batches_and_runs_one_computation_at_a_time():
    import threading

    from safer_dist.train.sft_data import StepPrefetcher

    calls, running, overlap = [], [0], []
    lock = threading.Lock()

    def fn(step):
        with lock:
            running[0] += 1
            overlap.append(running[0])
        calls.append((step, threading.current_thread().name))
        with lock:
            running[0] -= 1
        return step * step

    pre = StepPrefetcher(fn)
    # consecutive steps come from the background thread; a jump (a resume) is computed at once
    assert [pre.get(s) for s in (0, 1, 2, 7, 8)] == [0, 1, 4, 49, 64]
    pre.close()
    by_step = dict(calls)
    assert by_step[1].startswith("safer-prefetch") and by_step[2].startswith("safer-prefetch")
    assert not by_step[0].startswith("safer-prefetch") and not by_step[7].startswith("safer-prefetch")
    assert max(overlap) == 1
    off = StepPrefetcher(fn, enabled=False)
    calls.clear()
    assert [off.get(s) for s in (0, 1)] == [0, 1] and all(not n.startswith("safer-prefetch") for _, n in calls)


def test_step_prefetcher_raises_the_background_error_at_the_step_that_needs_it():
    import pytest

    from safer_dist.train.sft_data import StepPrefetcher

    def fn(step):
        if step == 1:
            raise ValueError("bad record at step 1")
        return step

    pre = StepPrefetcher(fn)
    assert pre.get(0) == 0
    with pytest.raises(ValueError, match="bad record at step 1"):
        pre.get(1)
    pre.close()
