"""Local model and tokenizer creation and loading. Nothing here touches a model hub.

- :func:`train_tokenizer` trains a byte-level BPE tokenizer in-process (milliseconds) with our
  chat special tokens and the Ex-Ante tags as single, non-special tokens (so they survive
  ``decode(..., skip_special_tokens=True)`` and round-trip byte for byte).
- :func:`init_model` writes a randomly initialised Llama of a named preset plus the tokenizer
  into a directory, atomically.
- :func:`load_model` / :func:`load_tokenizer` load such a directory (or any local Hugging Face
  directory), with clear errors for missing paths and choosing the attention backend through
  :func:`safer_dist.train.attention.resolve_attn_implementation`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from safer_dist.runtime.io import atomic_write_dir
from safer_dist.train.attention import resolve_attn_implementation
from safer_dist.train.attention_kernels import register_varlen_attention

SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN = "<|system|>", "<|user|>", "<|assistant|>"
EOS_TOKEN, PAD_TOKEN = "<|end|>", "<|pad|>"
CHAT_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
EXANTE_TOKENS = (
    "<ex_ante>",
    "</ex_ante>",
    "<assessment>",
    "</assessment>",
    "<rules>",
    "</rules>",
    "<calibration>",
    "</calibration>",
)
MODEL_MAX_LENGTH = 1024

# Rendering: "<|{role}|>\n{content}<|end|>\n" per message; the generation prompt is
# "<|assistant|>\n". Unknown roles would become ordinary text, so they are rejected.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_LLAMA_COMMON = dict(
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    initializer_range=0.02,
)

# Llama-shaped presets. The vocabulary size comes from the tokenizer at init time.
PRESETS: dict[str, dict] = {
    # The embedded default (docs/design.md §7): ~3.9M parameters with a 3k vocabulary.
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    ),
    # For tests: builds and runs in milliseconds.
    "test": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    ),
    # Benchmarks: ~20M parameters with a 3k vocabulary.
    "bench-20m": dict(
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1376,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    # Benchmarks on GPU: Llama-3.2-1B shape (GQA 32/8), ~0.98B parameters with a 3k vocabulary.
    "bench-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    ),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Every byte is in the base alphabet, so any string encodes and ``decode(encode(s)) == s``.
    Chat markers are special tokens (eos ``<|end|>``, pad ``<|pad|>``, no bos); the Ex-Ante
    tags are added non-special tokens, one id each.
    """
    if vocab_size < 256 + len(CHAT_SPECIAL_TOKENS) + len(EXANTE_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (need > 269)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(EXANTE_TOKENS),
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # normalized=False: match the raw text; no strip: spaces around tags stay in the text.
    backend.add_tokens(
        [AddedToken(t, normalized=False, lstrip=False, rstrip=False, special=False) for t in EXANTE_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        extra_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # byte-exact decode
    )


def model_config(preset: str, tokenizer) -> LlamaConfig:
    """The LlamaConfig of ``preset`` sized to ``tokenizer`` (vocab, pad/eos ids)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **{**_LLAMA_COMMON, **PRESETS[preset]},
    )


def init_model(preset: str, tokenizer, out_dir: str | Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a randomly initialised ``preset`` LlamaForCausalLM (fp32, safetensors) and
    ``tokenizer`` to ``out_dir``; return it.

    The directory is built next to ``out_dir`` and renamed into place, so a crash never leaves
    a half-written model. An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    The global RNG state is left untouched; the same ``seed`` gives the same weights.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir} already exists and is not empty; refusing to overwrite it")
    config = model_config(preset, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.use_cache = True  # generation uses a KV cache; training does not

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return atomic_write_dir(out_dir, fill)


def init_model_from_corpus(
    preset: str, texts: Iterable[str], out_dir: str | Path, seed: int = 0, vocab_size: int = 3000
) -> Path:
    """:func:`train_tokenizer` on ``texts`` then :func:`init_model`."""
    return init_model(preset, train_tokenizer(texts, vocab_size=vocab_size), out_dir, seed=seed)


def _check_local_dir(path: str | Path, required: tuple[str, ...], kind: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model path {path} does not exist (models load only from local directories)")
    if not path.is_dir() or not any((path / name).is_file() for name in required):
        raise ValueError(f"{path} is not a Hugging Face {kind} directory (no {' or '.join(required)})")
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load the tokenizer saved in the local directory ``path`` (for a peft adapter directory:
    its base model's, :func:`safer_dist.train.lora.adapter_base`)."""
    from safer_dist.train.lora import adapter_base

    path = adapter_base(path) or path
    path = _check_local_dir(path, ("config.json", "tokenizer_config.json", "tokenizer.json"), "model")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype,
    attn_implementation: str = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    tensor_parallel: int = 1,
    head: str = "causal_lm",
) -> PreTrainedModel:
    """Load a causal LM (``head="sequence"``: a sequence-classification model, for a classifier
    judge) from the local directory ``path`` onto ``device``.

    ``attn_implementation`` goes through :func:`resolve_attn_implementation` for ``device``;
    ``config.use_cache`` is set to False because packed training batches are only correct
    without a KV cache (``generate`` still uses one: it passes ``use_cache`` explicitly).
    A peft LoRA adapter directory loads as its base model with the adapters merged in.

    ``tensor_parallel`` > 1: this process is one of that many ranks of the default process
    group (already initialised), and holds its shard of the model by the model's own TP plan
    (transformers' ``tp_plan="auto"``; sharded parameters are DTensors). transformers places the
    shard on this process's device (``LOCAL_RANK``; CPU on a CPU host).
    """
    from safer_dist.train.lora import adapter_base, merge_adapter_dir

    base = adapter_base(path)
    if base is not None:
        if tensor_parallel > 1:
            raise ValueError(f"{path} is a LoRA adapter directory, which tensor-parallel rollout workers do not "
                             "load; give them the merged export (the directory above adapter/)")
        model = load_model(base, dtype=dtype, attn_implementation=attn_implementation, device=device,
                           trust_remote_code=trust_remote_code)
        return merge_adapter_dir(model, path)
    path = _check_local_dir(path, ("config.json",), "model")
    device = torch.device(device)
    attn = resolve_attn_implementation(attn_implementation, device.type)
    register_varlen_attention()
    auto = AutoModelForSequenceClassification if head == "sequence" else AutoModelForCausalLM
    model = auto.from_pretrained(
        path,
        local_files_only=True,
        dtype=dtype,
        attn_implementation=attn,
        trust_remote_code=trust_remote_code,
        **(_tensor_parallel_kwargs(tensor_parallel) if tensor_parallel > 1 else {}),
    )
    model.config.use_cache = False
    return model if tensor_parallel > 1 else model.to(device)


def _tensor_parallel_kwargs(tp_size: int) -> dict:
    """``from_pretrained`` arguments for the model's own TP plan over ``tp_size`` ranks: a
    ``DistributedConfig`` where transformers' has ``tp_size`` (5.17 on; an older class of that
    name has no TP fields), else the older ``tp_plan="auto"`` arguments."""
    import dataclasses

    try:
        from transformers import DistributedConfig
    except ImportError:
        DistributedConfig = None
    if DistributedConfig is not None and "tp_size" in {f.name for f in dataclasses.fields(DistributedConfig)}:
        return {"distributed_config": DistributedConfig(tp_size=tp_size)}  # the model's own plan
    return {"tp_plan": "auto", "tp_size": tp_size}


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights once; full size under ZeRO-3 partitioning)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
