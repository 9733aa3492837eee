"""Hugging Face exports written tensor by tensor, so no host ever holds the whole model.

``save_pretrained`` takes a state dict: the whole model in one host's memory (140 GB at 70B in
bf16, on a node whose memory estimate never counted it). Here the layout comes first and the
tensors after, one at a time:

1. **Layout.** Names, shapes and dtypes only (meta tensors): the tied weights that
   ``save_pretrained`` drops are dropped the same way, the shards are cut by the same function
   (``huggingface_hub.split_torch_state_dict_into_shards``, transformers' default
   ``max_shard_size``), and the order of the tensors inside a file is asked of safetensors
   itself (one-element stand-ins). Each file's header is written before any tensor exists.
2. **Tensors**, in any order, each written at its offset (``os.pwrite``) and released. Under
   ZeRO-3 every rank gathers a bucket of parameters at a time and rank 0 writes them.
3. **The rest**: config and generation config as ``save_pretrained`` writes them (it is called
   with an empty state dict), and the index of a sharded export.

The files equal ``save_pretrained``'s byte for byte (tests/unit/test_streamed_export.py;
tests/dist/test_streamed_export.py for ZeRO-3 and a ~100M model under a memory probe).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from safer_dist.runtime.log import get_logger
from safer_dist.weights.channel import buckets

log = get_logger("export")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GATHER_BUCKET_MB = 64.0  # ZeRO-3: parameters gathered (on every rank) per collective


def default_max_shard_size():
    """transformers' own default, so an export shards as ``save_pretrained`` would."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def meta_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A meta tensor of ``t``'s full shape (a ZeRO-3 partition's ``ds_shape``) and dtype."""
    return torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=dtype or t.dtype, device="meta")


def module_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What ``model.save_pretrained()`` would write, as meta tensors: its state dict without the
    tied copies (transformers' own rule). Works on a ZeRO-3 partitioned model."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    layout = {k: meta_like(v) for k, v in model.state_dict(keep_vars=True).items()}
    return saved_order(model, remove_tied_weights_from_state_dict(layout, model))


def saved_order(model: torch.nn.Module, layout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``layout`` in the order ``save_pretrained`` shards it (after transformers' weight
    conversions, which may reorder). Architectures whose saved names differ from their module
    names (conversions that rename or fuse, e.g. MoE experts) are refused: their tensors cannot
    be written one at a time."""
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(model, dict(layout))
    if reverted.keys() != layout.keys():
        raise ValueError(f"{type(model).__name__} renames or fuses weights when saved (transformers' weight "
                         "conversions); the streamed export supports models saved under their module names only")
    return {k: layout[k] for k in reverted}


def _safetensors_order(layout: dict[str, torch.Tensor]) -> list[str]:
    """The order safetensors gives these tensors in a file (by dtype, then name), read from a
    file of one-element stand-ins, so it follows the installed safetensors."""
    from safetensors.torch import save

    blob = save({k: torch.zeros(1, dtype=v.dtype) for k, v in layout.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    return [k for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _header(layout: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The safetensors header (length prefix, JSON padded with spaces to 8 bytes) and each
    tensor's byte range from the start of the file."""
    entries: dict = {"__metadata__": metadata} if metadata else {}
    ranges, offset = {}, 0
    for name in _safetensors_order(layout):
        t = layout[name]
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        ranges[name] = (offset, nbytes)
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {k: (start + o, n) for k, (o, n) in ranges.items()}


class ShardWriter:
    """Safetensors shards (and their index) of ``layout`` in ``out_dir``, filled by
    :meth:`write` one tensor at a time in any order; :meth:`close` fails naming any tensor
    never written. Only the headers and one tensor at a time are ever in memory."""

    def __init__(self, out_dir: str | Path, layout: dict[str, torch.Tensor], *, num_parameters: int,
                 max_shard_size: int | str | None = None, metadata: dict[str, str] | None = None):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.out_dir = Path(out_dir)
        self.layout = layout
        split = split_torch_state_dict_into_shards(layout, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size or default_max_shard_size())
        self._fds: dict[str, int] = {}
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        for filename, names in split.filename_to_tensors.items():
            header, ranges = _header({n: layout[n] for n in names}, {"format": "pt", **(metadata or {})})
            fd = os.open(self.out_dir / filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[filename] = fd
            _pwrite_all(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(n for _, n in ranges.values()))
            self._where.update((k, (fd, o, n)) for k, (o, n) in ranges.items())
        self._pending = set(layout)
        if split.is_sharded:
            index = {"metadata": {"total_parameters": num_parameters, **split.metadata},
                     "weight_map": split.tensor_to_filename}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.layout.get(name)
        if want is None:
            raise ValueError(f"export: {name} is not a weight of the exported model")
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise ValueError(f"export: {name} is {tuple(tensor.shape)} {tensor.dtype}, the model's is "
                             f"{tuple(want.shape)} {want.dtype}")
        fd, offset, nbytes = self._where[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes, (name, data.nbytes, nbytes)
        _pwrite_all(fd, memoryview(data), offset)
        self._pending.discard(name)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if self._pending:
            raise ValueError(f"export: no tensor written for {sorted(self._pending)[:5]}")


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_config(model: torch.nn.Module, out_dir: str | Path) -> None:
    """config.json and generation_config.json exactly as ``save_pretrained`` writes them (it
    is called with no weights; the empty weights file it leaves is removed)."""
    model.save_pretrained(out_dir, state_dict={}, safe_serialization=True)
    (Path(out_dir) / WEIGHTS_NAME).unlink(missing_ok=True)


def write_streamed(out_dir: str | Path, layout: dict[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]],
                   *, num_parameters: int, max_shard_size: int | str | None = None) -> None:
    """Write the shards of ``layout`` into ``out_dir`` from ``tensors`` (``(name, tensor)``,
    each released by the caller after it is yielded)."""
    writer = ShardWriter(out_dir, layout, num_parameters=num_parameters, max_shard_size=max_shard_size)
    try:
        for name, t in tensors:
            writer.write(name, t)
    finally:
        writer.close()


def num_parameters(model: torch.nn.Module) -> int:
    """``model.num_parameters()`` counted from full shapes (ZeRO-3 partitions hold none)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def _parameter_or_buffer(model: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def gathered_tensors(model: torch.nn.Module, names: list[str], *, zero3: bool, rank: int,
                     bucket_mb: float = GATHER_BUCKET_MB) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``model``'s parameters and buffers ``names`` on rank 0 (nothing on
    the others), a bucket of ZeRO-3 parameters gathered at a time. Collective under ZeRO-3:
    every rank must exhaust it."""
    for bucket in buckets([(n, _parameter_or_buffer(model, n)) for n in names], bucket_mb):
        ctx = contextlib.nullcontext()
        partitioned = [t for _, t in bucket if hasattr(t, "ds_id")]
        if zero3 and partitioned:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
        with ctx, torch.no_grad():
            if rank == 0:
                yield from ((n, t.data) for n, t in bucket)


def export_streamed(out_dir: str | Path, config_model: torch.nn.Module, tokenizer, layout: dict[str, torch.Tensor],
                    tensors: Iterable[tuple[str, torch.Tensor]], *, rank: int, num_parameters: int,
                    also: Callable[[Path], None] | None = None, max_shard_size: int | str | None = None) -> None:
    """A Hugging Face directory in ``out_dir`` (replaced atomically, on rank 0): the config of
    ``config_model``, the shards of ``layout`` filled from ``tensors``, the tokenizer, and
    ``also(dir)`` (the LoRA adapter directory). Every rank exhausts ``tensors`` (collective when
    it gathers), also when rank 0 fails to write."""
    from safer_dist.runtime.io import atomic_write_dir

    if rank != 0:
        for _ in tensors:
            pass
        return

    def fill(tmp: Path) -> None:
        try:
            write_config(config_model, tmp)
            write_streamed(tmp, layout, tensors, num_parameters=num_parameters, max_shard_size=max_shard_size)
        except BaseException:
            for _ in tensors:  # the other ranks wait in the gathers: finish them, then fail
                pass
            raise
        tokenizer.save_pretrained(tmp)
        if also is not None:
            also(tmp)

    atomic_write_dir(out_dir, fill)
    log.info("exported %d tensors to %s", len(layout), out_dir)


def export_module(model: torch.nn.Module, tokenizer, out_dir: str | Path, *, zero3: bool, rank: int,
                  max_shard_size: int | str | None = None, bucket_mb: float = GATHER_BUCKET_MB) -> None:
    """``model`` (plain, or a ZeRO-3 partitioned one) as a Hugging Face directory in ``out_dir``.
    Collective under ZeRO-3."""
    layout = module_layout(model)
    tensors = gathered_tensors(model, list(layout), zero3=zero3, rank=rank, bucket_mb=bucket_mb)
    export_streamed(out_dir, model, tokenizer, layout, tensors, rank=rank, num_parameters=num_parameters(model),
                    max_shard_size=max_shard_size)
