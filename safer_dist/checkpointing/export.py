"""Writing Hugging Face model directories atomically."""

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
from safer_dist.runtime.io import atomic_write_dir
from safer_dist.runtime.log import get_logger, quiet_libraries

log = get_logger("export")


def save_hf_atomically(model, tokenizer, out_dir: str | Path, state_dict=None, also=None) -> Path:
    """save_pretrained (safetensors) + tokenizer into ``out_dir``, replacing it in one rename;
    ``also(dir)`` adds files (the LoRA adapter directory).

    The directory is built next to its destination and swapped in, so a crash leaves either
    the old export or the new one, never a mixture.
    """
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if also is not None:
            also(tmp)

    return atomic_write_dir(out_dir, fill)


def model_of_state_dict(config, state_dict: dict, *, trust_remote_code: bool, source: str, model_name: str):
    """The causal LM of ``config`` holding the tensors of ``state_dict`` (assigned, not copied;
    tied weights tied). ValueError naming ``source`` for a weight the model lacks or a missing one."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{source}: weights {result.unexpected_keys[:5]} do not belong to {model_name}")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{source}: no weights for {missing[:5]}")
    return model


# -- export from a DeepSpeed checkpoint (no Ray, no process group; CPU) -------------------------


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


def export_checkpoint(source: str | Path, out_dir: str | Path, *, stage: str | None = None, dtype: str = "float32") -> Path:
    """Write ``out_dir`` (safetensors, config, generation config, tokenizer) from a checkpoint.

    The architecture and tokenizer come from the ``model.path`` recorded in the checkpoint's
    config.yaml; the weights are the checkpoint's fp32 master weights (cast to ``dtype``). A
    checkpoint of LoRA training exports merged weights, and the adapters alone in
    ``out_dir/adapter/`` (:mod:`safer_dist.train.lora`).
    The checkpoint is verified against its manifest first.
    """
    # Heavy: the CLI imports this module for `safer export` only.
    import torch
    from transformers import AutoConfig, GenerationConfig

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
    state_dict = consolidated_state_dict(ckpt)
    also = None
    if lora.has_adapters(state_dict):  # merged into the plain model; the adapters alone beside it
        also = lora.checkpoint_adapter_writer(ckpt, saved, state_dict)
        state_dict = lora.merge_state_dict(state_dict, lora.scaling(lora.lora_section_of(saved)))
    config = AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust)
    model = model_of_state_dict(config, state_dict, trust_remote_code=trust, source=f"{ckpt}",
                                model_name=f"the model of {model_path}").to(getattr(torch, dtype))
    if (Path(model_path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_path, local_files_only=True)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust)
    out = save_hf_atomically(model, tokenizer, out_dir, also=also)
    log.info("exported %s (%d tensors, %s) to %s", ckpt, len(state_dict), dtype, out)
    return out
