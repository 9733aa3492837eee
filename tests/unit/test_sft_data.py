import random

import pytest
import torch

from safer_dist.train.losses import IGNORE_INDEX
from safer_dist.train.models import load_model, load_tokenizer
from safer_dist.train.sft_data import SFTData, encode_example, encode_prompt, num_label_tokens, pack, split_segments


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
