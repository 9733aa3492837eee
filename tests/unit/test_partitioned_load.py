"""The safetensors reading of the ZeRO-3 partitioned load (no process group; the load itself is
tested on real 2-rank groups in tests/dist/test_partitioned_load.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from safer_dist.train.partitioned_load import _load_partitions, checkpoint_index, read_flat

TENSORS = {
    "a.weight": torch.arange(35, dtype=torch.float32).reshape(5, 7) / 3,
    "b.weight": (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7).to(torch.bfloat16),
    "c.bias": torch.arange(9, dtype=torch.float16) - 4,
    "d.count": torch.arange(6, dtype=torch.int64) * 1_000_000_007,
}


def test_read_flat_reads_any_range_of_any_dtype(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    index = checkpoint_index(tmp_path)
    assert {k: (e.dtype, e.shape) for k, e in index.items()} == {k: (t.dtype, tuple(t.shape)) for k, t in TENSORS.items()}
    with open(tmp_path / "model.safetensors", "rb") as f:
        for name, t in TENSORS.items():
            flat = t.flatten()
            n = flat.numel()
            # ZeRO-3 ranges of 2 and 3 ranks (ceil(n / W) each, the last one short) and the whole tensor
            for start, end in [(0, n), (0, (n + 1) // 2), ((n + 1) // 2, n), (0, -(-n // 3)), (-(-n // 3), 2 * -(-n // 3)),
                               (2 * -(-n // 3), n)]:
                assert torch.equal(read_flat(f, index[name], start, end), flat[start:end]), (name, start, end)
            out = torch.empty(n, dtype=t.dtype)
            assert read_flat(f, index[name], 0, n, out=out) is out and torch.equal(out, flat)


def test_sharded_index_and_errors(tmp_path):
    names = sorted(TENSORS)
    save_file({k: TENSORS[k] for k in names[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: TENSORS[k] for k in names[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    index = checkpoint_index(tmp_path)
    assert sorted(index) == names and {index[k].file.name for k in names} == set(weight_map.values())

    # a file cut short fails naming it instead of returning garbage
    short = tmp_path / "model-00002-of-00002.safetensors"
    short.write_bytes(short.read_bytes()[:-2])
    last = max(("c.bias", "d.count"), key=lambda k: index[k].offset)  # the tensor at the end of the file
    with open(short, "rb") as f, pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: truncated"):
        read_flat(f, index[last], 0, index[last].numel)

    # no safetensors at all: a ZeRO-3 learner says what to do
    with pytest.raises(ValueError, match=r"learner.zero_stage=3.*safetensors.*learner.zero_stage<3"):
        checkpoint_index(tmp_path / "nothing-here")


def _as_if_partitioned(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():  # the attribute zero.Init gives every parameter
        p.ds_shape = p.shape
    return module


def test_missing_or_misshaped_tensors_are_errors_naming_them(tmp_path):
    model = _as_if_partitioned(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in full.items() if k != "1.bias"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 parameter\(s\) of the model, e\.g\. \['1\.bias'\]"):
        _load_partitions(model, checkpoint_index(tmp_path), tmp_path)
    save_file({**full, "0.weight": torch.zeros(3, 5)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 0\.weight has shape \[3, 5\]; the model expects \[3, 4\]"):
        _load_partitions(model, checkpoint_index(tmp_path), tmp_path)
    assert load_file(tmp_path / "model.safetensors")["0.weight"].shape == (3, 5)


def test_config_mismatches_fail_before_anything_is_built(tiny_model_dir):
    from safer_dist.train.partitioned_load import load_model_partitioned

    with pytest.raises(ValueError, match="zero_optimization.stage 3"):
        load_model_partitioned(tiny_model_dir, dtype=torch.float32, ds_config={"zero_optimization": {"stage": 2}})
    # a bf16 engine over fp32 weights
    with pytest.raises(ValueError, match=r"dtype torch.float32 disagrees .*\(torch.bfloat16\)"):
        load_model_partitioned(tiny_model_dir, dtype=torch.float32,
                               ds_config={"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}})
