"""The learner's loss head: token log-probs and the SFT loss without full fp32 logits.

A plain forward materialises logits [T, V] in the model's dtype and the loss upcasts them to
fp32 (4x larger than the hidden states at a 128k vocabulary). :class:`LMHead` picks one path
per learner, at setup, and logs it:

- ``chunked`` (any device): the model body gives the final hidden states [1, T, H];
  :func:`safer_dist.train.losses.chunked_token_logprobs` projects ``learner.loss_chunk_tokens``
  labelled positions at a time, in forward and backward.
- ``liger`` (CUDA with ``liger_kernel`` installed): liger-kernel's fused linear cross-entropy
  gives the SFT loss (a summed NLL). Step-DPO needs per-sequence log-probs, which that kernel
  does not return, so it takes the chunked path.
- ``full``: ``learner.loss_chunk_tokens=0``, or a model whose head we do not know to be a plain
  bias-free projection (final logit softcapping, architectures outside ``PLAIN_HEAD_MODELS``):
  the model's own logits, as before.

Under DeepSpeed ZeRO-3 the lm_head weight is partitioned; DeepSpeed gathers it only around the
lm_head module's own call (its hooks, which also gather it again before that module's
backward). So the projection runs *as* the lm_head's forward, and body plus head run as the
causal LM's forward inside the engine's call: :func:`_forward_as` swaps a module's
``forward`` for one call, keeping every hook DeepSpeed registered on the module.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from safer_dist.runtime.log import get_logger
from safer_dist.train.losses import IGNORE_INDEX, chunked_token_logprobs, sft_loss, token_logprobs
from safer_dist.train.tree_attention import PackedLayout

log = get_logger("lm_head")

# Hugging Face model types whose causal-LM forward is ``logits = lm_head(model(...))``, times
# a constant for the ones in LOGIT_SCALE (read off transformers 5's modeling code).
PLAIN_HEAD_MODELS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "gemma2",
    "gemma3_text", "olmo", "olmo2", "smollm3", "cohere", "cohere2", "granite",
})


def head_scale(model) -> tuple[float | None, str]:
    """(s, "") when ``model``'s logits are ``s * lm_head(hidden)`` with a bias-free linear
    lm_head; (None, why not) otherwise."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    kind = getattr(cfg, "model_type", None)
    if kind not in PLAIN_HEAD_MODELS:
        return None, f"model type {kind!r} is not known to compute logits as lm_head(hidden)"
    if getattr(text, "final_logit_softcapping", None):
        return None, f"final logit softcapping ({text.final_logit_softcapping})"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None, "the output embedding is not a bias-free nn.Linear"
    if kind in ("cohere", "cohere2"):
        return float(text.logit_scale), ""
    if kind == "granite":
        return 1.0 / float(text.logits_scaling), ""
    return 1.0, ""


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


class LMHead:
    """Token log-probs / SFT loss of packed batches for one learner's model.

    ``model`` is the Hugging Face causal LM the engine wraps (``engine.module``);
    ``chunk_tokens`` is ``learner.loss_chunk_tokens``; ``device`` the learner's ("cpu" | "cuda").
    """

    def __init__(self, model, chunk_tokens: int, device: str):
        self.model, self.chunk_tokens = model, chunk_tokens
        scale, why = head_scale(model)
        self.scale = scale if scale is not None else 1.0
        if chunk_tokens == 0:
            self.mode = "full"
        elif scale is None:
            self.mode = "full"
            log.warning("loss on full logits (learner.loss_chunk_tokens=%d ignored): %s", chunk_tokens, why)
        elif device == "cuda" and liger_available():
            self.mode = "liger"
        else:
            self.mode = "chunked"
        log.info("loss head: %s%s", self.mode, f" ({chunk_tokens} tokens per chunk)" if self.mode != "full" else "")

    def token_logprobs(self, engine, batch: dict, layout: PackedLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [1, T-1] fp32, mask [1, T-1]) as :func:`safer_dist.train.losses.token_logprobs` of the
        model's logits. ``engine`` runs the model (a DeepSpeed engine, or the model itself);
        ``batch`` holds input_ids, position_ids, labels [1, T] on the model's device; ``layout``:
        the batch's sequence boundaries (:func:`~safer_dist.train.tree_attention.packed_layout`, on
        the model's device), passed to every attention call; ``None``: each layer derives them."""
        labels = batch["labels"]
        if self.mode == "full":
            return token_logprobs(self._logits(engine, batch, layout), labels)
        return self._through_head(
            engine, batch, layout,
            lambda hidden, weight: chunked_token_logprobs(hidden, weight, labels, self.chunk_tokens),
        )

    def sft_loss(
        self, engine, batch: dict, num_tokens_global: float | torch.Tensor, layout: PackedLayout | None = None,
    ) -> torch.Tensor:
        """:func:`safer_dist.train.losses.sft_loss` of the model's logits (a scalar);
        ``num_tokens_global``: a number or a 0-d fp32 tensor on the model's device (the same result)."""
        if self.mode == "full":
            logits = self._logits(engine, batch, layout)
            # The zero term keeps every logit in the graph when no token of the batch is labelled.
            return sft_loss(logits, batch["labels"], num_tokens_global) + 0.0 * logits.sum()
        if self.mode == "liger":
            nll = self._through_head(
                engine, batch, layout, lambda hidden, weight: _liger_nll_sum(hidden, weight, batch["labels"]))
            return nll / num_tokens_global
        logp, _ = self.token_logprobs(engine, batch, layout)
        return -logp.sum() / num_tokens_global

    def _logits(self, engine, batch: dict, layout: PackedLayout | None) -> torch.Tensor:
        return engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                      **_attention_kwargs(layout)).logits

    def _through_head(self, engine, batch: dict, layout: PackedLayout | None, project):
        """``project(hidden [1, T, H], lm_head weight [V, H])``, run as the lm_head's forward,
        on the body's hidden states, all inside one call of ``engine``."""
        model = self.model
        body, head = model.get_decoder(), model.get_output_embeddings()

        def causal_lm_forward(input_ids, position_ids, **attention_kwargs):
            hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          **attention_kwargs).last_hidden_state
            if self.scale != 1.0:
                hidden = hidden * self.scale  # s * (h @ W.T) == (s * h) @ W.T
            with _forward_as(head, lambda h: project(h, head.weight)):
                return head(hidden)

        with _forward_as(model, causal_lm_forward):
            return engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **_attention_kwargs(layout))


def _attention_kwargs(layout: PackedLayout | None) -> dict:
    return {} if layout is None else layout.model_kwargs()


@contextlib.contextmanager
def _forward_as(module: torch.nn.Module, forward):
    """``module(...)`` calls ``forward`` inside the block; the module's hooks still run."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def _liger_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of labelled tokens through liger-kernel (CUDA only)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    b, t, h = hidden.shape
    target = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_fn(weight, hidden.reshape(b * t, h), target.reshape(-1)).float()
