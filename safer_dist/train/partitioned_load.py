"""Load a local Hugging Face causal LM straight into DeepSpeed ZeRO-3 partitions (learners only).

transformers' own ZeRO-3 path (``from_pretrained`` under an ``HfDeepSpeedConfig``) reads the
whole checkpoint into host memory before it copies it into the partitions: on every rank in
transformers 5.17, on rank 0 in later 5.x releases. For a 70B model that is 131 GiB of host
RAM per learner in bf16, eight learners to a node. Here instead:

1. the model is constructed inside ``deepspeed.zero.Init`` with weight initialisation off:
   each module's parameters are partitioned as soon as the module is built, so a rank never
   allocates more than one module's full weights;
2. each rank reads from the safetensors files only the bytes of its own partitions. A ZeRO-3
   partition is a contiguous range of the flattened (row-major) tensor — rank ``r`` holds
   elements ``[r * s, (r + 1) * s)`` of each parameter, ``s = ceil(numel / W)`` — hence one
   contiguous byte range of the file, read with plain ``readinto`` (not mmap, whose touched
   pages would count against the process) into a buffer of that partition's size.

No collective runs during the load and no rank ever holds the full weights: each rank's
memory grows by its partitions (``1/W`` of the model) plus one module while it is built.

Afterwards an ``HfDeepSpeedConfig`` is registered, so transformers treats the model as ZeRO-3
(``resize_token_embeddings`` gathers the partitioned embedding, ``generate`` syncs ranks).
transformers keeps only a weak reference to it: the caller keeps the returned object alive for
as long as the model lives (the learner holds it on itself). While it lives, transformers also
builds every other model of the process under ZeRO-3, so a process that holds it loads no other
model; rollout workers are processes of their own and load whole models with
:func:`safer_dist.train.models.load_model`, unaffected.

Supported checkpoints: ``model.safetensors`` or a sharded ``model.safetensors.index.json``
whose tensor names are the model's parameter names (what ``save_pretrained`` writes, also for
Llama, Qwen2 and Mistral checkpoints on the hub). A missing or mis-shaped tensor is an error
naming it; load other formats with ``learner.zero_stage`` below 3, or re-save them with
``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from safer_dist.runtime.log import get_logger

log = get_logger("partitioned_load")

# safetensors dtype names -> torch dtypes (the format is little-endian, like every host we run on)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file: bytes ``[offset, offset + numel * itemsize)``."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(file: str | Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file (8-byte little-endian header size, JSON header,
    then the data; each entry's ``data_offsets`` count from the start of the data)."""
    file = Path(file)
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {meta['dtype']}, which a partitioned load cannot read")
        entries[name] = TensorEntry(file, _DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + size + meta["data_offsets"][0])
    return entries


def checkpoint_index(model_dir: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors checkpoint in ``model_dir`` (single file or sharded)."""
    model_dir = Path(model_dir)
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return read_header(single)
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {name: e for f in files for name, e in read_header(model_dir / f).items()}
    raise ValueError(
        f"{model_dir} has no model.safetensors or model.safetensors.index.json: a ZeRO-3 learner "
        "(learner.zero_stage=3) loads only safetensors checkpoints; re-save the model with "
        "save_pretrained(safe_serialization=True) or use learner.zero_stage<3"
    )


def read_flat(f: BinaryIO, entry: TensorEntry, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements ``[start, end)`` of the flattened tensor ``entry`` from the open file ``f``, read
    into ``out`` (a contiguous 1-D CPU tensor of the file's dtype and ``end - start`` elements;
    allocated if None) and returned. Reads exactly those bytes."""
    if out is None:
        out = torch.empty(end - start, dtype=entry.dtype)
    assert out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous() and out.numel() == end - start
    f.seek(entry.offset + start * out.element_size())
    view = memoryview(out.view(torch.uint8).numpy())
    if f.readinto(view) != len(view):
        raise ValueError(f"{entry.file}: truncated file (tensor at byte {entry.offset} runs past its end)")
    return out


def load_model_partitioned(
    path: str | Path,
    *,
    dtype: torch.dtype,
    ds_config: dict,
    attn_implementation: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Build the causal LM of the local directory ``path`` partitioned for ZeRO-3 and load its
    weights; return ``(model, hf_ds_config)``. Call after ``torch.distributed`` is initialised,
    on every rank; ``ds_config`` is the config later given to ``deepspeed.initialize`` (its
    ``zero_optimization`` decides partitioning and parameter offload).

    The model is what :func:`safer_dist.train.models.load_model` returns — same config, generation
    config, attention backend, ``use_cache=False``, eval mode (``from_pretrained``'s) — except
    that its parameters are ZeRO-3 partitions. Keep ``hf_ds_config`` alive as long as the model.
    """
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from safer_dist.train.attention import resolve_attn_implementation
    from safer_dist.train.attention_kernels import register_varlen_attention
    from safer_dist.train.models import _check_local_dir

    path = _check_local_dir(path, ("config.json",), "model")
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("load_model_partitioned needs a DeepSpeed config with zero_optimization.stage 3")
    implied = (torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else
               torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    if implied != dtype:
        raise ValueError(f"dtype {dtype} disagrees with the DeepSpeed config's bf16/fp16 flags ({implied})")
    index = checkpoint_index(path)
    attn = resolve_attn_implementation(attn_implementation, torch.device(device).type)
    register_varlen_attention()
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    # No HfDeepSpeedConfig while constructing: with one registered, from_config would open its own
    # zero.Init and then gather every module to initialise weights we are about to overwrite.
    unset_hf_deepspeed_config()
    # zero.Init would cast every floating tensor a torch constructor makes to the training dtype,
    # RoPE's torch.arange(..., dtype=torch.float) included (bf16 rotary frequencies, unlike
    # from_pretrained's fp32): let it place tensors only; from_config(dtype=) sets the weights' dtype.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config,
                                                tensor_overrides=[DeepSpeedTensorOverride.device]):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code,
        )
    model.tie_weights()
    _load_partitions(model, index, path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    model.config.use_cache = False
    model.eval()  # what from_pretrained returns; the learner never switches modes
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    return model, hf_ds_config


def _load_partitions(model: torch.nn.Module, index: dict[str, TensorEntry], path: Path) -> None:
    """Copy this rank's partition of every parameter (and every checkpointed buffer, whole)."""
    import torch.distributed as dist

    prefix = getattr(model, "base_model_prefix", "")
    names: dict[int, list[str]] = {}  # tied parameters appear under several names
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params[id(p)] = p
        names.setdefault(id(p), []).append(name)

    def entry_for(candidates: list[str]) -> tuple[str, TensorEntry] | None:
        for name in candidates:
            # checkpoints of the bare base model lack the "<base_model_prefix>." of the causal LM
            stripped = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
            for key in (name, stripped):
                if key is not None and key in index:
                    return key, index[key]
        return None

    missing, used = [], set()
    plan: list[tuple[torch.nn.Parameter, str, TensorEntry]] = []
    for pid, p in params.items():
        found = entry_for(names[pid])
        if found is None:
            missing.append(names[pid][0])
            continue
        key, entry = found
        if entry.shape != tuple(p.ds_shape):
            raise ValueError(f"{path}: tensor {key} has shape {list(entry.shape)}; the model expects {list(p.ds_shape)}")
        used.add(key)
        plan.append((p, key, entry))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} parameter(s) of the model, e.g. "
                         f"{missing[:5]}; a partitioned load (learner.zero_stage=3) needs them all")

    with torch.no_grad(), ExitStack() as stack:
        files: dict[Path, BinaryIO] = {}

        def handle(entry: TensorEntry) -> BinaryIO:
            if entry.file not in files:
                files[entry.file] = stack.enter_context(open(entry.file, "rb", buffering=0))
            return files[entry.file]

        for p, key, entry in sorted(plan, key=lambda x: (str(x[2].file), x[2].offset)):
            part = p.ds_tensor  # this rank's flat slice, padded to the same size on every rank
            assert part.dim() == 1 and getattr(p, "ds_secondary_tensor", None) is None, key
            size, numel = part.numel(), p.ds_numel
            assert size * dist.get_world_size(group=p.ds_process_group) >= numel, key
            start = min(size * dist.get_rank(group=p.ds_process_group), numel)
            end = min(start + size, numel)
            if end > start:
                dst = part[: end - start]
                if dst.device.type == "cpu" and dst.dtype == entry.dtype:
                    read_flat(handle(entry), entry, start, end, out=dst)  # no staging copy
                else:
                    dst.copy_(read_flat(handle(entry), entry, start, end))
            part[end - start:].zero_()
        for name, buf in model.named_buffers():
            found = entry_for([name])
            if found is not None and buf is not None:
                key, entry = found
                used.add(key)
                buf.copy_(read_flat(handle(entry), entry, 0, entry.numel).view(entry.shape))
    unused = sorted(set(index) - used)
    if unused:
        log.warning("%s: %d checkpoint tensor(s) match no parameter of the model and were not loaded, e.g. %s",
                    path, len(unused), unused[:5])
