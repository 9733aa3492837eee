"""Losses as pure functions over tensors.

Every loss is a *sum* over valid tokens (or pairs) divided by a caller-supplied global
count, so splitting a batch over micro-batches or data-parallel ranks and adding the parts
gives exactly the whole-batch value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token.

    logits: [B, T, V] (position t predicts token t+1); labels: [B, T] with IGNORE_INDEX
    where no loss is taken. Returns (logp [B, T-1] with 0 at ignored positions,
    mask [B, T-1] bool): entry t is log p(labels[:, t+1] | tokens <= t).
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    safe = target.masked_fill(~mask, 0)
    logp = -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), safe, reduction="none"
    )
    return logp.masked_fill(~mask, 0.0), mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens_global: int | float) -> torch.Tensor:
    """Summed next-token NLL over labelled tokens divided by ``num_tokens_global``.

    logits [B, T, V], labels [B, T]. With num_tokens_global = labelled tokens in the whole
    global batch (all micro-batches, all ranks), the sum of this over every micro-batch of
    every rank is the mean NLL per labelled token of the global batch.
    """
    logp, _ = token_logprobs(logits, labels)
    return -logp.sum() / num_tokens_global


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-prob and labelled-token count in a packed batch.

    logits [1, T, V], labels [1, T], seq_ids [1, T] (the index of the sequence each token
    belongs to, 0..num_seqs-1). Returns (logp_sum [num_seqs], num_tokens [num_seqs]).
    """
    logp, mask = token_logprobs(logits, labels)
    ids = seq_ids[:, 1:].reshape(-1)
    sums = torch.zeros(num_seqs, dtype=logp.dtype, device=logp.device).index_add_(0, ids, logp.reshape(-1))
    counts = torch.zeros(num_seqs, dtype=logp.dtype, device=logp.device).index_add_(
        0, ids, mask.reshape(-1).to(logp.dtype)
    )
    return sums, counts


def step_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    num_pairs_global: int | float,
    label_smoothing: float = 0.0,
    length_alpha: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    chosen_nll_sum: torch.Tensor | None = None,
    num_chosen_tokens_global: int | float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step-level DPO over a batch of pairs sharing a prefix within each pair.

    All log-prob inputs are [P] sums over the *step's* tokens only, given the shared prefix.
    z = beta*((pc - rc) - (pr - rr)) - length_alpha*(|s_w| - |s_l|)
    loss_pair = -(1-ls)*log σ(z) - ls*log σ(-z)
    L = sum(loss_pair) / num_pairs_global + nll_weight * sum(NLL(s_w)) / num_chosen_tokens_global

    The length term is inside σ: a positive alpha favours chosen steps that are shorter
    than the rejected ones. Returns (loss, stats) where stats holds per-pair tensors
    ``reward_chosen``, ``reward_rejected``, ``margin`` (detached).
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    if length_alpha:
        assert chosen_len is not None and rejected_len is not None
        z = z - length_alpha * (chosen_len - rejected_len).to(z.dtype)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    loss = per_pair.sum() / num_pairs_global
    if nll_weight:
        assert chosen_nll_sum is not None
        loss = loss + nll_weight * chosen_nll_sum.sum() / num_chosen_tokens_global
    stats = {
        "reward_chosen": chosen_reward.detach(),
        "reward_rejected": rejected_reward.detach(),
        "margin": z.detach(),
    }
    return loss, stats
