"""Tokenizer training, model presets, atomic init, local loading and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from safer_dist.train.models import (
    CHAT_SPECIAL_TOKENS,
    EXANTE_TOKENS,
    PRESETS,
    count_params,
    init_model,
    load_model,
    load_tokenizer,
    model_config,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


ROUND_TRIP = [
    "<ex_ante>\n<assessment>Intent: x. Risk category: C03.</assessment>",
    "<ex_ante>\n<assessment>Intent: learn.</assessment>\n<rules>R1  holds.</rules>\n"
    "<calibration>Help fully.</calibration>\n</ex_ante>\nSure — here:  two  spaces, tab\tend.",
    " leading space, trailing space ",
    "unseen wörds ünïcödé 日本語 ✓ and emoji 🙂",
    "tags<rules>glued</rules>to text",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_encode_round_trips_bytes(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # Ex-Ante tags are ordinary text: skipping special tokens keeps them.
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_exante_tags_are_single_non_special_tokens(tokenizer):
    for tag in EXANTE_TOKENS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
        assert ids[0] not in tokenizer.all_special_ids, tag
    # and inside running text, too
    ids = tokenizer.encode("x<assessment>y", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<assessment>") in ids


def test_special_tokens_and_chat_template(tokenizer):
    for tok in CHAT_SPECIAL_TOKENS:
        ids = tokenizer.encode(tok, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tokenizer.all_special_ids, tok
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token is None
    assert tokenizer.model_max_length == 1024
    # no bos/eos added implicitly
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)
    messages = [
        {"role": "system", "content": "Be safe."},
        {"role": "user", "content": "How do I bake bread?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>\nBe safe.<|end|>\n<|user|>\nHow do I bake bread?<|end|>\n<|assistant|>\n"
    full = messages + [{"role": "assistant", "content": "<ex_ante>\nok</ex_ante>\nSure."}]
    text = tokenizer.apply_chat_template(full, tokenize=False)
    assert text.endswith("<|assistant|>\n<ex_ante>\nok</ex_ante>\nSure.<|end|>\n")
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


class _FakeTokenizer:
    """Just what model_config reads: a 3000-token vocabulary."""

    pad_token_id, eos_token_id = 0, 1

    def __len__(self):
        return 3000


def _meta_model(preset: str) -> LlamaForCausalLM:
    # meta device: shapes only, so even bench-1b costs nothing.
    with torch.device("meta"):
        return LlamaForCausalLM(model_config(preset, _FakeTokenizer()))


def test_preset_sizes():
    # tiny: embed 3000*256 (tied) + 4 * (4*256^2 + 3*256*688 + 2*256) + 256
    #     = 768,000 + 4 * 791,040 + 256 = 3,932,416
    assert count_params(_meta_model("tiny")) == 3_932_416
    assert 18e6 < count_params(_meta_model("bench-20m")) < 23e6
    assert 0.9e9 < count_params(_meta_model("bench-1b")) < 1.1e9
    cfg = model_config("tiny", _FakeTokenizer())
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 1024
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (256, 4, 4, 688)
    assert set(PRESETS) >= {"tiny", "test", "bench-20m", "bench-1b"}
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge", _FakeTokenizer())


def test_init_model_dir_loads(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.float32)
    tok = load_tokenizer(tiny_model_dir)
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "safer_segments"  # "auto" on CPU
    assert next(model.parameters()).dtype == torch.float32
    assert (tiny_model_dir / "model.safetensors").is_file()
    # the generated text decodes through the same tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 4
    assert tok.decode(out[0, : ids.shape[1]]) == prompt


def test_load_model_dtype_bf16(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_init_is_seeded_and_leaves_global_rng(tmp_path, tokenizer):
    state = torch.random.get_rng_state()
    a = load_model(init_model("test", tokenizer, tmp_path / "a", seed=3), dtype=torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = load_model(init_model("test", tokenizer, tmp_path / "b", seed=3), dtype=torch.float32)
    c = load_model(init_model("test", tokenizer, tmp_path / "c", seed=4), dtype=torch.float32)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_init_model_refuses_to_clobber_and_is_atomic(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "m"
    init_model("test", tokenizer, out)
    with pytest.raises(ValueError, match="not empty"):
        init_model("test", tokenizer, out)
    # A crash while writing leaves neither a half-written dir nor temp dirs behind, and the
    # previous model intact.
    before = sorted(p.name for p in out.iterdir())

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        init_model("test", tokenizer, out, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        init_model("test", tokenizer, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in out.iterdir()) == before
    monkeypatch.undo()
    init_model("test", tokenizer, out, seed=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    load_model(out, dtype=torch.float32)


def test_load_errors(tmp_path):
    missing = tmp_path / "nope"
    for load in (load_tokenizer, lambda p: load_model(p, dtype=torch.float32)):
        with pytest.raises(ValueError, match="does not exist"):
            load(missing)
        with pytest.raises(ValueError, match="does not exist"):
            load("some-org/some-hub-model")  # never looked up on a hub
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not a Hugging Face model directory \(no config.json"):
        load_model(empty, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"not a Hugging Face model directory \(no config.json"):
        load_tokenizer(empty)


def test_load_model_rejects_bad_attn(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown attention implementation"):
        load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="fast")
    with pytest.raises(ValueError, match="CUDA"):
        load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="safer_varlen")


def test_config_json_has_no_hub_references(tiny_model_dir):
    config = json.loads(Path(tiny_model_dir, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config.get("bos_token_id") is None
