"""`safer export`: a Hugging Face directory from a DeepSpeed checkpoint (no Ray, no process group; CPU)."""

from __future__ import annotations

import os
from pathlib import Path

from safer_dist.checkpointing.checkpoint import (
    COMPLETE,
    CheckpointError,
    Checkpointer,
    is_complete,
    load_checkpoint_meta,
    verify_manifest,
)
from safer_dist.checkpointing.safe_load import weights_only_torch_load
from safer_dist.config import CheckpointSection
from safer_dist.runtime.log import get_logger, quiet_libraries

log = get_logger("export")


def resolve_checkpoint(source: str | Path, stage: str | None = None) -> Path:
    """``source`` if it is a checkpoint directory, else the newest complete checkpoint of the
    run directory ``source`` (of ``stage``, or of whichever stage saved last)."""
    p = Path(source)
    if not p.is_dir():
        raise ValueError(f"{source}: no such run directory or checkpoint directory")
    if is_complete(p):
        return p
    if p.name.startswith("step_"):
        raise CheckpointError(f"{source}: checkpoint is incomplete (no {COMPLETE} marker)")
    root = p / "checkpoints"
    stages = [stage] if stage else sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    found = [c for s in stages if (c := Checkpointer(CheckpointSection(), root / s).latest_complete())]
    if not found:
        where = root / stage if stage else root
        raise ValueError(f"{source}: no complete checkpoint under {where}")
    return max(found, key=lambda c: (c / COMPLETE).stat().st_mtime_ns)


def consolidated_state_dict(checkpoint: Path) -> dict:
    """The fp32 weights of a ZeRO-0/1/2/3 checkpoint, consolidated on CPU, weights-only loads."""
    checkpoint = Path(checkpoint)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with weights_only_torch_load():
        if any(checkpoint.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        import torch

        states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu")
        return {k: v.float() for k, v in states["module"].items()}


def lazy_state_dict(checkpoint: Path) -> dict:
    """``name -> fetch()`` of the fp32 weights of a ZeRO-0/1/2/3 checkpoint: the files are read
    (weights-only, memory-mapped) up front, each tensor consolidated only when fetched. ZeRO-3
    partitions are gathered per tensor (DeepSpeed's lazy mode); ZeRO-1/2 tensors are cut from
    the ranks' fp32 partitions (:mod:`safer_dist.checkpointing.zero12_lazy`; DeepSpeed itself
    would concatenate them into one vector, the whole fp32 model in memory)."""
    import torch

    from safer_dist.checkpointing.zero12_lazy import lazy_zero12_state_dict, zero12_stage

    checkpoint = Path(checkpoint)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stage = zero12_stage(checkpoint)
    if stage is not None and stage <= 2:
        return lazy_zero12_state_dict(checkpoint)
    with weights_only_torch_load():
        if stage is not None:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True)
            return {k: v.contiguous for k, v in lazy.items()}
        states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True)
        return {k: v.float for k, v in states["module"].items()}


def export_checkpoint(source: str | Path, out_dir: str | Path, *, stage: str | None = None, dtype: str = "float32") -> Path:
    """Write ``out_dir`` (safetensors, config, generation config, tokenizer) from a checkpoint,
    tensor by tensor (:mod:`safer_dist.checkpointing.streamed_export`).

    The architecture and tokenizer come from the ``model.path`` recorded in the checkpoint's
    config.yaml; the weights are the checkpoint's fp32 master weights (cast to ``dtype``). A
    checkpoint of LoRA training exports merged weights, and the adapters alone in
    ``out_dir/adapter/`` (:mod:`safer_dist.train.lora`).
    The checkpoint is verified against its manifest first.
    """
    # Heavy: the CLI imports this module for `safer export` only.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from safer_dist.checkpointing.streamed_export import export_streamed, module_layout
    from safer_dist.train import lora
    from safer_dist.train.models import load_tokenizer

    quiet_libraries()
    ckpt = resolve_checkpoint(source, stage)
    verify_manifest(ckpt)
    saved = load_checkpoint_meta(ckpt)["config"]
    model_cfg = saved.get("model", {})
    model_path, trust = model_cfg.get("path"), bool(model_cfg.get("trust_remote_code", False))
    if not model_path or not (Path(model_path) / "config.json").is_file():
        raise ValueError(f"{ckpt}/config.yaml: model.path={model_path!r} is not a local Hugging Face directory "
                         "(the export takes the architecture and tokenizer from it)")
    weights = lazy_state_dict(ckpt)
    also = None
    if lora.has_adapters(weights):  # merged into the plain model; the adapters alone beside it
        adapters = {k: get() for k, get in weights.items() if lora.is_adapter_name(k)}
        also = lora.checkpoint_adapter_writer(ckpt, saved, adapters)
        weights = lora.merged_lazily(weights, lora.scaling(lora.lora_section_of(saved)))
    config = AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust)
    with torch.device("meta"):  # names, shapes and the config only; the weights stream from the checkpoint
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust, dtype=getattr(torch, dtype))
    if (Path(model_path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_path, local_files_only=True)
    layout = module_layout(model)
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if unexpected:
        raise ValueError(f"{ckpt}: weights {unexpected[:5]} do not belong to the model of {model_path}")
    missing = [k for k in layout if k not in weights]
    if missing:
        raise ValueError(f"{ckpt}: no weights for {missing[:5]}")
    tensors = ((k, weights[k]().to(t.dtype)) for k, t in layout.items())
    export_streamed(out_dir, model, load_tokenizer(model_path, trust_remote_code=trust), layout, tensors, rank=0,
                    num_parameters=model.num_parameters(), also=also)
    log.info("exported %s (%d tensors, %s) to %s", ckpt, len(layout), dtype, out_dir)
    return Path(out_dir)
