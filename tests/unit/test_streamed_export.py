"""Streamed exports (safer_dist/checkpointing/streamed_export.py) equal save_pretrained's files."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch


def _same_dirs(a, b, names=None):
    names = names or sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), (names, sorted(p.name for p in b.iterdir()))
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_safetensors_files_equal_save_file_byte_for_byte(tmp_path):
    """Mixed dtypes, a scalar, names out of order: the header and data layout equal safetensors'
    own ``save_file`` whatever order the tensors are written in."""
    from safetensors.torch import save_file

    from safer_dist.checkpointing.streamed_export import ShardWriter, meta_like

    gen = torch.Generator().manual_seed(0)
    tensors = {"z.w": torch.randn(3, 5, generator=gen).bfloat16(), "a.w": torch.randn(4, generator=gen),
               "m.count": torch.tensor([7, 8], dtype=torch.int64), "b.h": torch.randn(2, 2, generator=gen).half(),
               "c.scalar": torch.tensor(1.5), "u.mask": torch.tensor([True, False, True])}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "s").mkdir()
    writer = ShardWriter(tmp_path / "s", {k: meta_like(v) for k, v in tensors.items()}, num_parameters=0)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "s" / "model.safetensors").read_bytes()


def test_writer_refuses_wrong_and_missing_tensors(tmp_path):
    from safer_dist.checkpointing.streamed_export import ShardWriter, meta_like

    layout = {"a": meta_like(torch.zeros(2, 3)), "b": meta_like(torch.zeros(4))}
    writer = ShardWriter(tmp_path, layout, num_parameters=10)
    with pytest.raises(ValueError, match=r"a is \(3, 2\) torch.float32, the model's is \(2, 3\)"):
        writer.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="c is not a weight"):
        writer.write("c", torch.zeros(1))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"no tensor written for \['b'\]"):
        writer.close()


@pytest.mark.parametrize("max_shard_size", [None, 20_000])
@pytest.mark.parametrize("tied", [True, False])
def test_export_module_equals_save_pretrained(tiny_model_dir, tmp_path, max_shard_size, tied):
    """A whole export (one file, and cut into shards of 20 kB with an index) equals what the
    learners wrote before (``save_pretrained`` of a copied state dict, + the tokenizer) file by
    file, byte for byte. Tied embeddings are stored once, as ``model.save_pretrained()`` stores
    them (the copied state dict hid the tie and stored ``lm_head.weight`` twice, so the reference
    drops it as transformers does)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from safer_dist.checkpointing.streamed_export import export_module
    from safer_dist.train.models import load_model, load_tokenizer

    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa", device="cpu")
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    tokenizer = load_tokenizer(tiny_model_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    # copies, as the learners' consolidated state dict held (the loaded tensors are views of one
    # mmapped file, which huggingface_hub's sharding would take for aliases)
    copies = {k: v.clone() for k, v in remove_tied_weights_from_state_dict(model.state_dict(), model).items()}
    assert ("lm_head.weight" in copies) is not tied
    model.save_pretrained(tmp_path / "ref", state_dict=copies, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(tmp_path / "ref")
    export_module(model, tokenizer, tmp_path / "out", zero3=False, rank=0, **kwargs)
    _same_dirs(tmp_path / "ref", tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").glob("model*.safetensors"))
    if max_shard_size is None:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 2, files
        weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
        assert ("lm_head.weight" in weight_map) is not tied


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_merged_export_equals_the_gathered_one(tiny_model_dir, tmp_path, quantized):
    """The merged LoRA export streams what the learners used to gather into one state dict:
    ``save_pretrained(state_dict=merged)`` byte for byte, the adapter directory beside it. With a
    (faked: NF4 needs CUDA) 4-bit config, the config is a plain model's: no quantization config,
    the dtype of the merged weights, the same weights."""
    from safer_dist.config import LoraSection
    from safer_dist.train.lora import ADAPTER, ADAPTER_DIR, Adapters, export_merged
    from safer_dist.train.models import load_model, load_tokenizer

    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa", device="cpu")
    adapters = Adapters(LoraSection(rank=4, alpha=8.0), model)
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    tokenizer = load_tokenizer(tiny_model_dir)
    merged = adapters.merged_state_dict(model, zero3=False, rank=0)
    model.save_pretrained(tmp_path / "ref", state_dict=merged, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "ref")
    if quantized:
        model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    export_merged(adapters, model, tokenizer, str(tmp_path / "out"), base_model=str(tiny_model_dir), zero3=False, rank=0)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names + [ADAPTER_DIR])
    if quantized:
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == "float32"
        names.remove("config.json")
    for name in names:
        assert filecmp.cmp(tmp_path / "ref" / name, tmp_path / "out" / name, shallow=False), name
    assert (tmp_path / "out" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
