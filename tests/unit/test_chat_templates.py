"""Chat prompts (strings or message lists) through real chat templates: ChatML and Llama-3
style templates built on the tiny tokenizer, and the embedded default's own frame unchanged."""

import json
import random

import pytest

from safer_dist.config import DataSection, load_config
from safer_dist.data.chat import (
    ChatError, check_prompt_messages, map_last_user, prompt_text, system_prompt, with_system,
)
from safer_dist.data.records import load_records, read_jsonl
from safer_dist.erpo.controller import prompt_pool
from safer_dist.erpo.pairs import step_sequence
from safer_dist.evaluation.attacks import expand
from safer_dist.reasoning.exante import Trace, render
from safer_dist.runtime.resources import shipped
from safer_dist.train.losses import IGNORE_INDEX
from safer_dist.train.models import load_tokenizer
from safer_dist.train.learner import Learner
from safer_dist.train.sft_data import (
    SFTData, encode_context, encode_example, encode_prompt, end_of_turn_mismatch, shared_prompt_length, split_segments,
)

RESPONSE = render(Trace("Intent: bake bread. Risk category: none.", "No rule applies; verdict: not violated.",
                        "Strategy: comply. Help fully.", "Knead the dough, let it rise, bake it."))

# Qwen2.5-style ChatML: a default system prompt when the chat has none.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama-3.1-style: BOS, an always-present system header with dates, contents trimmed.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _chatml(model_dir):
    tok = load_tokenizer(model_dir)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


def _llama3(model_dir):
    tok = load_tokenizer(model_dir)
    tok.add_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   special_tokens=True)
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.chat_template = LLAMA3
    return tok


def _template_ids(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


CHAT = [{"role": "system", "content": "You follow the house safety rules."},
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Which kind of bread?"},
        {"role": "user", "content": "Sourdough, please."}]


@pytest.mark.parametrize("build", [_chatml, _llama3], ids=["chatml", "llama3"])
def test_prompt_tokens_are_the_templates(tiny_model_dir, build):
    tok = build(tiny_model_dir)
    ids = encode_prompt(tok, CHAT)
    assert ids == _template_ids(tok, CHAT, add_generation_prompt=True)
    text = tok.decode(ids)
    assert "You follow the house safety rules." in text  # the system message is kept
    assert text.count("Sourdough, please.") == 1
    # A string prompt is one user turn: the same tokens as its one-message list.
    assert encode_prompt(tok, "How do I bake bread?") == encode_prompt(tok, [CHAT[1]])
    assert encode_prompt(tok, "How do I bake bread?") == _template_ids(tok, [CHAT[1]], add_generation_prompt=True)


@pytest.mark.parametrize("build,tail", [(_chatml, "\n"), (_llama3, "")], ids=["chatml", "llama3"])
def test_sft_example_masks_all_but_the_trace_and_end_of_turn(tiny_model_dir, build, tail):
    tok = build(tiny_model_dir)
    ex = encode_example(tok, CHAT, RESPONSE, max_seq_len=4096, overlong="drop")
    full = _template_ids(tok, [*CHAT, {"role": "assistant", "content": RESPONSE}])
    # The example is the template's whole conversation up to and including the end-of-turn
    # token; ChatML's newline after <|im_end|> is not part of the assistant turn.
    assert ex.input_ids == full[: len(ex.input_ids)]
    assert tok.decode(full[len(ex.input_ids):]) == tail
    n_prompt = len(_template_ids(tok, CHAT, add_generation_prompt=True))
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n_prompt:]) == RESPONSE + tok.eos_token
    assert end_of_turn_mismatch(tok) is None


def test_llama3_trim_falls_back_to_the_rendering(tiny_model_dir):
    tok = _llama3(tiny_model_dir)
    # The template trims contents, so splitting around the raw content would put the spaces in.
    chat = [{"role": "user", "content": "  How do I bake bread?\n"}]
    ids = encode_prompt(tok, chat, dropout=0.9, rng=random.Random(1))
    assert ids == _template_ids(tok, chat, add_generation_prompt=True)
    assert "<|end_header_id|>\n\nHow do I bake bread?<|eot_id|>" in tok.decode(ids)


@pytest.mark.parametrize("build", [_chatml, _llama3], ids=["chatml", "llama3"])
def test_dropout_splits_only_contents(tiny_model_dir, build):
    tok = build(tiny_model_dir)
    plain = encode_prompt(tok, CHAT)
    split = encode_prompt(tok, CHAT, dropout=1.0, rng=random.Random(0))
    assert split != plain and len(split) > len(plain)
    assert tok.decode(split) == tok.decode(plain)  # the same text, cut into more tokens
    specials = set(tok.all_special_ids)
    assert [t for t in split if t in specials] == [t for t in plain if t in specials]


def test_context_and_pairs_see_the_prompt_tokens(tiny_model_dir):
    tok = _chatml(tiny_model_dir)
    prefix = "<ex_ante>\n<assessment>Intent: bake bread.</assessment>\n"
    ctx, step = step_sequence(tok, CHAT, prefix, "<rules>none</rules>\n", False)
    prefix_ids = tok.encode(prefix, add_special_tokens=False)
    assert ctx == encode_context(tok, CHAT, prefix) == encode_prompt(tok, CHAT) + prefix_ids
    assert ctx == _template_ids(tok, CHAT, add_generation_prompt=True) + prefix_ids


def test_end_of_turn_mismatch_names_the_templates_end(tiny_model_dir):
    tok = _chatml(tiny_model_dir)
    tok.eos_token = "<|end|>"  # the tiny tokenizer's own EOS, not ChatML's end of turn
    assert end_of_turn_mismatch(tok) == "<|im_end|>\n"
    assert end_of_turn_mismatch(load_tokenizer(tiny_model_dir)) is None


def test_trl_messages_file_to_training_tokens(tiny_model_dir, tmp_path):
    tok = _chatml(tiny_model_dir)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": [*CHAT, {"role": "assistant", "content": RESPONSE}]},
        {"prompt": "Plain question?", "response": RESPONSE},
    ]))
    data = SFTData(load_records(path, "sft"), tok, seed=0, max_seq_len=4096, overlong="drop", segment_dropout=0.0)
    assert data.encode(0, 0).input_ids == _template_ids(tok, [*CHAT, {"role": "assistant", "content": RESPONSE}])[:-1]
    user = [{"role": "user", "content": "Plain question?"}]
    assert data.encode(0, 1).input_ids == _template_ids(tok, [*user, {"role": "assistant", "content": RESPONSE}])[:-1]


# --- the embedded default: its own frame, byte for byte as before ---------------------------

def _encode_prompt_before_chat_support(tokenizer, prompt, dropout=0.0, rng=None):
    """encode_prompt as it was when prompts were strings only (the reference for the default)."""
    sentinel = "\u0000SAFER\u0000"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], add_generation_prompt=True,
                                         tokenize=False)
    before, after = text.split(sentinel)
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False) if t else []  # noqa: E731
    ids = enc(before)
    for piece in split_segments(prompt, dropout, rng or random.Random(0)):
        ids += enc(piece)
    return ids + enc(after)


def test_default_frame_tokenizes_demo_data_as_before(tiny_model_dir, demo_data_dir):
    tok = load_tokenizer(tiny_model_dir)
    ids = encode_prompt(tok, "x")
    # "<|user|>\n" x "<|end|>\n<|assistant|>\n": the frame's special tokens where they were.
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert ids[-4:-1] == [tok.convert_tokens_to_ids("<|end|>"), *tok.encode("\n", add_special_tokens=False),
                          tok.convert_tokens_to_ids("<|assistant|>")]
    records = read_jsonl(demo_data_dir / "sft.jsonl") + read_jsonl(demo_data_dir / "eval.jsonl")
    for i, r in enumerate(records):
        assert encode_prompt(tok, r["prompt"]) == _encode_prompt_before_chat_support(tok, r["prompt"])
        got = encode_prompt(tok, r["prompt"], 0.1, random.Random(f"segments-{i}"))
        assert got == _encode_prompt_before_chat_support(tok, r["prompt"], 0.1, random.Random(f"segments-{i}"))


def test_rollout_worker_generates_and_scores_message_prompts(tiny_model_dir):
    from safer_dist.rollout.worker import RolloutWorker
    from safer_dist.config import load_config

    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    w = RolloutWorker(cfg.model, cfg.rollout, device="cpu")
    as_list = [{"role": "user", "content": "How do I bake bread?"}]
    a, b, c = w.generate([as_list, "How do I bake bread?", CHAT], max_new_tokens=6)
    assert a["text"] == b["text"]  # greedy on the same tokens
    assert c["num_tokens"] > 0
    x, y = w.logprobs([(chat, "<ex_ante>\n", "<assessment>", False) for chat in (CHAT, CHAT[3:])])
    assert x[1] == y[1] == 1 and x[0] != y[0]  # the same step, conditioned on different chats


# --- message helpers ----------------------------------------------------------------------

def test_prompt_helpers():
    assert prompt_text("hi") == "hi" and prompt_text([CHAT[1]]) == "How do I bake bread?"
    assert prompt_text(CHAT[:2]) == "system: You follow the house safety rules.\n\nuser: How do I bake bread?"
    shout = map_last_user(CHAT, str.upper)
    assert [m["content"] for m in shout] == [m["content"] for m in CHAT[:3]] + ["SOURDOUGH, PLEASE."]
    assert CHAT[3]["content"] == "Sourdough, please."  # the input is not modified
    assert map_last_user("hi", str.upper) == "HI"
    (_, attacked) = expand([{"id": "a", "prompt": CHAT, "harmful": True}], ["leetspeak"])
    assert attacked["prompt"][:3] == CHAT[:3] and attacked["original_prompt"] == CHAT
    assert attacked["prompt"][3]["content"].startswith("Reply to this message written in leetspeak: ")
    with pytest.raises(ChatError, match="turn 2: a prompt must end with a user turn, got role 'assistant'"):
        check_prompt_messages(CHAT[:3])


# --- data.system_prompt ---------------------------------------------------------------------

def test_system_prompt_setting_puts_the_rulebook_before_prompts_without_one(tiny_model_dir, tmp_path):
    rulebook = str(shipped("configs/rules/default.yaml"))
    listing = system_prompt(DataSection(system_prompt="rulebook", rulebook=rulebook))
    assert listing.splitlines()[0] == "You follow this safety rulebook. Risk categories, each with its rules:"
    assert "C07 privacy: [R11]" in listing.splitlines() and "C01 violent_crime: [R01] [R02]" in listing.splitlines()
    assert system_prompt(DataSection(system_prompt="Be brief.", rulebook=rulebook)) == "Be brief."
    assert system_prompt(DataSection(system_prompt="", rulebook=rulebook)) == ""
    assert with_system("hi", "") == "hi" and with_system(CHAT, "S") == CHAT  # a system turn of its own wins
    assert with_system("hi", "S") == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    # the SFT learner's records carry it (data.system_prompt=rulebook), training and validation alike
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": RESPONSE}) + "\n" for i in range(4)))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.train={path}", "data.valid_fraction=0.25",
                             "data.system_prompt=rulebook"])
    learner = Learner(cfg.learner, cfg.train, cfg.model, cfg.data, seed=0)
    train, valid = learner._train_and_valid_records()
    assert len(train) == 3 and len(valid) == 1
    assert all([m["role"] for m in r["prompt"]] == ["system", "user"] and r["prompt"][0]["content"] == listing
               for r in train + valid)
    assert {r["prompt"][1]["content"] for r in train + valid} == {f"Question {i}?" for i in range(4)}
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.erpo_prompts={path}", "data.system_prompt=Be safe."])
    assert [r["prompt"] for r in prompt_pool(cfg)] == [
        [{"role": "system", "content": "Be safe."}, {"role": "user", "content": f"Question {i}?"}] for i in range(4)]
    # through ChatML the listing is a common prefix the SFT packer encodes once
    tok = _chatml(tiny_model_dir)
    data = SFTData(train, tok, seed=0, max_seq_len=4096, overlong="drop", segment_dropout=0.0, share_prefix=True)
    batch, _ = data.micro_batches(0, global_batch_size=3, rank=0, world_size=1, micro_batch_size=3)
    examples = [data.encode(0, i) for i in range(3)]
    shared = shared_prompt_length(examples)
    assert shared > len(tok.encode(listing, add_special_tokens=False))
    assert batch[0]["input_ids"].numel() == sum(len(e.input_ids) for e in examples) - 2 * (shared - 1)
