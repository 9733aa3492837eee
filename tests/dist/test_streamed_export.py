"""The streamed export of a ZeRO-3 engine: real 2-rank gloo group, real DeepSpeed (CPU, fp32)."""

from __future__ import annotations

import filecmp
import functools

from tests.dist.launch import run_group
from tests.dist.test_partitioned_load import BIG_NUM_PARAMS, _status_kb, big_model_dir  # noqa: F401 - fixture


def _export_and_measure(rank, world_size, *, model_dir, tokenizer_dir, out_root):
    import deepspeed
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the baseline
    import torch

    from safer_dist.checkpointing.streamed_export import export_module
    from safer_dist.train.models import load_tokenizer
    from safer_dist.train.partitioned_load import load_model_partitioned

    ds_config = {"train_batch_size": world_size, "zero_optimization": {"stage": 3}}
    model, _ = load_model_partitioned(model_dir, dtype=torch.float32, ds_config=ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    tokenizer = load_tokenizer(tokenizer_dir)
    # peak RSS of the export alone (as in test_partitioned_load.py)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before_kb = _status_kb("VmRSS")
    export_module(engine.module, tokenizer, out_root / "streamed", zero3=True, rank=rank)
    growth_bytes = (_status_kb("VmHWM") - before_kb) * 1024
    # the export as the learners wrote it before: the consolidated 16-bit state dict, copied to
    # rank 0's memory, saved by save_pretrained (measured the same way)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before_kb = _status_kb("VmRSS")
    sd = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        engine.module.save_pretrained(out_root / "gathered", state_dict={k: v.detach().cpu().clone() for k, v in sd.items()},
                                      safe_serialization=True)
        tokenizer.save_pretrained(out_root / "gathered")
    return growth_bytes, (_status_kb("VmHWM") - before_kb) * 1024


def test_zero3_streamed_export_of_a_100m_model_equals_the_gathered_one(big_model_dir, tiny_model_dir, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    """Two ZeRO-3 ranks export a ~99M-parameter (395 MB fp32, untied) model. The files equal the
    gathered export's (``save_pretrained`` of ``_zero3_consolidated_16bit_state_dict()`` on rank
    0) byte for byte, and no rank's resident memory grows by half the model during the export
    (the gathered export grows rank 0 by the whole model; the streamed one by a 64 MiB gather
    bucket and the largest tensor). Measurement and malloc setting as in test_partitioned_load.py."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    growths = run_group(functools.partial(_export_and_measure, model_dir=big_model_dir, tokenizer_dir=tiny_model_dir,
                                          out_root=tmp_path), world_size=2)
    streamed, gathered = tmp_path / "streamed", tmp_path / "gathered"
    names = sorted(p.name for p in gathered.iterdir())
    assert names == sorted(p.name for p in streamed.iterdir())
    assert "model.safetensors" in names
    for name in names:
        assert filecmp.cmp(gathered / name, streamed / name, shallow=False), name
    full_fp32_bytes = 4 * BIG_NUM_PARAMS
    for rank, (growth, gathered_growth) in enumerate(growths):
        print(f"rank {rank}: peak RSS growth during the export {growth / full_fp32_bytes:.2f}x the fp32 model "
              f"(the gathered export: {gathered_growth / full_fp32_bytes:.2f}x)")
        assert growth < 0.5 * full_fp32_bytes, (rank, growth / full_fp32_bytes)
    # the probe sees a whole-model copy where there is one
    assert growths[0][1] > 1.0 * full_fp32_bytes, growths[0][1] / full_fp32_bytes
