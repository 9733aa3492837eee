"""Per-GPU memory model of the planner (safer_dist/cluster/plan.py): model shapes, ZeRO setups
and the bytes each puts on a GPU.

One learner per GPU, so the data-parallel world size is ``W = G * N``. For ``P`` parameters,
mixed precision (bf16/fp16 weights, fp32 master weights, AdamW) and ZeRO stage ``s``, the
model states per GPU in bytes are (the accounting of DeepSpeed's own estimators,
``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``)::

    stage 0   2P params + 2P 16-bit grads + 4P fp32 grads + 12P (fp32 master weights, Adam m, v)
    stage 1   2P + 2P + 16P / W                  (fp32 grads and optimizer states partitioned)
    stage 2   2P + 18P / W                       (16-bit grads partitioned too)
    stage 3   18P / W + 4 * largest layer        (2 params + 4 fp32 grads + 12; the gathered
                                                  layer's 16-bit params and grads)
    + offload_optimizer: fp32 grads and optimizer states move to the CPU (stage 2: 2P left;
                         stage 3: 2P / W + 4 * largest)
    + offload_params (stage 3): the 16-bit params move too (4 * largest left)

fp32 training (no master copy) is 4P params + 4P grads + 8P Adam, partitioned the same way.

These are all the model states there are, not all at once: ZeRO-1/2 (DeepSpeed's
``stage_1_and_2`` optimizer) keep the reduced gradients in 16-bit during the backward and make
the fp32 copy of their partition (4P / W) inside ``step()``, after the activations are freed,
and free it there. So the peak is the larger of the backward's (model states without the fp32
gradients + activations + logits) and the step's (all model states): ``Estimate.step_only``.
Counting both at once put the plan 14% above the peak measured for an 8-layer Llama-3-8B slice
on an H200 (75.4 GiB); counted this way it is within 1% of it, and 2% below the 53.9 GiB of
TinyLlama-1.1B (tests/unit/test_plan.py checks every recorded GPU peak within 10%).

With LoRA adapters (``model.lora.rank`` r > 0, :class:`Adapters`) the formulas above apply to the
adapter parameters A alone (they are all that trains), and the frozen base adds its weights to
``params``: 2P bytes in 16-bit (partitioned under ZeRO-3), or with ``model.quantization=4bit``
0.5625 bytes per parameter of the blocks' linear layers (NF4 4-bit values + an fp32 absmax per
block of 64) and 2 bytes for the rest (embeddings, LM head, norms stay 16-bit). For adapters on
every linear layer of the blocks, A = r x layers x (sum over the seven projections of in + out
features). Activations are counted as for full training (the adapters' own are r-sized).
"Largest layer" is the largest single module's parameters (the embedding or LM head for
Llama-shaped models), as DeepSpeed counts it.

Activations per GPU for one packed micro-batch of ``T = micro_batch_size * max_seq_len``
tokens (the worst case: every sequence at the length limit): what autograd saves per decoder
layer and token, measured with ``torch.autograd.graph.saved_tensors_hooks`` on transformers'
Llama with flash-style attention (no T x T scores; tests/unit/test_plan.py checks it)::

    bf16: (10h + 2kv + 4i) x 2 bytes      h hidden, kv = kv heads x head dim, i intermediate
    fp32: ( 8h + 2kv + 4i) x 4 bytes      (RMSNorm computes in fp32, hence the larger bf16 h term)

With gradient checkpointing only each layer's input is kept (``h`` per layer and token) plus
one layer's full set while it is recomputed. With ``learner.loss_chunk_tokens=0`` the vocabulary
logits add ``T * V`` x (dtype bytes + 12): the logits, the fp32 log-softmax the loss saves, and
the fp32 gradients of both. The chunked loss head (``learner.loss_chunk_tokens=c``,
safer_dist/train/lm_head.py) holds one chunk at a time instead: ``min(c, T) * V * 8`` bytes (a chunk's
fp32 logits and log-softmax).
DeepSpeed's default communication buckets (reduce bucket 5e8 elements, ZeRO-3 prefetch 5e7)
are added as ``buffers``. A setup fits when the total is at most 90% of the GPU's memory (the
rest: CUDA context, NCCL, allocator fragmentation). Memory is in GiB (2**30 bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safer_dist.config import Config

GIB = 1 << 30
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size, elements
PREFETCH_BUCKET = 5e7  # DeepSpeed's default stage3_prefetch_bucket_size, elements


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-shaped decoder that memory depends on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k, v
    head_dim: int | None = None

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * (self.head_dim or self.hidden_size // self.num_heads)

    @property
    def q_dim(self) -> int:
        return self.num_heads * (self.head_dim or self.hidden_size // self.num_heads)

    def num_params(self) -> int:
        h, kv, q, i = self.hidden_size, self.kv_dim, self.q_dim, self.intermediate_size
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        layer = attn + 3 * h * i + 2 * h  # + two RMSNorm weights
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h  # + final norm

    def largest_layer_params(self) -> int:
        """Parameters of the largest single module (DeepSpeed's ``largest_layer_params``)."""
        h = self.hidden_size
        return max(self.vocab_size * h, h * self.intermediate_size, h * self.q_dim + self.q_dim * self.attention_bias)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelShape:
        try:
            return cls(
                hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"],
                num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
                head_dim=cfg.get("head_dim"),
            )
        except KeyError as e:
            raise ValueError(f"model config has no {e.args[0]!r}: safer plan knows Llama-shaped decoders only") from None


# Published architectures (their config.json values) for planning before the weights are local.
SHAPES: dict[str, ModelShape] = {
    "llama3-8b": ModelShape(4096, 32, 32, 8, 14336, 128256),
    "qwen2.5-7b": ModelShape(3584, 28, 28, 4, 18944, 152064, attention_bias=True),
    "llama3-70b": ModelShape(8192, 80, 64, 8, 28672, 128256),
}
PRESET_VOCAB = 3000  # safer_dist.train.models presets take their vocabulary from a demo tokenizer


def resolve_shape(model_path: str, init_preset: str | None, shape: str | None) -> tuple[ModelShape, str]:
    """The shape to plan for and where it came from: ``shape`` (a name of :data:`SHAPES`, a
    ``safer_dist.train.models`` preset, or a config.json path), else ``model_path``/config.json,
    else ``init_preset``."""
    # train.models imports torch and transformers; `safer plan` needs them only for a preset.
    from safer_dist.train.models import PRESETS

    def preset(name: str) -> ModelShape:
        p = PRESETS[name]
        return ModelShape(p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"],
                          p["num_key_value_heads"], p["intermediate_size"], PRESET_VOCAB, p["tie_word_embeddings"])

    if shape is not None:
        if shape in SHAPES:
            return SHAPES[shape], f"named shape {shape}"
        if shape in PRESETS:
            return preset(shape), f"preset {shape} (vocab {PRESET_VOCAB})"
        path = Path(shape)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            return ModelShape.from_hf_config(json.loads(path.read_text())), str(path)
        raise ValueError(f"--shape {shape!r}: not a named shape ({', '.join(SHAPES)}), a preset "
                         f"({', '.join(PRESETS)}) or a config.json")
    config_json = Path(model_path) / "config.json"
    if config_json.is_file():
        return ModelShape.from_hf_config(json.loads(config_json.read_text())), str(config_json)
    if init_preset in PRESETS:
        return preset(init_preset), f"model.init_preset {init_preset} (vocab {PRESET_VOCAB})"
    raise ValueError(f"{config_json} does not exist yet; pass --shape with one of {', '.join(SHAPES)} "
                     "or a config.json path")


@dataclass(frozen=True)
class Adapters:
    """LoRA adapters (``model.lora``) and the base's quantization, as the planner counts them."""

    rank: int
    target_modules: str = "all-linear"
    quantized_4bit: bool = False

    _PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def trainable(self, shape: ModelShape) -> int:
        """Adapter parameters: r x (in + out) for each targeted projection of every block."""
        h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
        dims = dict(zip(self._PROJECTIONS, ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))))
        names = (self._PROJECTIONS if self.target_modules.strip() == "all-linear"
                 else [n.strip() for n in self.target_modules.split(",") if n.strip() in dims])
        return self.rank * shape.num_layers * sum(sum(dims[n]) for n in names)

    def frozen_bytes(self, shape: ModelShape) -> float:
        """The frozen base's weights on each GPU before ZeRO-3 partitioning."""
        if not self.quantized_4bit:
            return 2.0 * shape.num_params()
        h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
        linear = shape.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * i)
        return 0.5625 * linear + 2.0 * (shape.num_params() - linear)

    @classmethod
    def from_config(cls, cfg: Config) -> Adapters | None:
        lora = cfg.model.lora
        if not lora.enabled:
            return None
        return cls(lora.rank, lora.target_modules, cfg.model.quantization == "4bit")


@dataclass(frozen=True)
class Setup:
    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    micro_batch_size: int = 1

    def overrides(self) -> str:
        return (f"learner.zero_stage={self.zero_stage} learner.offload_optimizer={str(self.offload_optimizer).lower()} "
                f"learner.offload_params={str(self.offload_params).lower()} "
                f"model.gradient_checkpointing={str(self.gradient_checkpointing).lower()} "
                f"train.micro_batch_size={self.micro_batch_size}")

    def label(self) -> str:
        parts = [f"ZeRO-{self.zero_stage}"]
        if self.offload_optimizer:
            parts.append("offload optim")
        if self.offload_params:
            parts.append("offload params")
        if self.gradient_checkpointing:
            parts.append("ckpt")
        return " + ".join(parts) + f", mb {self.micro_batch_size}"


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU (and offloaded bytes per node on the CPU side)."""

    params: float
    grads: float
    optimizer: float  # fp32 master weights (mixed precision) + Adam moments (+ fp32 grads)
    gathered: float  # ZeRO-3: the largest layer gathered for compute
    buffers: float
    activations: float
    logits: float
    cpu_per_node: float
    # Part of ``grads`` that exists only during the optimizer step, when the activations and
    # logits are freed: ZeRO-1/2's fp32 gradient partition (module docstring).
    step_only: float = 0.0

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered

    @property
    def total(self) -> float:
        """The peak: the forward and backward (activations and logits, no fp32 gradients yet),
        or the optimizer step (fp32 gradients, no activations), whichever is larger."""
        return self.model_states + self.buffers + max(self.activations + self.logits - self.step_only, 0.0)


def model_states(num_params: int, largest_layer: int, setup: Setup, *, world_size: int, mixed_precision: bool,
                 gpus_per_node: int = 1) -> dict[str, float]:
    """Model-state bytes per GPU — ``params`` (training dtype), ``grads`` (16-bit and fp32
    gradients), ``optimizer`` (fp32 master weights with mixed precision, Adam m and v),
    ``gathered`` (ZeRO-3's gathered layer) — and ``cpu_per_node`` (offloaded bytes per node)."""
    p, w, s = float(num_params), world_size, setup.zero_stage
    shard = lambda n, from_stage: n * p / (w if s >= from_stage else 1)  # noqa: E731
    if mixed_precision:
        params = shard(2, 3)
        if s == 3:  # gradients are reduced straight into the fp32 partition
            grads16, grads32 = 0.0, shard(4, 3)
        else:
            grads16, grads32 = shard(2, 2), shard(4, 1)
        optimizer = shard(12, 1)  # fp32 master weights + Adam m, v
    else:
        params, grads16, grads32, optimizer = shard(4, 3), 0.0, shard(4, 2), shard(8, 1)
    gathered = 4.0 * largest_layer if s == 3 else 0.0
    cpu = 0.0
    if setup.offload_optimizer:  # the optimizer steps on the CPU, on fp32 gradients kept there
        cpu += (optimizer + grads32) * gpus_per_node
        optimizer = grads32 = 0.0
        if s == 2:  # reduced 16-bit gradients stream to the CPU partitions in buckets
            grads16 = 0.0
    if setup.offload_params:
        cpu += params * gpus_per_node
        params = 0.0
    # ZeRO-1/2 (DeepSpeed's stage_1_and_2 optimizer) keep the reduced gradients in 16-bit during
    # the backward and make the fp32 copy of their partition in step(), freeing it after.
    step_only = grads32 if mixed_precision and s in (1, 2) else 0.0
    return {"params": params, "grads": grads16 + grads32, "optimizer": optimizer, "gathered": gathered,
            "cpu_per_node": cpu, "step_only": step_only}


def activation_bytes(
    shape: ModelShape, num_tokens: int, *, checkpointing: bool, dtype_bytes: int, loss_chunk_tokens: int = 0,
) -> tuple[float, float]:
    """(decoder-layer activations, logits) bytes for one micro-batch of ``num_tokens``;
    ``loss_chunk_tokens`` as learner.loss_chunk_tokens (0: full logits)."""
    h, i = shape.hidden_size, shape.intermediate_size
    h_coef = 10 if dtype_bytes < 4 else 8  # see the module docstring
    per_layer = (h_coef * h + 2 * shape.kv_dim + 4 * i) * dtype_bytes * num_tokens
    if checkpointing:
        layers = shape.num_layers * h * dtype_bytes * num_tokens + per_layer
    else:
        layers = shape.num_layers * per_layer
    if loss_chunk_tokens:
        logits = min(num_tokens, loss_chunk_tokens) * shape.vocab_size * 8
    else:
        logits = num_tokens * shape.vocab_size * (dtype_bytes + 12)
    return float(layers), float(logits)


def estimate(shape: ModelShape, setup: Setup, *, world_size: int, gpus_per_node: int, max_seq_len: int,
             mixed_precision: bool = True, loss_chunk_tokens: int = 0, adapters: Adapters | None = None) -> Estimate:
    trained = adapters.trainable(shape) if adapters else shape.num_params()
    ms = model_states(trained, shape.largest_layer_params(), setup, world_size=world_size,
                      mixed_precision=mixed_precision, gpus_per_node=gpus_per_node)
    if adapters:  # the frozen base: weights only, partitioned under ZeRO-3 (module docstring)
        ms["params"] += adapters.frozen_bytes(shape) / (world_size if setup.zero_stage == 3 else 1)
    dtype_bytes = 2 if mixed_precision else 4
    buffers = dtype_bytes * (REDUCE_BUCKET + (PREFETCH_BUCKET if setup.zero_stage == 3 else 0))
    if setup.zero_stage == 0:
        buffers = dtype_bytes * REDUCE_BUCKET
    layers, logits = activation_bytes(shape, setup.micro_batch_size * max_seq_len,
                                      checkpointing=setup.gradient_checkpointing, dtype_bytes=dtype_bytes,
                                      loss_chunk_tokens=loss_chunk_tokens)
    return Estimate(buffers=buffers, activations=layers, logits=logits, **ms)

def rollout_bytes(shape: ModelShape, *, rows: int, tokens_per_row: int, score_tokens: int = 8192,
                  tensor_parallel: int = 1) -> dict[str, float]:
    """One GPU of a rollout worker (a bf16 inference copy, sharded over ``tensor_parallel`` GPUs):
    weights, the KV cache of ``rows`` sequences of ``tokens_per_row``, and the logits of one
    packed scoring pass (``sampling.continuation_logprobs``: ``score_tokens`` tokens, bf16
    logits + fp32 log-softmax). The TP plan shards the weights and the attention heads (so the KV
    cache) over the GPUs; the logits are gathered whole on every GPU."""
    weights = 2.0 * shape.num_params() / tensor_parallel
    kv_cache = 2.0 * 2 * shape.num_layers * shape.kv_dim * rows * tokens_per_row / tensor_parallel
    logits = float(score_tokens * shape.vocab_size * (2 + 4))
    return {"weights": weights, "kv_cache": kv_cache, "logits": logits, "total": weights + kv_cache + logits}
