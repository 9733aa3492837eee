"""LoRA learners on real DeepSpeed engines (ZeRO-2 on one rank, ZeRO-3 over two gloo ranks;
tiny fp32 model on CPU): the adapted model starts as the base, training moves the adapters
only, disabling them gives the base back, and the merged export (and the adapters peft loads)
reproduce the adapted model."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from safer_dist.train.lora import ADAPTER_DIR, is_adapter_name
from tests.dist.launch import run_ranks
from tests.dist.test_sft_dist import make_cfg

PROMPTS = [("How do I bake bread?", "Mix flour and water."), ("Explain tax code.", "It is a set of rules.")]
PROBE = [5, 17, 42, 99, 7, 3, 250, 11]


def packed_batch(tokenizer):
    from safer_dist.train.sft_data import encode_example, pack

    return pack([encode_example(tokenizer, [{"role": "user", "content": p}], r, max_seq_len=256, overlong="truncate")
                 for p, r in PROMPTS])


def sequence_logprobs(head, engine, batch) -> list[float]:
    from safer_dist.train.losses import sum_by_sequence

    with torch.no_grad():
        logp, _ = sum_by_sequence(*head.token_logprobs(engine, batch), batch["seq_ids"], len(PROMPTS))
    return logp.tolist()


def sft_loss(head, engine, batch) -> float:
    from safer_dist.train.sft_data import num_label_tokens

    with torch.no_grad():
        return float(head.sft_loss(engine, batch, num_label_tokens(batch)))


def adam_state_numel(optimizer) -> int:
    """Elements of this rank's AdamW first moments (ZeRO keeps the torch optimizer inside)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)


def lora_run(learner, out_dir: str, steps: int) -> dict:
    batch = packed_batch(learner.tokenizer)
    init = {"logp": sequence_logprobs(learner.head, learner.engine, batch),
            "loss": sft_loss(learner.head, learner.engine, batch)}
    before = learner.full_state_dict()
    losses = [learner.sft_step(step)["loss"] for step in range(steps)]
    after = learner.full_state_dict()
    with learner.adapters.disabled():
        disabled = sequence_logprobs(learner.head, learner.engine, batch)
    logits = learner.logits(PROBE)
    learner.export_hf(out_dir)
    out = {"init": init, "losses": losses, "disabled_logp": disabled, "logits": logits.tolist(),
           "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in learner.engine.module.parameters()
                            if p.requires_grad),
           "adam_state_numel": adam_state_numel(learner.engine.optimizer)}
    if before is not None:  # rank 0
        out["changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
        out["keys"] = sorted(before)
    return out


@pytest.mark.parametrize("stage,ranks", [(2, 1), (3, 2)])
def test_lora_starts_as_base_trains_adapters_only_and_exports_merged(tiny_model_dir, demo_data_dir, tmp_path, stage,
                                                                     ranks):
    from peft import PeftModel

    from safer_dist.train.lm_head import LMHead
    from safer_dist.train.models import load_model, load_tokenizer

    cfg = make_cfg(tiny_model_dir, demo_data_dir, f"learner.num_learners={ranks}", f"learner.zero_stage={stage}",
                   "train.global_batch_size=8", "train.micro_batch_size=4", "model.lora.rank=4",
                   "model.lora.alpha=8", "train.lr=1e-2")
    out = tmp_path / "hf"
    results = run_ranks(cfg, functools.partial(lora_run, out_dir=str(out), steps=3))
    r = results[0]

    base = load_model(tiny_model_dir, dtype=torch.float32)
    head = LMHead(base, cfg.learner.loss_chunk_tokens, "cpu")
    batch = packed_batch(load_tokenizer(tiny_model_dir))
    base_logp, base_loss = sequence_logprobs(head, base, batch), sft_loss(head, base, batch)
    # B = 0 at initialisation: the adapters add exactly zero.
    assert r["init"]["loss"] == pytest.approx(base_loss, abs=1e-6)
    assert r["init"]["logp"] == pytest.approx(base_logp, abs=1e-6)
    # Only the adapters train and have optimizer state (over all ranks): 2 blocks of 4 attention
    # linears (64 -> 64) and 3 MLP linears (64 <-> 128), each r * (in + out) with r = 4; the
    # whole model has ~116k parameters.
    expected = 2 * (4 * 4 * (64 + 64) + 3 * 4 * (64 + 128))
    assert r["trainable"] == expected
    assert sum(x["adam_state_numel"] for x in results) == expected
    assert r["losses"][-1] < r["losses"][0]
    # After training: every lora_B moved, nothing else did (bit for bit).
    lora_b = [k for k in r["keys"] if ".lora_B." in k]
    assert len(lora_b) == 14 and set(lora_b) <= set(r["changed"])
    assert all(is_adapter_name(k) for k in r["changed"]), r["changed"]
    # Adapters off: the base model again.
    assert r["disabled_logp"] == pytest.approx(base_logp, abs=1e-6)
    # The merged export is a plain model with the adapted model's logits; peft loads the adapters.
    adapted = torch.tensor(r["logits"])
    merged = load_model(out, dtype=torch.float32)
    assert not any(is_adapter_name(n) or ".base_layer." in n for n, _ in merged.named_parameters())
    ids = torch.tensor([PROBE])
    with torch.no_grad():
        assert (merged(input_ids=ids).logits[0] - adapted).abs().max() < 1e-5
        assert (merged(input_ids=ids).logits[0] - base(input_ids=ids).logits[0]).abs().max() > 1e-3
        peft_model = PeftModel.from_pretrained(load_model(tiny_model_dir, dtype=torch.float32), str(out / ADAPTER_DIR))
        assert (peft_model(input_ids=ids).logits[0] - adapted).abs().max() < 1e-5
    assert Path(peft_model.peft_config["default"].base_model_name_or_path) == Path(tiny_model_dir)



def test_lora_step_dpo_under_zero3_starts_at_log2_and_moves_adapters_only(tiny_model_dir, tmp_path):
    import math

    import numpy as np

    from safer_dist.erpo.pairs import PairData
    from tests.dist.test_dpo_dist import NLL_WEIGHT, PAIRS_SEED, initial_weights, make_cfg, run, write_pairs

    path = tmp_path / "pairs.jsonl"
    rows = write_pairs(path, tiny_model_dir)
    cfg = make_cfg(tiny_model_dir, 2, 4, 2, stage=3)
    cfg.model.lora.rank = 4
    metrics, weights = run(cfg, path)
    # As for full training (tests/dist/test_dpo_dist.py): before the first update the policy
    # is the reference (B = 0), so each pair adds -log σ(0) = log 2, plus nll_weight times the
    # chosen steps' mean NLL per token under the reference.
    batch = [rows[i] for i in PairData(rows, tokenizer=None, seed=PAIRS_SEED).global_batch(0, 4)]
    nll = sum(-r["ref_chosen"] for r in batch) / sum(r["chosen_len"] for r in batch)
    assert metrics[0]["loss"] == pytest.approx(math.log(2) + NLL_WEIGHT * nll, abs=2e-5)
    assert metrics[0]["reward_margin"] == pytest.approx(0.0, abs=2e-5)
    assert metrics[-1]["reward_margin"] > 0
    initial = initial_weights(tiny_model_dir)
    for name, w in weights.items():
        if ".lora_B." in name:
            assert np.abs(w).max() > 0, name
        elif not is_adapter_name(name):
            assert np.array_equal(w, initial[name.replace(".base_layer.", ".")]), name
