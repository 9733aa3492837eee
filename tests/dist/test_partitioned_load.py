"""ZeRO-3 learners load the model partitioned: real 2-rank gloo groups, real DeepSpeed (CPU, fp32)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from tests.dist.launch import run_group, run_ranks
from tests.dist.test_sft_dist import make_cfg

# ~99M parameters, untied, GQA 12/4: 10 x (2 x 768^2 + 2 x 768 x 256 + 3 x 768 x 3072 + 2 x 768)
# + 2 x 8000 x 768 + 768 = 10 x 8,652,288 + 12,288,768 = 98,811,648 (395 MB in fp32)
BIG = dict(hidden_size=768, num_hidden_layers=10, num_attention_heads=12, num_key_value_heads=4,
           intermediate_size=3072, vocab_size=8000, tie_word_embeddings=False, max_position_embeddings=512)
BIG_NUM_PARAMS = 98_811_648


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory):
    """A random ~99M-parameter Llama in two safetensors shards plus an index, as save_pretrained
    writes large models. Weights are drawn tensor by tensor, seeded (the model is only built on
    the meta device, for its tensor names and shapes)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("big")
    config = LlamaConfig(**BIG)
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    names = list(shapes)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: torch.randn(shapes[k], generator=gen) * 0.02 for k in part}, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")


def _load_and_measure(rank, world_size, *, model_dir):
    import deepspeed
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the baseline
    from safetensors import safe_open

    from safer_dist.train.models import count_params
    from safer_dist.train.partitioned_load import load_model_partitioned

    ds_config = {"train_batch_size": world_size, "zero_optimization": {"stage": 3}}
    # peak RSS of the load alone (see the test's docstring)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before_kb = _status_kb("VmRSS")
    model, hf_ds_config = load_model_partitioned(model_dir, dtype=torch.float32, ds_config=ds_config)
    growth_bytes = (_status_kb("VmHWM") - before_kb) * 1024
    num_params = count_params(model)

    # every gathered parameter equals the checkpoint, read by safetensors itself
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    mismatched = []
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]), safe_open(model_dir / index[name], "pt") as f:
            if not torch.equal(p.data, f.get_tensor(name)):
                mismatched.append(name)
    # the registered HfDeepSpeedConfig makes transformers gather partitioned embeddings to resize them
    from transformers.integrations import is_deepspeed_zero3_enabled

    zero3_seen = is_deepspeed_zero3_enabled()
    with deepspeed.zero.GatheredParameters([model.model.embed_tokens.weight]):
        old_rows = model.model.embed_tokens.weight.data.clone()
    model.resize_token_embeddings(BIG["vocab_size"] + 8)
    with deepspeed.zero.GatheredParameters([model.model.embed_tokens.weight]):
        new = model.model.embed_tokens.weight.data
        resized = new.shape == (BIG["vocab_size"] + 8, BIG["hidden_size"]) and torch.equal(new[: len(old_rows)], old_rows)
    del hf_ds_config
    return {"growth_bytes": growth_bytes, "mismatched": mismatched, "num_params": num_params,
            "zero3_seen": zero3_seen, "resized": resized}


def test_zero3_ranks_load_a_100m_model_partitioned(big_model_dir, monkeypatch):
    """Two ZeRO-3 ranks load a ~99M-parameter (395 MB fp32) checkpoint of two safetensors shards.
    Each rank's resident memory may grow by less than 0.7x the fp32 model during the load (its
    partitions are 0.5x; any rank holding the whole model would be >= 1.0x); every parameter,
    gathered, equals the checkpoint; ``num_params`` counts the full model; and transformers sees
    ZeRO-3 (a resize gathers the partitioned embedding and keeps its rows).

    Measurement: in each rank, after the imports and the process group, write "5" to
    /proc/self/clear_refs (resets VmHWM to the current RSS), note VmRSS, load, and read VmHWM:
    the growth is the peak during the load, anonymous and file-mapped pages alike. The ranks run
    with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=1 MiB): glibc's default raises the
    threshold after the first large free, after which freed module-sized blocks stay in the heap
    and count as resident although nothing holds them (measured on ranks 0 / 1: 0.52-0.55x /
    0.59-0.60x with the fixed threshold, 0.57x / 0.70x with glibc's default).
    """
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # read by the spawned ranks at start
    results = run_group(functools.partial(_load_and_measure, model_dir=big_model_dir), world_size=2)
    full_fp32_bytes = 4 * BIG_NUM_PARAMS
    for rank, r in enumerate(results):
        assert r["mismatched"] == [], (rank, r["mismatched"][:5])
        assert r["num_params"] == BIG_NUM_PARAMS
        assert r["zero3_seen"] and r["resized"], r
        # a rank's partitions are half the model (0.5x); a whole-model load would be >= 1.0x
        print(f"rank {rank}: peak RSS growth during the load {r['growth_bytes'] / full_fp32_bytes:.2f}x the fp32 model")
        assert r["growth_bytes"] < 0.7 * full_fp32_bytes, (rank, r["growth_bytes"] / full_fp32_bytes)


def bf16_against_full_load(rank, world_size, *, model_dir, device="cpu"):
    """Names of the parameters and buffers in which a bf16 partitioned load differs from
    ``load_model`` (dtype or value), and whether config, generation config and mode agree."""
    import deepspeed

    from safer_dist.train.models import load_model
    from safer_dist.train.partitioned_load import load_model_partitioned

    # the full load first: while an HfDeepSpeedConfig lives, transformers partitions every model it builds
    full = load_model(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device=device)
    ds_config = {"train_batch_size": world_size, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    model, _ = load_model_partitioned(model_dir, dtype=torch.bfloat16, ds_config=ds_config, attn_implementation="sdpa",
                                      device=device)
    differ = []
    for (name, p), (_, q) in zip(model.named_parameters(), full.named_parameters(), strict=True):
        with deepspeed.zero.GatheredParameters([p]):
            if p.dtype != q.dtype or not torch.equal(p.data, q.data):
                differ.append(name)
    for (name, b), (_, c) in zip(model.named_buffers(), full.named_buffers(), strict=True):
        if b.dtype != c.dtype or not torch.equal(b, c):
            differ.append(f"{name} ({b.dtype} vs {c.dtype})")
    same = (model.config.to_dict() == full.config.to_dict() and model.generation_config == full.generation_config
            and model.training == full.training)
    return differ, same


def test_zero3_bf16_load_equals_from_pretrained(tiny_model_dir):
    """bf16 (the GPU dtype): the fp32 checkpoint rounds to the same bf16 weights as from_pretrained,
    and the RoPE frequencies stay fp32 (zero.Init must not cast them to bf16)."""
    for differ, same in run_group(functools.partial(bf16_against_full_load, model_dir=tiny_model_dir), world_size=2):
        assert differ == [] and same, differ


# ------------------------------------------------- a learner's ZeRO-3 load equals the full load


def _export_logits_train(learner, out_root, ids, steps):
    from safer_dist.train.models import count_params

    out = out_root / f"stage{learner.cfg.zero_stage}"
    learner.export_hf(str(out))
    layers = learner.engine.module.model.layers
    return {"attn": learner.attn_implementation, "num_params": count_params(learner.engine.module),
            # what transformers checks before it checkpoints a layer
            "checkpointing": [bool(layer.gradient_checkpointing and layer.training) for layer in layers],
            "logits": learner.logits(ids).tolist(), "losses": [learner.sft_step(s)["loss"] for s in range(steps)]}


def test_zero3_learner_load_matches_the_full_load(tiny_model_dir, demo_data_dir, tmp_path):
    """At step 0 a ZeRO-3 learner (partitioned load, here with gradient checkpointing) exports
    exactly what a ZeRO-2 learner (whole-model from_pretrained) exports — weights, config,
    generation config — equal to the directory both loaded, with the same attention backend,
    parameter count and logits; then both train to the same losses."""
    from safetensors.torch import load_file

    ids, steps = [5, 17, 42, 99, 3, 250], 3
    got = {}
    for stage, ckpt in ((2, "false"), (3, "true")):
        cfg = make_cfg(tiny_model_dir, demo_data_dir, "learner.num_learners=2", f"learner.zero_stage={stage}",
                       f"model.gradient_checkpointing={ckpt}", "train.global_batch_size=8", "train.micro_batch_size=4")
        got[stage] = run_ranks(cfg, functools.partial(_export_logits_train, out_root=tmp_path, ids=ids, steps=steps))[0]
    assert got[2]["attn"] == got[3]["attn"] == "safer_segments"
    assert not any(got[2]["checkpointing"]) and all(got[3]["checkpointing"]) and got[3]["checkpointing"]
    original = load_file(tiny_model_dir / "model.safetensors")  # tied embeddings: stored once, counted once
    assert got[2]["num_params"] == got[3]["num_params"] == sum(t.numel() for t in original.values())
    assert got[2]["logits"] == got[3]["logits"]
    w2 = load_file(tmp_path / "stage2" / "model.safetensors")
    w3 = load_file(tmp_path / "stage3" / "model.safetensors")
    assert w2.keys() == w3.keys() >= original.keys()
    for k in w2:
        assert torch.equal(w2[k], w3[k]), k
    for k in original:
        assert torch.equal(w3[k], original[k]), k
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "stage3" / name).read_text()) == json.loads((tmp_path / "stage2" / name).read_text())
    # ZeRO-2 and ZeRO-3 each equal one rank within 1e-5 (test_sft_dist.py); so they agree within 2e-5
    for a, b in zip(got[2]["losses"], got[3]["losses"]):
        assert abs(a - b) < 2e-5, (got[2]["losses"], got[3]["losses"])

