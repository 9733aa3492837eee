"""Tiny judge models whose verdict is known, for the classifier judge's tests (unit and Ray)."""

from __future__ import annotations

import torch

from safer_dist.train.models import init_model_from_corpus, load_model, load_tokenizer


def _constant_hidden(model) -> None:
    """Make a Llama's last hidden state the same for every input: every token embeds to the same
    vector and the blocks add nothing to the residual stream (o_proj, down_proj zero)."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight.fill_(1.0)


def constant_guard(tmp_path, word: str):
    """A tiny Llama judge that answers ``word`` whatever it is asked: every token embeds to the
    same vector and the blocks add nothing (o_proj, down_proj zero), so the last hidden state is
    constant, and the (untied) head scores only the token of " <word>" — greedy decoding repeats it."""
    texts = [f"<|user|>\nIs it ok?<|end|>\n<|assistant|>\nThe reply is {w}.<|end|>\n" for w in ("safe", "unsafe")] * 50
    src = init_model_from_corpus("test", texts, tmp_path / "base", seed=0, vocab_size=400)
    tok = load_tokenizer(src)
    (target,) = tok.encode(f" {word}", add_special_tokens=False)  # one token, or the premise fails here
    model = load_model(src, dtype=torch.float32)
    with torch.no_grad():
        _constant_hidden(model)
        head = torch.zeros_like(model.lm_head.weight)
        head[target] = 1.0  # logit 64 (the hidden size) for it, 0 for every other token
        model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False
    out = tmp_path / f"guard-{word}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def constant_sequence_guard(tmp_path, hot: int):
    """A tiny ``LlamaForSequenceClassification`` (labels 0 ``safe``, 1 ``unsafe``) that predicts
    label ``hot`` for any input: constant hidden states as in :func:`constant_guard`, one score row of ones."""
    from transformers import AutoConfig, LlamaForSequenceClassification

    src = tmp_path / "seq-base"
    if not src.exists():
        init_model_from_corpus("test", ["<|user|>\nIs it ok?<|end|>\n"] * 20, src, seed=0, vocab_size=300)
    config = AutoConfig.from_pretrained(src, num_labels=2, id2label={0: "safe", 1: "unsafe"},
                                        label2id={"safe": 0, "unsafe": 1})
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        _constant_hidden(model)
        model.score.weight.zero_()
        model.score.weight[hot] = 1.0
    out = tmp_path / f"seq-{hot}"
    model.save_pretrained(out)
    load_tokenizer(src).save_pretrained(out)
    return out
