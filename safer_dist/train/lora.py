"""LoRA adapters on a learner's model (``model.lora``, built with peft), and QLoRA's 4-bit base.

With ``model.lora.rank > 0`` a learner injects peft LoRA layers into its Hugging Face model in
place (``peft.inject_adapter_in_model``, not ``get_peft_model``): ``engine.module`` stays the
causal LM, so the loss head (:mod:`safer_dist.train.lm_head`), the attention backends and the
ZeRO-3 partitioned load (:mod:`safer_dist.train.partitioned_load`, which runs before the
injection) work unchanged. Each targeted ``nn.Linear`` ``<m>`` becomes a peft layer holding the
frozen ``<m>.base_layer`` and the trainable ``<m>.lora_A.default`` ([r, in]) and
``<m>.lora_B.default`` ([out, r], zero at initialisation, so the adapted model starts equal to
the base). Its output is ``base(x) + B(A(dropout(x))) * alpha / r``. Every other parameter is
frozen, and the DeepSpeed engine and optimizer get the adapter parameters only. Adapters take
the base weights' dtype (peft does not up-cast them here), which ZeRO-3 needs.

Outside the learners models are plain: exports hold *merged* weights, ``W + (B @ A) * alpha / r``
under the plain model's names (:func:`merge_state_dict`; :meth:`Adapters.merged_buckets` for the
live, possibly partitioned model), and rollout workers receive the adapters alone and merge them
the same way (:mod:`safer_dist.weights.adapters`). ``export`` also
writes the adapters alone to ``<out>/adapter/`` (:data:`ADAPTER_DIR`), which
``peft.PeftModel.from_pretrained(<base model>, "<out>/adapter")`` loads; its
``base_model_name_or_path`` names the model the adapters were trained on (for ERPO: the SFT
export).

DeepSpeed checkpoints hold the whole module (frozen base included, so an ERPO checkpoint
exports without its starting model) and the optimizer state of the adapters only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from safer_dist.config import LoraSection, ModelSection
from safer_dist.runtime.log import get_logger

log = get_logger("lora")

ADAPTER = "default"  # peft's adapter name; it appears in the learner's parameter names
ADAPTER_DIR = "adapter"  # inside an export: the adapters alone, for peft
# The parameter-name components peft gives adapter weights (LoraLayer.adapter_layer_names).
_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})


# -- configuration checks (before anything starts) -----------------------------------------------

_NO_PEFT = "model.lora.rank > 0 needs the peft package: pip install 'safer[lora]' (or peft), or set model.lora.rank=0"


def check_adapters(model: ModelSection, device: str) -> None:
    """ValueError naming the key when ``model.lora`` needs peft and it is not installed, or
    when the 4-bit base (``model.quantization``) cannot be loaded on ``device`` ("cpu" |
    "cuda" | "auto": CUDA when visible here)."""
    if model.lora.enabled and importlib.util.find_spec("peft") is None:
        raise ValueError(_NO_PEFT)
    if model.quantization == "none":
        return
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        raise ValueError(
            "model.quantization=4bit loads the base weights with bitsandbytes' NF4 CUDA kernels, which need a GPU "
            f"(launch.device resolves to {device} here); set model.quantization=none to train the adapters on an "
            "unquantized base (or launch.device=cuda where the learners have GPUs this process cannot see)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("model.quantization=4bit needs the bitsandbytes package (pip install bitsandbytes); "
                         "or set model.quantization=none")


def peft_config(section: LoraSection):
    """The ``peft.LoraConfig`` of ``model.lora``."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError(_NO_PEFT) from None
    spec = section.target_modules.strip()
    targets = spec if spec == "all-linear" else [m.strip() for m in spec.split(",")]
    return LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def load_quantized(path: str, *, attn_implementation: str, trust_remote_code: bool):
    """``path``'s causal LM on this process's CUDA device with NF4 base weights and bf16 compute
    (QLoRA). Linear weights of the blocks are 4-bit; embeddings, norms and the LM head stay bf16.
    Only ZeRO stages below 3 take it (the config check says so). Untested on CPU by nature."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from safer_dist.train.attention import resolve_attn_implementation
    from safer_dist.train.attention_kernels import register_varlen_attention
    from safer_dist.train.models import _check_local_dir

    path = _check_local_dir(path, ("config.json",), "model")
    register_varlen_attention()
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.uint8,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.bfloat16, quantization_config=quant,
        attn_implementation=resolve_attn_implementation(attn_implementation, "cuda"),
        device_map={"": torch.cuda.current_device()}, trust_remote_code=trust_remote_code,
    )
    model.config.use_cache = False
    return model


# -- the learner's adapters -----------------------------------------------------------------------


class _TrainingDropout(torch.nn.Dropout):
    """Dropout in training steps only, whatever the module mode: the learners' models stay in
    eval mode, and log-probs and evaluation run without gradients (hence without dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=torch.is_grad_enabled())


def is_adapter_name(name: str) -> bool:
    return not _ADAPTER_PARTS.isdisjoint(name.split("."))


class Adapters:
    """LoRA layers injected into ``model`` (in place, before ``deepspeed.initialize``) with
    everything but the adapters frozen. ``gradient_checkpointing``: the model checkpoints its
    layers, so the (frozen) embeddings' output is made to require grad."""

    def __init__(self, section: LoraSection, model: torch.nn.Module, *, gradient_checkpointing: bool = False):
        self.section = section
        self.config = peft_config(section)
        from peft import inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        for p in model.parameters():
            p.requires_grad_(False)
        try:
            inject_adapter_in_model(self.config, model, adapter_name=ADAPTER)
        except ValueError as e:  # e.g. target modules not found
            raise ValueError(f"model.lora.target_modules={section.target_modules!r}: {e}") from None
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        if section.dropout > 0:
            for layer in self.layers.values():
                layer.lora_dropout[ADAPTER] = _TrainingDropout(section.dropout)
        if gradient_checkpointing:
            model.enable_input_require_grads()
        self._sync_initial_adapters(model)
        self.num_trainable = sum(_numel(p) for p in self.trainable(model))
        self.num_total = sum(_numel(p) for p in model.parameters())

    @staticmethod
    def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def _sync_initial_adapters(self, model: torch.nn.Module) -> None:
        """Every rank starts from rank 0's random A (ZeRO-3 partitions each rank's own copy)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # NCCL sends CUDA tensors only; adapters sit on the CPU beside offloaded ZeRO-3 parameters.
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            with torch.no_grad():
                for p in self.trainable(model):
                    data = p.data
                    t = data if device is None else data.to(device)
                    dist.broadcast(t, 0)
                    if t.data_ptr() != data.data_ptr():
                        data.copy_(t)

    def describe(self) -> str:
        s = self.section
        return (f"LoRA rank {s.rank}, alpha {s.alpha:g} on {len(self.layers)} layers ({s.target_modules}): "
                f"{self.num_trainable:,} trainable of {self.num_total:,} parameters "
                f"({100 * self.num_trainable / max(self.num_total, 1):.2f}%)")

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model inside the block (every adapter off), adapters back on after it."""
        for layer in self.layers.values():
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.enable_adapters(True)

    # -- merged weights for rollout workers and exports --------------------------------------------

    def plain_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """``model``'s parameters under the names and in the order of the plain model
        (``named_parameters()``, tied weights once): adapters left out, ``<m>.base_layer.x``
        named ``<m>.x``."""
        out = []
        for name, p in model.named_parameters():
            if is_adapter_name(name):
                continue
            out.append((name.replace(".base_layer.", "."), p))
        return out

    def merged_buckets(self, model: torch.nn.Module, *, zero3: bool, rank: int, bucket_mb: float):
        """Yield, per bucket of :func:`safer_dist.weights.channel.buckets` over
        :meth:`plain_parameters`, ``[(name, merged weight)]`` on rank 0 (``None`` elsewhere), a
        4-bit base dequantized. Collective under ZeRO-3: every rank gathers each bucket's base
        weights and adapters (a bucket at a time, so no rank holds the whole model)."""
        from safer_dist.weights.channel import buckets

        params = dict(self.plain_parameters(model))
        # A 4-bit weight counts as the bf16 weight it stands for.
        sizes = [(n, _as_received(p)) for n, p in params.items()]
        for sized in buckets(sizes, bucket_mb):
            bucket = [(n, params[n]) for n, _ in sized]
            layers = [(n, self.layers.get(n.rpartition(".")[0]) if n.endswith(".weight") else None) for n, _ in bucket]
            adapters = [w for _, layer in layers if layer is not None
                        for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
            ctx = contextlib.nullcontext()
            if zero3:
                import deepspeed

                ctx = deepspeed.zero.GatheredParameters([p for _, p in bucket] + adapters, modifier_rank=None)
            with ctx, torch.no_grad():
                if rank != 0:
                    yield None
                    continue
                out = []
                for (name, p), (_, layer) in zip(bucket, layers):
                    w = _dequantized(p)
                    if layer is not None:
                        w = merge_weight(w, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                                         layer.scaling[ADAPTER])
                    out.append((name, w))
                yield out

    def merged_state_dict(self, model: torch.nn.Module, *, zero3: bool, rank: int) -> dict[str, torch.Tensor] | None:
        """The merged weights under the plain names, on CPU, on rank 0 (None elsewhere). Collective under ZeRO-3."""
        out: dict[str, torch.Tensor] = {}
        for bucket in self.merged_buckets(model, zero3=zero3, rank=rank, bucket_mb=256.0):
            if bucket is not None:
                out.update((n, w.detach().cpu().clone()) for n, w in bucket)
        return out if rank == 0 else None

    def adapter_state_dict(self, model: torch.nn.Module, *, zero3: bool, rank: int) -> dict[str, torch.Tensor] | None:
        """The adapter weights under the learner's parameter names, on CPU, on rank 0 (None
        elsewhere). Collective under ZeRO-3."""
        named = [(n, p) for n, p in model.named_parameters() if is_adapter_name(n)]
        ctx = contextlib.nullcontext()
        if zero3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        with ctx:
            if rank != 0:
                return None
            return {n: p.detach().cpu().clone() for n, p in named}


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _as_received(p: torch.Tensor) -> torch.Tensor:
    """``p``, or for a bitsandbytes 4-bit parameter an empty stand-in of the bf16 weight it holds."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is None:
        return p
    return torch.empty(tuple(quant_state.shape), dtype=torch.bfloat16, device="meta")


def _dequantized(p: torch.Tensor) -> torch.Tensor:
    """``p`` itself, or the bf16 weight of a bitsandbytes 4-bit parameter (QLoRA)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is None:
        return p.data
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(p.data, quant_state).to(torch.bfloat16)


def merge_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``w + (b @ a) * scaling`` ([out, in] from [out, in], [r, in], [out, r]), summed in fp32 and
    returned in ``w``'s dtype."""
    return (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)


# -- state dicts (exports, also from checkpoints) --------------------------------------------------


def has_adapters(state_dict: dict) -> bool:
    return any(is_adapter_name(k) for k in state_dict)


def merge_state_dict(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A learner's state dict (``<m>.base_layer.weight``, ``<m>.lora_A.default.weight``, ...)
    as the plain model's: each adapted weight merged with :func:`merge_weight`, adapters dropped."""
    lazy = merged_lazily({k: (lambda v=v: v) for k, v in state_dict.items()}, scaling)
    return {k: get() for k, get in lazy.items()}


def merged_lazily(weights: dict[str, Callable[[], torch.Tensor]], scaling: float) -> dict[str, Callable[[], torch.Tensor]]:
    """:func:`merge_state_dict` over weights fetched on demand (``name -> fetch()``): the plain
    model's names, each fetching (and merging) its tensor only when called, so an export can
    write them one at a time."""
    out = {}
    for name, get in weights.items():
        if is_adapter_name(name):
            continue
        if name.endswith(".base_layer.weight"):
            m = name[: -len(".base_layer.weight")]
            get = functools.partial(_fetch_merged, get, weights[f"{m}.lora_A.{ADAPTER}.weight"],
                                    weights[f"{m}.lora_B.{ADAPTER}.weight"], scaling)
        out[name.replace(".base_layer.", ".")] = get
    return out


def _fetch_merged(w, a, b, scaling: float) -> torch.Tensor:
    return merge_weight(w(), a(), b(), scaling)


def write_adapter_dir(out_dir: str | Path, state_dict: dict[str, torch.Tensor], section: LoraSection,
                      base_model: str) -> Path:
    """Write the adapters of ``state_dict`` (learner names; other entries ignored) as a peft
    adapter directory: ``adapter_config.json`` (the targets are the adapted modules' names) and
    ``adapter_model.safetensors`` under peft's saved names
    (``base_model.model.<m>.lora_A.weight``)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = f".lora_A.{ADAPTER}.weight"
    adapted = sorted(k[: -len(marker)] for k in state_dict if k.endswith(marker))
    if not adapted:
        raise ValueError("no LoRA adapters in the state dict")
    tensors = {}
    for m in adapted:
        for part in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{m}.{part}.weight"] = state_dict[f"{m}.{part}.{ADAPTER}.weight"].contiguous()
    config = peft_config(section)
    config.target_modules = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    config.base_model_name_or_path = str(base_model)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def lora_section_of(saved_config: dict) -> LoraSection:
    """``model.lora`` of a checkpoint's config.yaml (the defaults where it predates adapters)."""
    return LoraSection(**saved_config.get("model", {}).get("lora", {}))



def export_merged(adapters: Adapters, model: torch.nn.Module, tokenizer, out_dir: str, *, base_model: str,
                  zero3: bool, rank: int, trust_remote_code: bool = False) -> None:
    """Write ``out_dir`` as a plain Hugging Face model of the merged weights, with the adapters
    alone in ``out_dir/adapter/`` (:func:`write_adapter_dir`). Collective under ZeRO-3. The
    merged weights are streamed to their files a bucket at a time
    (:mod:`safer_dist.checkpointing.streamed_export`): no host holds the merged model.

    ``model`` writes the config, except a 4-bit (QLoRA) one, whose config would make the export
    load 4-bit again: the config is that of a plain model built (on the meta device) from its
    config without the quantization config (4-bit bases never run under ZeRO-3, where
    transformers would build it partitioned), so the export is a plain bf16 model, merged over
    the dequantized base."""
    import copy

    from safer_dist.checkpointing import streamed_export

    lora = adapters.adapter_state_dict(model, zero3=zero3, rank=rank)
    # A 4-bit weight is exported as the bf16 weight it stands for.
    layout = {n: streamed_export.meta_like(_as_received(p)) for n, p in adapters.plain_parameters(model)}
    config_model = model
    if getattr(model.config, "quantization_config", None) is not None:
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(model.config)
        del config.quantization_config
        with torch.device("meta"):
            config_model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        # config.json records the dtype of the first weight, as when the merged weights were assigned
        config_model.to(layout[next(n for n, _ in config_model.named_parameters())].dtype)
        config_model.generation_config = copy.deepcopy(model.generation_config)
    layout = streamed_export.saved_order(config_model, layout)
    merged = (nw for bucket in adapters.merged_buckets(model, zero3=zero3, rank=rank,
                                                       bucket_mb=streamed_export.GATHER_BUCKET_MB)
              if bucket is not None for nw in bucket)
    also = None if rank != 0 else lambda d: write_adapter_dir(d / ADAPTER_DIR, lora, adapters.section, base_model)
    streamed_export.export_streamed(out_dir, config_model, tokenizer, layout, merged, rank=rank, also=also,
                                    num_parameters=sum(t.numel() for t in layout.values()))


def scaling(section: LoraSection) -> float:
    """peft's factor of the adapter's update (no rank-stabilised scaling)."""
    return section.alpha / section.rank


def checkpoint_adapter_writer(checkpoint: Path, saved_config: dict, state_dict: dict[str, torch.Tensor]):
    """``dir -> None`` writing the adapters of a checkpoint's consolidated ``state_dict`` to
    ``dir/adapter/``. Their base is the model the stage started from: ``model.path`` for SFT,
    the SFT export (``erpo.init_from``, else ``<run>/hf``) for an ERPO checkpoint
    (``<run>/checkpoints/erpo/step_N``)."""
    if saved_config.get("model", {}).get("quantization", "none") != "none":
        raise ValueError(f"{checkpoint}: a checkpoint of a 4-bit base (model.quantization=4bit) holds NF4 weights, "
                         "which `safer export` does not dequantize; use the export the run wrote (<run>/hf, "
                         "<run>/hf_erpo), merged by the learners over the dequantized base")
    section = lora_section_of(saved_config)
    base = saved_config.get("model", {}).get("path")
    if Path(checkpoint).parent.name == "erpo":
        base = saved_config.get("erpo", {}).get("init_from") or str(Path(checkpoint).parents[2] / "hf")
    adapters = {k: v for k, v in state_dict.items() if is_adapter_name(k)}
    return lambda out: write_adapter_dir(Path(out) / ADAPTER_DIR, adapters, section, base)


# -- adapter directories as models (`safer eval model.path=<export>/adapter`) ----------------------


def adapter_base(path: str | Path) -> Path | None:
    """The base model directory of a peft adapter directory (``adapter_config.json`` and no
    ``config.json``), or None for any other path. The base must be a local directory."""
    path = Path(path)
    config = path / "adapter_config.json"
    if (path / "config.json").is_file() or not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(f"{path} holds adapters for base_model_name_or_path={base!r}, which is not a local Hugging "
                         "Face directory; load the merged export (the directory above an export's adapter/) instead")
    return Path(base)


def merge_adapter_dir(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``model`` (the adapters' base) with the LoRA adapters of ``path`` merged into its weights (peft)."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    log.info("merged the adapters of %s into %s", path, adapter_base(path))
    return merged
