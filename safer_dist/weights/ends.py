"""The weight sync inside the actors: a learner rank's end and a rollout worker's end.

Each actor holds one end and its ``init_sync`` / ``send_weights`` / ``receive_weights`` methods
(what the driver, :mod:`safer_dist.weights.driver`, calls) hand over to it. An end opens, and
re-opens, the actor's :class:`~safer_dist.weights.channel.Channel` (gloo on CPU, NCCL on CUDA)
and decides what a push carries:

- full weights: :func:`~safer_dist.weights.channel.send_weights` /
  :func:`~safer_dist.weights.channel.receive_weights`, by broadcast or by the CUDA-IPC hand-over,
  as the member's place says (:mod:`safer_dist.weights.layout`);
- with LoRA learners, the adapters alone, merged on the worker (:mod:`safer_dist.weights.adapters`).

Either way the receiver checks the push's version, dtype and size before it reads a bucket.
A tensor-parallel worker's ranks receive through their leader's end
(:func:`safer_dist.rollout.tensor_parallel.receive_sharded_weights`).
"""

from __future__ import annotations

import torch

from safer_dist.config import ModelSection
from safer_dist.train.lora import Adapters
from safer_dist.weights import adapters
from safer_dist.weights.channel import Channel, close_channel, receive_weights, send_weights
from safer_dist.weights.layout import Member


def reopen(old: Channel | None, host: str, port: int, member: Member, device: str, *, local_ip: str) -> Channel:
    """A new channel for ``member`` on ``device`` (NCCL on CUDA, gloo on CPU), after leaving
    ``old`` (None: nothing to leave)."""
    close_channel(old)
    return Channel(host, port, member, "nccl" if device == "cuda" else "gloo", local_ip=local_ip)


class LearnerEnd:
    """A learner rank's end. Rank 0 is member 0, the sender, and holds the channel; the other
    ranks hold none, but under ZeRO-3 every rank takes part in gathering each bucket, so
    :meth:`send` runs on every rank. ``lora``: the rank's adapters (then only they are sent)."""

    def __init__(self, *, rank: int, device: str, zero3: bool, lora: Adapters | None = None):
        self.rank, self.device, self.zero3, self.lora = rank, device, zero3, lora
        self.channel: Channel | None = None

    def open(self, host: str, port: int, member: Member, *, local_ip: str) -> None:
        """Rank 0 opens its end as ``member``, leaving the one it opened before, if any (the channel
        is rebuilt when a rollout worker restarts); other ranks have nothing to open."""
        if self.rank == 0:
            old, self.channel = self.channel, None
            self.channel = reopen(old, host, port, member, self.device, local_ip=local_ip)

    def send(self, module: torch.nn.Module, version: int) -> int:
        """Send ``module``'s weights (its adapters, with LoRA) as ``version``; the bytes sent
        (0 on ranks other than 0). Collective under ZeRO-3."""
        if self.lora is not None:
            return adapters.send(self.lora, module, self.channel, rank=self.rank, zero3=self.zero3, version=version,
                                 device=self.device)
        return send_weights(module, self.channel, rank=self.rank, zero3=self.zero3, version=version)


class WorkerEnd:
    """A rollout worker's end (member i + 1 for worker i): receives each push into the model."""

    def __init__(self, model_cfg: ModelSection, device: str):
        self.model_cfg, self.device = model_cfg, device
        self.channel: Channel | None = None
        self.adapter_receiver: adapters.AdapterReceiver | None = None  # LoRA learners: made at the first sync

    def open(self, host: str, port: int, member: Member, *, local_ip: str) -> None:
        """Open this worker's end as ``member``, leaving any opened before (the channel is rebuilt
        when a worker restarts)."""
        old, self.channel = self.channel, None
        self.channel = reopen(old, host, port, member, self.device, local_ip=local_ip)

    def receive(self, model: torch.nn.Module, version: int) -> None:
        """Receive a push of ``version`` into ``model``: all its weights, or with LoRA learners the
        adapters, merged into the adapted layers. ValueError when the push's dtype or size differ."""
        if self.model_cfg.lora.enabled:
            if self.adapter_receiver is None:
                self.adapter_receiver = adapters.AdapterReceiver(self.model_cfg, model)
            self.adapter_receiver.receive(model, self.channel, version=version)
        else:
            receive_weights(model, self.channel, version=version)
