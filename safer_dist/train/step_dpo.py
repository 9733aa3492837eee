"""Step-level DPO on one learner rank: an ERPO iteration's pairs, and an optimizer step on them.

:class:`StepDpo` is the ERPO half of :class:`safer_dist.train.learner.Learner`, which inherits
it and sets up everything it uses: the DeepSpeed engine, the loss head (``head``), the tokenizer,
rank and world size, the stage's optimisation (``optim``) and step-DPO loss (``dpo_loss``),
whether pairs share their context (``share_prefix``), and the helpers every step of a rank uses
(``_sum_over_ranks``, ``_on_device``, ``_backward_and_step``). Loss scaling is the learner's
(its module docstring): the loss of a micro-batch is over the global batch's pairs, so any split
into ranks and micro-batches gives the same gradient.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.profiler import record_function

from safer_dist.erpo.pairs import PairData
from safer_dist.train.engine import FORWARD_LOSS, read_numbers
from safer_dist.train.losses import step_dpo_loss, sum_by_sequence
from safer_dist.train.sft_data import StepPrefetcher


class StepDpo:
    """``load_pairs`` then ``dpo_step``, on a set-up :class:`~safer_dist.train.learner.Learner`."""

    _pairs: PairData | None  # the loaded pairs, tokenized (None before load_pairs; set in Learner.__init__)
    _pair_batches: StepPrefetcher | None  # their micro-batches by step, the next step's packed ahead

    def load_pairs(self, path: str, seed: int, safety_repeats: int = 1, *, share_prefix: bool | None = None) -> int:
        """Read an iteration's pairs (written by the driver before training) and tokenize them, each
        once; returns how many the learner trains on per epoch (safety pairs count
        ``safety_repeats`` times). A step's micro-batches are packed from the tokenized pairs, the
        next step's in the background (``learner.prefetch_batches``), as SFT's are.

        ``share_prefix``: pack each pair's context once; ``None`` is the set-up's choice
        (``self.share_prefix``); ``False`` packs it twice (benchmarks compare the two); ``True``
        needs a learner set up to share it."""
        if share_prefix is None:
            share_prefix = self.share_prefix
        elif share_prefix and not self.share_prefix:
            raise ValueError("load_pairs(share_prefix=True): this learner was set up without prefix sharing "
                             "(erpo.loss.share_prefix=false, or an attention backend that takes no shared prefix)")
        recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        pairs = PairData([r for r in recs if r.get("chosen") is not None], self.tokenizer, seed=seed,
                         safety_repeats=safety_repeats, share_prefix=share_prefix).tokenize_all()
        if self._pair_batches is not None:
            self._pair_batches.close()  # it may be packing the previous pairs' next step
        t = self.optim
        self._pairs = pairs
        self._pair_batches = StepPrefetcher(
            lambda step: pairs.micro_batches(step, global_batch_size=t.global_batch_size, rank=self.rank,
                                             world_size=self.world_size, micro_batch_size=t.micro_batch_size),
            enabled=self.cfg.prefetch_batches,
        )
        return len(pairs)

    def dpo_step(self, step: int) -> dict:
        """One optimizer step of step-level DPO (``dpo_loss`` of set-up) on pair batch ``step``
        of the loaded pairs. Reference log-probs come with the pairs (computed at sampling by
        rollout workers, or by the learners with adapters off: ``Learner.reference_logprobs``).
        ``num_tokens``: tokens run through the model (each context once when the prefix is
        shared); ``num_pair_tokens``: context + chosen plus context + rejected, the same whether
        shared or not."""
        t0 = time.perf_counter()
        t, erpo = self.optim, self.dpo_loss
        assert erpo is not None, "dpo_step needs a learner set up with dpo_loss"
        assert self._pair_batches is not None, "dpo_step needs load_pairs first"
        batches = self._pair_batches.get(step)
        n_tokens_local = sum(b["input_ids"].numel() for b in batches)
        n_pair_tokens_local = sum(int(b["num_pair_tokens"]) for b in batches)
        n_chosen_local = sum(int(b["chosen_len"].sum()) for b in batches)
        totals = self._sum_over_ranks([n_tokens_local, n_pair_tokens_local, n_chosen_local])
        n_chosen = totals[2].clamp_min(1.0)  # float64 like the loss: the NLL term divides on the device
        n_pairs = t.global_batch_size
        scale = self.engine.gradient_accumulation_steps() * self.world_size
        lr = self.engine.get_lr()[0]
        # Summed on the device: no host synchronisation per micro-batch.
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device)
                for k in ("loss", "margin", "acc", "reward_chosen", "reward_rejected")}
        for b in batches:
            k = int(b["num_pairs"])
            dev, layout = self._on_device(b, ("input_ids", "position_ids", "labels", "seq_ids", "ref_chosen",
                                              "ref_rejected", "chosen_len", "rejected_len"))
            with record_function(FORWARD_LOSS):
                logp, _ = sum_by_sequence(*self.head.token_logprobs(self.engine, dev, layout), dev["seq_ids"], 2 * k)  # fp64
                chosen, rejected = logp[0::2], logp[1::2]
                loss, stats = step_dpo_loss(
                    chosen, rejected, dev["ref_chosen"].to(logp), dev["ref_rejected"].to(logp), beta=erpo.beta,
                    num_pairs_global=n_pairs, label_smoothing=erpo.label_smoothing, length_alpha=erpo.length_alpha,
                    chosen_len=dev["chosen_len"], rejected_len=dev["rejected_len"],
                    nll_weight=erpo.nll_weight, chosen_nll_sum=-chosen, num_chosen_tokens_global=n_chosen,
                )
            self._backward_and_step(loss.float() * scale)
            sums["loss"] += loss.detach()  # stats are detached already
            sums["margin"] += stats["margin"].sum()
            sums["acc"] += (stats["margin"] > 0).double().sum()
            sums["reward_chosen"] += stats["reward_chosen"].sum()
            sums["reward_rejected"] += stats["reward_rejected"].sum()
        sums_global = self._sum_over_ranks(list(sums.values()))
        loss, margin, acc, rc, rr, n_tokens, n_pair_tokens, _, grad_norm = read_numbers(
            [sums_global, totals, self.engine.get_global_grad_norm()], self.device
        )
        return {
            "loss": loss, "lr": lr, "reward_margin": margin / n_pairs, "preference_accuracy": acc / n_pairs,
            "reward_chosen": rc / n_pairs, "reward_rejected": rr / n_pairs, "num_pairs": n_pairs,
            "num_tokens": int(n_tokens), "num_pair_tokens": int(n_pair_tokens), "grad_norm": grad_norm,
            "step_time_s": time.perf_counter() - t0,
        }
