"""LoRA adapters (safer_dist/train/lora.py) without DeepSpeed: config keys and their errors,
QLoRA's refusal on CPU, the merge arithmetic, and adapters on a tiny model in-process
(dropout, gradient checkpointing, the plain names rollout workers receive)."""

from __future__ import annotations

import pytest
import torch

from safer_dist.config import ConfigError, LoraSection, load_config, semantic_diff
from safer_dist.train.lora import ADAPTER, Adapters, has_adapters, merge_state_dict, merge_weight
from safer_dist.train.models import load_model


def test_lora_keys_are_typed_and_off_by_default():
    assert load_config(None).model.lora.rank == 0 and not load_config(None).model.lora.enabled
    cfg = load_config(None, ["model.lora.rank=8", "model.lora.alpha=32", "model.lora.dropout=0.05",
                             "model.lora.target_modules=q_proj,v_proj"])
    assert cfg.model.lora == LoraSection(rank=8, alpha=32.0, dropout=0.05, target_modules="q_proj,v_proj")
    assert cfg.model.lora.enabled and cfg.model.quantization == "none"


@pytest.mark.parametrize("overrides,message", [
    (["model.lora.rank=-1"], "model.lora.rank must be >= 0"),
    (["model.lora.rank=8", "model.lora.alpha=0"], "model.lora.alpha must be > 0"),
    (["model.lora.rank=8", "model.lora.dropout=1"], "model.lora.dropout must be in [0, 1)"),
    (["model.lora.rank=8", "model.lora.target_modules=q_proj,"], "model.lora.target_modules must be"),
    (["model.quantization=8bit"], "model.quantization must be one of none, 4bit"),
    (["model.quantization=4bit"], "set model.lora.rank"),
    (["model.quantization=4bit", "model.lora.rank=8", "learner.zero_stage=3"], "learner.zero_stage 0, 1 or 2"),
    (["model.lora_r=16"], "unknown key 'model.lora_r'"),
    (["model.lora.rank=8", "rollout.tensor_parallel=2", "rollout.placement=separate"], "set rollout.tensor_parallel=1"),
])
def test_lora_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_qlora_on_cpu_fails_before_anything_starts(tmp_path):
    from safer_dist import jobs

    cfg = load_config(None, ["model.lora.rank=8", "model.quantization=4bit", "launch.device=cpu",
                             f"run.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"model\.quantization=4bit .*GPU.*set model\.quantization=none"):
        jobs.sft_job(cfg)
    with pytest.raises(ValueError, match=r"model\.quantization=4bit"):
        jobs.erpo_job(cfg)
    assert list(tmp_path.iterdir()) == [], "nothing was written"


def test_resume_keys_cover_lora_and_old_checkpoints_count_as_without():
    old = load_config(None).to_dict()
    del old["model"]["lora"], old["model"]["quantization"]  # a checkpoint from before adapters existed
    assert semantic_diff(old, load_config(None)) == []
    assert semantic_diff(old, load_config(None, ["model.lora.rank=8"])) == ["model.lora.rank: 0 -> 8"]
    assert semantic_diff(old, load_config(None, ["model.lora.rank=8"]), "erpo") == ["model.lora.rank: 0 -> 8"]


def test_merge_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = torch.tensor([[1.0, 0.0]])  # [r=1, in=2]
    b = torch.tensor([[1.0], [2.0]])  # [out=2, r=1]
    # b @ a = [[1, 0], [2, 0]]; times 0.5 added to w:
    assert torch.equal(merge_weight(w, a, b, 0.5), torch.tensor([[1.5, 2.0], [4.0, 4.0]]))
    sd = {"m.q.base_layer.weight": w, "m.q.base_layer.bias": torch.tensor([7.0, 8.0]),
          f"m.q.lora_A.{ADAPTER}.weight": a, f"m.q.lora_B.{ADAPTER}.weight": b, "m.norm.weight": torch.ones(2)}
    assert has_adapters(sd) and not has_adapters({"m.q.weight": w})
    merged = merge_state_dict(sd, 0.5)
    assert sorted(merged) == ["m.norm.weight", "m.q.bias", "m.q.weight"]
    assert torch.equal(merged["m.q.weight"], torch.tensor([[1.5, 2.0], [4.0, 4.0]]))
    assert torch.equal(merged["m.q.bias"], torch.tensor([7.0, 8.0]))
    # bf16 weights are merged in fp32 and rounded once.
    assert merge_weight(w.bfloat16(), a.bfloat16(), b.bfloat16(), 0.5).dtype == torch.bfloat16


@pytest.fixture
def adapted(tiny_model_dir):
    def make(**kw):
        model = load_model(tiny_model_dir, dtype=torch.float32)
        section = LoraSection(**{"rank": 4, "alpha": 8.0, **kw.pop("lora", {})})
        return model, Adapters(section, model, **kw)
    return make


def test_adapters_freeze_the_base_and_target_the_block_linears(adapted, tiny_model_dir):
    model, adapters = adapted()
    # 2 blocks x (q, k, v, o, gate, up, down); never the (tied) LM head
    assert len(adapters.layers) == 14 and not any("lm_head" in n for n in adapters.layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert adapters.num_trainable == 2 * (4 * 4 * (64 + 64) + 3 * 4 * (64 + 128))
    plain = load_model(tiny_model_dir, dtype=torch.float32)
    assert [n for n, _ in adapters.plain_parameters(model)] == [n for n, _ in plain.named_parameters()]
    _, only_q = adapted(lora={"target_modules": "q_proj"})
    assert sorted(only_q.layers) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="model.lora.target_modules='nothing': .*not found"):
        adapted(lora={"target_modules": "nothing"})


def test_merged_buckets_equal_the_merged_state_dict(adapted):
    model, adapters = adapted()
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    live = adapters.merged_state_dict(model, zero3=False, rank=0)
    from_state = merge_state_dict(model.state_dict(), 8.0 / 4)
    assert list(live) == [n for n, _ in adapters.plain_parameters(model)]
    for name, t in live.items():
        assert torch.equal(t, from_state[name]), name
    assert adapters.merged_state_dict(model, zero3=False, rank=1) is None


def test_dropout_only_in_steps_with_gradients(adapted):
    model, adapters = adapted(lora={"dropout": 0.5})
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert not model.training  # the learners never switch modes
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second), "no dropout without gradients (log-probs, evaluation)"
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-4, "dropout in steps with gradients"


def test_gradient_checkpointing_reaches_the_adapters(adapted):
    """Checkpointed layers (reentrant, the strictest form: a layer whose input needs no grad
    gets none, so the frozen embeddings' output must require grad) give the adapters the same
    gradients as without checkpointing."""
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, adapters = adapted(gradient_checkpointing=checkpointing)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.train()  # transformers checkpoints layers only in training mode
        with torch.no_grad():
            for layer in adapters.layers.values():
                layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_adapters_take_the_base_dtype(tiny_model_dir):
    """No fp32 up-cast of bf16 adapters (peft's get_peft_model default): ZeRO-3 wants one dtype."""
    model = load_model(tiny_model_dir, dtype=torch.bfloat16)
    adapters = Adapters(LoraSection(rank=4), model)
    assert {p.dtype for p in Adapters.trainable(model)} == {torch.bfloat16}
    assert adapters.num_trainable == sum(p.numel() for p in Adapters.trainable(model))


def test_missing_packages_are_named_before_start(monkeypatch):
    import importlib.util

    from safer_dist.train.lora import check_adapters

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("peft", "bitsandbytes") else real(name, *a))
    with pytest.raises(ValueError, match=r"model\.lora\.rank > 0 needs the peft package"):
        check_adapters(load_config(None, ["model.lora.rank=8"]).model, "cpu")
    check_adapters(load_config(None).model, "cpu")  # no adapters: nothing to check
    # On a GPU host without bitsandbytes (peft present here) the 4-bit base is refused, naming the key.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"model\.quantization=4bit needs the bitsandbytes package"):
        check_adapters(load_config(None, ["model.lora.rank=8", "model.quantization=4bit"]).model, "cuda")


def test_an_adapter_directory_loads_as_the_merged_model(adapted, tiny_model_dir, tmp_path):
    """What `safer eval model.path=<export>/adapter` loads: the base with the adapters merged,
    the merged export's logits; the tokenizer is the base's."""
    import json

    from safer_dist.train.lora import ADAPTER_DIR, export_merged
    from safer_dist.train.models import load_tokenizer

    model, adapters = adapted()
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    tokenizer = load_tokenizer(tiny_model_dir)
    export_merged(adapters, model, tokenizer, str(tmp_path / "hf"), base_model=str(tiny_model_dir), zero3=False, rank=0)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        want = load_model(tmp_path / "hf", dtype=torch.float32)(input_ids=ids).logits
        got = load_model(tmp_path / "hf" / ADAPTER_DIR, dtype=torch.float32)(input_ids=ids).logits
        assert (got - want).abs().max() < 1e-5
        assert (want - load_model(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits).abs().max() > 1e-3
    assert load_tokenizer(tmp_path / "hf" / ADAPTER_DIR).get_vocab() == tokenizer.get_vocab()
    config = tmp_path / "hf" / ADAPTER_DIR / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "org/model"}))
    with pytest.raises(ValueError, match="base_model_name_or_path='org/model', which is not a local"):
        load_model(tmp_path / "hf" / ADAPTER_DIR, dtype=torch.float32)


def test_a_quantized_learners_export_is_a_plain_model(adapted, tiny_model_dir, tmp_path):
    """A 4-bit learner's config carries its quantization config; the export must not (it holds
    merged bf16/fp32 weights). The config is faked here: NF4 weights need CUDA."""
    import json

    from safer_dist.train.lora import ADAPTER_DIR, checkpoint_adapter_writer, export_merged
    from safer_dist.train.models import load_tokenizer

    model, adapters = adapted()
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    export_merged(adapters, model, load_tokenizer(tiny_model_dir), str(tmp_path / "hf"), base_model=str(tiny_model_dir),
                  zero3=False, rank=0)
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (tmp_path / "hf" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        assert (load_model(tmp_path / "hf", dtype=torch.float32)(input_ids=ids).logits - want).abs().max() < 1e-5
    # `safer export` cannot dequantize NF4 weights from a checkpoint: it says so.
    with pytest.raises(ValueError, match=r"model\.quantization=4bit.*<run>/hf"):
        checkpoint_adapter_writer(tmp_path / "step_4", {"model": {"quantization": "4bit"}}, {})


def test_rank_8_adapters_are_under_5_percent_of_the_demo_model():
    """What a LoRA weight sync sends (the adapters in fp32; tests/ray/test_lora_sync.py checks the
    bytes sent equal them) against the demo model's fp32 weights, on the demo preset's shape
    (meta tensors: no memory). The demo tokenizer's 2629 tokens size the (tied) embedding."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from safer_dist.train.models import _LLAMA_COMMON, PRESETS

    config = LlamaConfig(vocab_size=2629, **{**_LLAMA_COMMON, **PRESETS["tiny"]})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    base = sum(p.numel() for p in model.parameters())
    adapters = Adapters(LoraSection(rank=8), model)
    # Per block, r x (in + out): q, k, v, o 256+256 each, gate and up 256+688, down 688+256;
    # 4 blocks at r = 8: 4 x 8 x (4 x 512 + 3 x 944) = 156160.
    assert adapters.num_trainable == 156_160 and base == 3_837_440
    sent_bytes, model_bytes = 4 * adapters.num_trainable, 4 * base
    assert sent_bytes / model_bytes < 0.05  # 4.07%
