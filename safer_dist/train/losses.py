"""Losses as pure functions over tensors.

Every loss is a *sum* over valid tokens (or pairs) divided by a caller-supplied global
count, so splitting a batch over micro-batches or data-parallel ranks and adding the parts
gives exactly the whole-batch value.

:func:`chunked_token_logprobs` gives :func:`token_logprobs` from final hidden states and the
output projection without ever holding full [tokens, vocab] logits (the learner's loss head,
:mod:`safer_dist.train.lm_head`).
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


def chunked_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` of ``logits = hidden @ weight.T`` without ever holding all logits.

    hidden [B, T, H] (the model body's final hidden states), weight [V, H] (the output
    projection, no bias), labels [B, T]. Returns (logp [B, T-1] fp32 with 0 at ignored
    positions, mask [B, T-1] bool), equal to ``token_logprobs(hidden @ weight.T, labels)``,
    with the same gradients w.r.t. hidden and weight. Only labelled positions are projected,
    ``chunk_tokens`` of them at a time, in forward and again in backward: the largest
    temporaries are two [chunk_tokens, V] fp32 tensors, never [B*T, V]. The weight's gradient
    is summed over chunks in the weight's dtype (each chunk's product accumulates in fp32
    inside the matmul and is rounded once), as liger-kernel's fused kernel does: a 16-bit
    weight's gradient thus takes one rounding per chunk rather than one in all.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    b, t, h = hidden.shape
    # Position t predicts labels[t+1]; the last position of each row predicts nothing.
    target = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
    logp = _ChunkedLinearLogprob.apply(hidden.reshape(b * t, h), weight, target.reshape(-1), chunk_tokens)
    return logp.view(b, t)[:, :-1], labels[:, 1:] != IGNORE_INDEX


class _ChunkedLinearLogprob(torch.autograd.Function):
    """logp[n] = log_softmax(hidden[n] @ weight.T)[target[n]] in fp32; 0 where target[n] is
    IGNORE_INDEX. hidden [N, H], weight [V, H], target [N] -> logp [N]. Saves only its inputs
    (and which rows are labelled); backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_tokens):
        rows = (target != IGNORE_INDEX).nonzero().squeeze(1)
        logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_tokens):
            r = rows[start : start + chunk_tokens]
            # The same ops as token_logprobs on full logits: a 16-bit matmul, then fp32.
            lsm = torch.log_softmax((hidden[r] @ weight.T).float(), dim=-1)  # [c, V]
            logp.index_copy_(0, r, lsm.gather(1, target[r, None]).squeeze(1))
        ctx.save_for_backward(hidden, weight, target, rows)
        ctx.chunk_tokens = chunk_tokens
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, target, rows = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # In the weight's dtype: an fp32 accumulator would cost 2x a 16-bit lm_head's size.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_logp = grad_logp.float()
        for start in range(0, rows.numel(), ctx.chunk_tokens):
            r = rows[start : start + ctx.chunk_tokens]
            h = hidden[r]
            g = grad_logp[r, None]  # [c, 1]
            # d logp / d logits = onehot(target) - softmax(logits), times the incoming grad.
            d = torch.log_softmax((h @ weight.T).float(), dim=-1).exp_().mul_(-g)  # [c, V]
            d.scatter_add_(1, target[r, None], g)
            d = d.to(weight.dtype)
            if need_hidden:
                grad_hidden.index_copy_(0, r, d @ weight)
            if need_weight:
                grad_weight.addmm_(d.T, h)
        return grad_hidden, grad_weight, None, None


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
    belongs to, 0..num_seqs-1). Returns (logp_sum [num_seqs], num_tokens [num_seqs]), fp64
    (:func:`sum_by_sequence`).
    """
    logp, mask = token_logprobs(logits, labels)
    return sum_by_sequence(logp, mask, seq_ids, num_seqs)


def sum_by_sequence(
    logp: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logprobs` from token log-probs already computed.

    logp, mask [1, T-1] as :func:`token_logprobs` (or :func:`chunked_token_logprobs`) returns
    them; seq_ids [1, T]. Returns (logp_sum [num_seqs], num_tokens [num_seqs]), both fp64.

    The sums accumulate in fp64: an fp32 running sum of ~800 token log-probs drifts by 1e-4
    to 5e-4 from the exact sum, which moves DPO margins and the step-DPO gradients. The
    learner's policy log-probs and the rollout workers' reference log-probs
    (:func:`safer_dist.rollout.sampling.continuation_logprobs`) both come from here, so the two
    sides of a DPO margin are summed alike. Gradients flow back to ``logp`` in its own dtype.
    """
    ids = seq_ids[:, 1:].reshape(-1)
    sums = torch.zeros(num_seqs, dtype=torch.float64, device=logp.device).index_add_(
        0, ids, logp.reshape(-1).double()
    )
    counts = torch.zeros(num_seqs, dtype=torch.float64, device=logp.device).index_add_(
        0, ids, mask.reshape(-1).double()
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
