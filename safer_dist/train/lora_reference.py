"""ERPO's fixed reference on LoRA learners: the model ERPO started from, with no second copy.

ERPO with adapters starts from the merged SFT export (``erpo.init_from``, else ``<run>/hf``)
with fresh adapters (:mod:`safer_dist.train.lora`), so the learners' frozen base *is* that
model: with every adapter off, a learner computes exactly what a separately loaded SFT model
does. ``erpo.reference=sft`` therefore places no SFT-reference rollout group when
``model.lora.rank > 0``; the driver asks the learners instead, while it samples (the values go
into ``pairs.jsonl`` as any reference's do, before training)::

    Sampler ──items──▶ LearnerGroup.reference_logprobs ──▶ every learner rank:
        rank r scores the contexts r, r + W, ... (each context's continuations packed as one
        tree where the attention takes it), adapters off, no gradient, through the loss head
        that scores the policy in step-DPO; ranks run as many forward passes as the busiest
        one (ZeRO-3's forward is collective); the sums are all-gathered, rank 0's returned.

``erpo.reference=iteration`` (the policy at the start of the iteration) stays with the rollout
workers, which hold that policy and compute it while sampling, adapters or not. With a 4-bit
base (QLoRA) the adapters-off model is the NF4-quantized SFT model, not the SFT model itself.
"""

from __future__ import annotations

import torch

from safer_dist.data.chat import Prompt
from safer_dist.erpo.pairs import append_continuations, packed_length, step_sequence
from safer_dist.train.losses import IGNORE_INDEX, sum_by_sequence
from safer_dist.train.tree_attention import packed_layout

# About this many tokens per forward pass (as the rollout workers' reference pass packs them).
MAX_TOKENS_PER_PACK = 8192

Item = tuple[Prompt, str, str, bool]  # (prompt, response prefix, continuation, ends with EOS)


class AdaptersOffReference:
    """The ERPO sampler's ``reference`` (``erpo.reference=sft``) for LoRA learners:
    ``logprobs`` as ``RolloutGroup.logprobs`` gives them, from the learners' base."""

    def __init__(self, learners):
        self.learners = learners

    def logprobs(self, items: list[Item], share_prefix: bool = True) -> list[tuple[float, int]]:
        return self.learners.reference_logprobs(items, share_prefix)


def packs(encoded: list[tuple[list[int], list[int]]], *, rank: int, world_size: int, share_prefix: bool,
          max_tokens: int = MAX_TOKENS_PER_PACK) -> list[tuple[dict[str, torch.Tensor], list[int]]]:
    """This rank's packed rows of ``encoded`` (context ids, continuation ids): the distinct
    contexts in order of first appearance, every ``world_size``-th from ``rank``, each with its
    continuations (:func:`~safer_dist.erpo.pairs.append_continuations`), about ``max_tokens``
    tokens a row. Returns ``[(row, members)]``: ``input_ids``, ``position_ids``, ``labels``,
    ``seq_ids`` ``[1, T]``, and the item index of each sequence of the row in order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(encoded):
        groups.setdefault(tuple(ctx), []).append(i)
    mine = list(groups.items())[rank::world_size]
    out = []
    cols: dict[str, list[int]] = {}
    members: list[int] = []
    for ctx, idxs in mine:
        conts = [encoded[i][1] for i in idxs]
        size = packed_length(len(ctx), [len(c) for c in conts], share_prefix=share_prefix)
        if members and len(cols["input_ids"]) + size > max_tokens:
            out.append((_tensors(cols), members))
            members = []
        if not members:
            cols = {"input_ids": [], "position_ids": [], "labels": [], "seq_ids": []}
        append_continuations(cols, list(ctx), conts, list(range(len(members), len(members) + len(idxs))),
                             share_prefix=share_prefix)
        members += idxs
    if members:
        out.append((_tensors(cols), members))
    return out


def _tensors(cols: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([xs], dtype=torch.long) for name, xs in cols.items()}


def _idle_row(eos_token_id: int) -> dict[str, torch.Tensor]:
    """One unlabelled token: the forward pass of a rank with no row left (ZeRO-3 gathers weights
    collectively, so every rank runs as many passes as the busiest)."""
    return _tensors({"input_ids": [eos_token_id], "position_ids": [0], "labels": [IGNORE_INDEX], "seq_ids": [0]})


@torch.no_grad()
def reference_logprobs(engine, head, adapters, tokenizer, items: list[Item], *, share_prefix: bool, rank: int,
                       world_size: int, device: str) -> list[tuple[float, int]]:
    """Sum of log p(continuation | prompt, prefix) and its token count per item, under the
    learners' model with every adapter off (``adapters``: :class:`~safer_dist.train.lora.Adapters`).
    Collective over the learner ranks; the same list on every rank. ``engine`` runs the model,
    ``head`` (:class:`~safer_dist.train.lm_head.LMHead`) turns it into token log-probs, as for the
    policy in step-DPO; ``share_prefix``: pack each context once (only where the attention takes
    trees). Tokenized as the rollout workers and the pairs are (:func:`step_sequence`)."""
    import torch.distributed as dist

    encoded = [step_sequence(tokenizer, p, x, c, eos) for p, x, c, eos in items]
    rows = packs(encoded, rank=rank, world_size=world_size, share_prefix=share_prefix)
    num_rows = torch.tensor([len(rows)], dtype=torch.long, device=device)
    dist.all_reduce(num_rows, op=dist.ReduceOp.MAX)
    mine: list[tuple[int, float, int]] = []
    was_training = engine.training
    engine.eval()  # no dropout; gradient checkpointing (training mode only) has nothing to save
    try:
        with adapters.disabled():
            for k in range(int(num_rows.item())):
                row, members = rows[k] if k < len(rows) else (_idle_row(tokenizer.eos_token_id), [])
                layout = packed_layout(row["position_ids"]).to(device)
                dev = {name: t.to(device) for name, t in row.items()}
                logp, mask = head.token_logprobs(engine, dev, layout)
                if members:
                    sums, counts = sum_by_sequence(logp, mask, dev["seq_ids"], len(members))
                    mine += [(i, s, int(n)) for i, s, n in zip(members, sums.tolist(), counts.tolist())]
    finally:
        engine.train(was_training)
        if device == "cuda":
            # A colocated rollout worker samples next on this GPU: give the pass's cached
            # activation memory back for its KV cache (as push_weights does before a sync).
            torch.cuda.empty_cache()
    gathered: list[list[tuple[int, float, int]]] = [[] for _ in range(world_size)]
    dist.all_gather_object(gathered, mine)
    out: list[tuple[float, int] | None] = [None] * len(items)
    for i, s, n in (x for part in gathered for x in part):
        out[i] = (s, n)
    assert all(x is not None for x in out), "every item is scored by exactly one rank"
    return out  # type: ignore[return-value]
