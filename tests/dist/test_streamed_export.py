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


def _zero2_checkpoint(rank, world_size, *, model_dir, out):
    import deepspeed
    import torch

    from safer_dist.train.models import load_model

    model = load_model(model_dir, dtype=torch.float32)
    ds_config = {"train_batch_size": world_size, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds_config)
    engine.save_checkpoint(str(out), tag="step_1")
    return True


def _fetch_and_measure(rank, world_size, *, checkpoint):
    import deepspeed.checkpoint.constants  # noqa: F401 - imported before the baseline
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from safer_dist.checkpointing.export import lazy_state_dict

    def peak_growth(fetch_all) -> tuple[int, dict]:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before_kb = _status_kb("VmRSS")
        digest = fetch_all()
        return (_status_kb("VmHWM") - before_kb) * 1024, digest

    def ours():
        # what `safer export` does: fetch each tensor, cast it, write it, let it go
        return {k: float(get().sum()) for k, get in lazy_state_dict(checkpoint).items()}

    def deepspeeds():  # its lazy mode, as `safer export` used it for ZeRO-1/2
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True)
        return {k: float(v.contiguous().detach().sum()) for k, v in lazy.items()}

    growth, digest = peak_growth(ours)
    ds_growth, ds_digest = peak_growth(deepspeeds)
    return growth, ds_growth, digest == ds_digest


def test_zero2_checkpoint_export_reads_a_tensor_at_a_time(big_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """`safer export` of a 2-rank ZeRO-2 checkpoint of the ~99M-parameter model: the weights
    equal DeepSpeed's consolidation, and fetching all of them (as the export does) grows resident
    memory by less than half the fp32 model; DeepSpeed's own lazy mode, which concatenates the
    ranks' fp32 partitions (and loads the 16-bit model-states file whole), grows it by more than
    the whole model. The exact per-tensor equality is in tests/ray/test_checkpoint_faults.py."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    run_group(functools.partial(_zero2_checkpoint, model_dir=big_model_dir, out=tmp_path), world_size=2)
    checkpoint = tmp_path / "step_1"
    assert len(list(checkpoint.glob("*optim_states.pt"))) == 2
    [(growth, ds_growth, same)] = run_group(functools.partial(_fetch_and_measure, checkpoint=checkpoint), world_size=1)
    full_fp32_bytes = 4 * BIG_NUM_PARAMS
    print(f"peak RSS growth while fetching every tensor: {growth / full_fp32_bytes:.2f}x the fp32 model "
          f"(DeepSpeed's lazy mode: {ds_growth / full_fp32_bytes:.2f}x)")
    assert same
    assert growth < 0.5 * full_fp32_bytes, growth / full_fp32_bytes
    assert ds_growth > 1.0 * full_fp32_bytes, ds_growth / full_fp32_bytes  # the probe sees a whole-model copy
