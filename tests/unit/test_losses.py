import math

import torch

from safer_dist.train.losses import (
    IGNORE_INDEX,
    sequence_logprobs,
    sft_loss,
    step_dpo_loss,
    sum_by_sequence,
    token_logprobs,
)


def test_sft_loss_hand_computed():
    # Vocabulary of 2; logits chosen so p(token 1) = sigmoid(l1 - l0).
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])
    # position 0 predicts label[1]=1 with p=1/2; position 1 predicts label[2]=1 with p=3/4.
    expected_sum = -(math.log(0.5) + math.log(0.75))
    assert torch.isclose(sft_loss(logits, labels, 2), torch.tensor(expected_sum / 2))
    # Normalised by the *global* count: the same micro-batch in a global batch of 10 tokens.
    assert torch.isclose(sft_loss(logits, labels, 10), torch.tensor(expected_sum / 10))


def test_prompt_tokens_carry_no_loss():
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[3, IGNORE_INDEX, IGNORE_INDEX, 4, 2]])
    logp, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[False, False, True, True]]
    assert logp[0, 0] == 0 and logp[0, 1] == 0
    lp = torch.log_softmax(logits, -1)
    assert torch.isclose(logp[0, 2], lp[0, 2, 4]) and torch.isclose(logp[0, 3], lp[0, 3, 2])


def test_split_micro_batches_sum_to_whole():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[:, :2] = IGNORE_INDEX
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    whole = sft_loss(logits, labels, n)
    parts = sum(sft_loss(logits[i : i + 1], labels[i : i + 1], n) for i in range(4))
    assert torch.allclose(whole, parts, atol=1e-6)


def test_sequence_logprobs_per_packed_sequence():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 5)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX, 3]])
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    sums, counts = sequence_logprobs(logits, labels, seq_ids, 2)
    lp = torch.log_softmax(logits, -1)[0]
    assert torch.allclose(sums, torch.stack([lp[0, 1] + lp[1, 2], lp[4, 3]]).double())
    assert counts.tolist() == [2.0, 1.0]


def test_step_dpo_hand_computed_and_signs():
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0))
    loss, stats = step_dpo_loss(pc, pr, rc, rr, beta=0.5, num_pairs_global=1)
    # z = 0.5*((-1+2) - (-3+2)) = 1.0 ; loss = -log sigmoid(1) = log(1+e^-1)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    assert stats["margin"].item() == 1.0 and stats["reward_chosen"].item() == 0.5
    # Preferring the rejected step more raises the loss; equal log-ratios give log 2.
    worse, _ = step_dpo_loss(pr, pc, rc, rr, beta=0.5, num_pairs_global=1)
    assert worse > loss
    tie, _ = step_dpo_loss(rc, rr, rc, rr, beta=0.5, num_pairs_global=1)
    assert math.isclose(tie.item(), math.log(2), rel_tol=1e-6)


def test_step_dpo_length_smoothing_and_nll_terms():
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0))
    # alpha=0.1, |s_w|-|s_l| = 5-15 = -10 -> z = 1 + 1 = 2
    loss, stats = step_dpo_loss(pc, pr, rc, rr, beta=0.5, num_pairs_global=1, length_alpha=0.1,
                                chosen_len=torch.tensor([5]), rejected_len=torch.tensor([15]))
    assert math.isclose(stats["margin"].item(), 2.0, rel_tol=1e-6)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-2)), rel_tol=1e-6)
    # label smoothing 0.1 on z=1: 0.9*log(1+e^-1) + 0.1*log(1+e^1)
    ls, _ = step_dpo_loss(pc, pr, rc, rr, beta=0.5, num_pairs_global=1, label_smoothing=0.1)
    assert math.isclose(ls.item(), 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)), rel_tol=1e-6)
    # NLL term: weight 0.5 * (sum NLL 6 over 3 tokens) = 1.0 added; 2 pairs normalised by 2.
    two = lambda t: t.repeat(2)  # noqa: E731
    base, _ = step_dpo_loss(two(pc), two(pr), two(rc), two(rr), beta=0.5, num_pairs_global=2)
    with_nll, _ = step_dpo_loss(two(pc), two(pr), two(rc), two(rr), beta=0.5, num_pairs_global=2,
                                nll_weight=0.5, chosen_nll_sum=torch.tensor([2.0, 4.0]), num_chosen_tokens_global=3)
    assert math.isclose(base.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    assert math.isclose(with_nll.item() - base.item(), 1.0, rel_tol=1e-6)


def test_sequence_sums_accumulate_in_fp64():
    # 800 fp32 token log-probs in one sequence, 3 in another. An fp32 running sum (what
    # index_add_ does in fp32) rounds at every one of the 800 additions; the exact sum of the
    # same fp32 values (math.fsum) is the reference. fp64 accumulation of 800 terms is off by
    # at most ~800 * 2^-53 relative, far below 1e-12.
    gen = torch.Generator().manual_seed(0)
    n = 800
    logp = -12 * torch.rand(1, n + 3, generator=gen, dtype=torch.float32)
    logp.requires_grad_(True)
    mask = torch.ones(1, n + 3, dtype=torch.bool)
    seq_ids = torch.tensor([[0] * (n + 1) + [1] * 3])  # [1, T]; logp covers positions 1..T-1
    sums, counts = sum_by_sequence(logp, mask, seq_ids, 2)
    values = logp.detach().reshape(-1).tolist()
    exact = [math.fsum(values[:n]), math.fsum(values[n:])]
    for got, want in zip(sums.tolist(), exact):
        assert abs(got - want) <= 1e-12 * abs(want)
    assert sums.dtype == torch.float64 and counts.tolist() == [n, 3]
    # The case is sensitive: fp32 accumulation of the same values is off by far more than that.
    fp32 = torch.zeros((), dtype=torch.float32)
    for v in logp.detach()[0, :n]:
        fp32 += v
    assert abs(fp32.item() - exact[0]) > 1e-7 * abs(exact[0])
    # Gradients reach the fp32 token log-probs: d sum / d logp = 1 for every token.
    sums.sum().backward()
    assert logp.grad.dtype == torch.float32 and torch.equal(logp.grad, torch.ones_like(logp))
