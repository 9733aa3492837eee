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
    # 10 pairs, 4 a step: step 5 starts the third epoch, so its pairs have each been trained on twice.
    metrics, weights = run(cfg, path, steps=6)
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


# (prompt, response prefix, continuation, ends with EOS): two continuations share each of the
# first two contexts (packed as trees where the attention takes them), the third stands alone.
REF_ITEMS = [
    ("How do I bake bread?", "<ex_ante>\n<assessment>", "Baking is safe.</assessment>", False),
    ("How do I bake bread?", "<ex_ante>\n<assessment>", "A cooking question.</assessment>", False),
    ("Explain tax code.", "<ex_ante>", "\n<assessment>Tax rules.</assessment>", False),
    ("Explain tax code.", "<ex_ante>", "\n<assessment>none</assessment>", False),
    ("Where is Paris?", "", "Paris is in France.", True),
]


def reference_run(learner, steps: int) -> dict:
    for step in range(steps):
        learner.sft_step(step)
    return {"reference": learner.reference_logprobs(REF_ITEMS, share_prefix=True),
            # one context: the other rank has no row and runs an idle forward pass (ZeRO-3 gathers collectively)
            "single": learner.reference_logprobs(REF_ITEMS[-1:], share_prefix=True),
            "logits": learner.logits(PROBE).tolist()}


@pytest.mark.parametrize("stage,ranks", [(2, 1), (3, 2)])
def test_adapters_off_reference_equals_a_separately_loaded_base_model(tiny_model_dir, demo_data_dir, stage, ranks):
    """erpo.reference=sft with LoRA: the learners' log-probs with adapters off (after the adapters
    trained) are those of the model they started from, loaded on its own (fp32, within 1e-6)."""
    from safer_dist.erpo.pairs import step_sequence
    from safer_dist.rollout.sampling import continuation_logprobs
    from safer_dist.train.lm_head import LMHead
    from safer_dist.train.lora_reference import packs
    from safer_dist.train.losses import sum_by_sequence
    from safer_dist.train.models import load_model, load_tokenizer
    from safer_dist.train.tree_attention import packed_layout

    cfg = make_cfg(tiny_model_dir, demo_data_dir, f"learner.num_learners={ranks}", f"learner.zero_stage={stage}",
                   "train.global_batch_size=8", "train.micro_batch_size=4", "model.lora.rank=4", "train.lr=1e-2")
    results = run_ranks(cfg, functools.partial(reference_run, steps=3))
    assert all(r["reference"] == results[0]["reference"] for r in results), "every rank returns the whole list"

    tokenizer = load_tokenizer(tiny_model_dir)
    encoded = [step_sequence(tokenizer, p, x, c, eos) for p, x, c, eos in REF_ITEMS]
    base = load_model(tiny_model_dir, dtype=torch.float32)
    got = results[0]["reference"]

    head = LMHead(base, cfg.learner.loss_chunk_tokens, "cpu")

    def base_logprobs(items: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """The base model on its own, through the same loss head, in the rows each rank packed."""
        out = [None] * len(items)
        for rank in range(ranks):
            for row, members in packs(items, rank=rank, world_size=ranks, share_prefix=True):
                with torch.no_grad():
                    sums, counts = sum_by_sequence(*head.token_logprobs(base, row, packed_layout(row["position_ids"])),
                                                   row["seq_ids"], len(members))
                for i, s, n in zip(members, sums.tolist(), counts.tolist()):
                    out[i] = (s, int(n))
        return out

    want = base_logprobs(encoded)
    assert [n for _, n in got] == [n for _, n in want] == [len(c) for _, c in encoded]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-6)
    assert results[0]["single"][0] == pytest.approx(base_logprobs(encoded[-1:])[0], abs=1e-6)
    # The rollout workers' reference pass (full logits) on the base model: each token within 1e-6.
    full = continuation_logprobs(base, encoded, share_prefix=False)
    assert all(abs(g - w) <= 1e-6 * n for (g, n), (w, _) in zip(got, full))
    # ... and not the adapted model's: the adapters moved it (so adapters-on would fail above).
    ids = torch.tensor([PROBE])
    with torch.no_grad():
        assert (base(input_ids=ids).logits[0] - torch.tensor(results[0]["logits"])).abs().max() > 1e-3
