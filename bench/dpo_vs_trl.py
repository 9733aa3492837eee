"""Preference training throughput: safer step-DPO vs TRL ``DPOTrainer``.

Same random Llama (``--preset``, default bench-20m), same pairs, same effective batch
(``--global-batch`` pairs per optimizer step in micro-batches of ``--micro-batch`` pairs),
fp32, one process, CPU. The figure is *pair tokens/s*: the tokens of prefix+chosen and
prefix+rejected of the pairs trained on, per second of training step.

Pairs (step-level, as ERPO makes them): from the seeded demo SFT traces, prefix = the chat
prompt plus the Ex-Ante steps before step k (k cycles over assessment, rules, calibration),
chosen = that trace's step k, rejected = step k of another trace (a different length).

- safer: ``safer_dist.train.learner.Learner`` as a learner rank runs it — a single-process DeepSpeed
  engine (ZeRO ``--zero-stage``, world size 1) — ``Learner.load_pairs`` + ``Learner.dpo_step``:
  one padding-free pack per micro-batch in which each pair's prefix is encoded once and the
  chosen and rejected steps both attend to it (``erpo.loss.share_prefix``, the default;
  ``--no-share-prefix`` packs prefix+chosen and prefix+rejected as separate sequences), attention
  ``safer_segments`` (the CPU default), the learner's loss head (per-sequence log-probs, chunked
  per ``learner.loss_chunk_tokens``) + ``losses.step_dpo_loss``. Its rate counts the same pair
  tokens as TRL's (the prefix twice), whether the prefix was encoded once or twice, so the
  ratio is one of pairs per second; the tokens per pair actually run are printed.
  Reference log-probs come with the pairs: in ERPO the rollout workers compute them at sampling
  time (``sampling.continuation_logprobs``, prefix shared the same way), so the learner holds
  one model. That one-off pass is timed separately and reported, not counted in the step rate.
- TRL ``DPOTrainer``: (a) its defaults — a reference model copy run every step; (b)
  ``precompute_ref_log_probs=True`` — reference log-probs computed once before training
  (outside the timed windows, like safer's). Both pad chosen and rejected rows to the batch's
  longest (TRL's ``padding_free`` is disabled in this TRL version). Two TRL defaults are changed
  to match safer's run: ``bf16=False`` (fp32 on CPU) and ``gradient_checkpointing=False``.

Each window is ``--steps`` optimizer steps after one untimed step; contestants alternate.
The final ratio is against the faster TRL configuration.

    .venv/bin/python bench/dpo_vs_trl.py            # ~4 min on 2 cores
"""

from __future__ import annotations

import _harness as h  # noqa: I001 - sets DS_ACCELERATOR etc. before torch/transformers imports

import dataclasses
import json
import time

import torch

from sft_vs_trl import TokenClock, trl_window


def make_pairs(records: list[dict], num_pairs: int) -> list[dict]:
    """Step-level pairs sharing a prefix (see the module docstring)."""
    from safer_dist.reasoning.exante import REASONING_STEPS, step_texts

    steps = [step_texts(r["response"]) for r in records]
    pairs = []
    for i in range(num_pairs):
        k = i % len(REASONING_STEPS)
        a, b = i % len(records), (i * 7 + 3) % len(records)
        if a == b:
            b = (b + 1) % len(records)
        pairs.append({
            "prompt": records[a]["prompt"], "prefix": "".join(steps[a][:k]), "step": REASONING_STEPS[k],
            "chosen_text": steps[a][k], "rejected_text": steps[b][k], "chosen": 0, "rejected": 1,
        })
    return pairs


def reference_logprobs(ws, pairs: list[dict], model=None) -> float:
    """Fill ref_chosen / ref_rejected as rollout workers do, with ``model`` (default: the
    workspace's model in fp32 on CPU); returns the seconds it took."""
    from safer_dist.train.models import load_model, load_tokenizer
    from safer_dist.erpo.pairs import step_sequence
    from safer_dist.rollout.sampling import continuation_logprobs

    tok = load_tokenizer(ws.model_dir)
    if model is None:
        model = load_model(ws.model_dir, dtype=torch.float32).eval()
    items = []
    for p in pairs:
        ctx, chosen = step_sequence(tok, p["prompt"], p["prefix"], p["chosen_text"], p["step"] == "answer")
        _, rejected = step_sequence(tok, p["prompt"], p["prefix"], p["rejected_text"], p["step"] == "answer")
        items += [(ctx, chosen), (ctx, rejected)]
    t0 = time.perf_counter()
    out = continuation_logprobs(model, items)
    seconds = time.perf_counter() - t0
    for i, p in enumerate(pairs):
        p["ref_chosen"], p["chosen_len"] = out[2 * i]
        p["ref_rejected"], p["rejected_len"] = out[2 * i + 1]
    return seconds


def print_tokens_per_pair(learner) -> None:
    """Tokens per pair the learner runs, and what the other packing would run (load-independent)."""
    from safer_dist.erpo.pairs import packed_length

    data = learner._pairs
    enc = [data.encode(i) for i in range(len(data))]
    per_pair = {share: sum(packed_length(len(e["ctx"]), [len(e["chosen"]), len(e["rejected"])], share_prefix=share)
                           for e in enc) / len(enc) for share in (False, True)}
    print(f"# tokens per pair run by the model: {per_pair[False]:.1f} with the prefix twice, {per_pair[True]:.1f} "
          f"with it shared; this run: {'shared' if learner.share_prefix else 'twice'}")


def safer_window(args, learner):
    state = {"step": 0}

    def step() -> int:
        m = learner.dpo_step(state["step"])
        state["step"] += 1
        return m["num_pair_tokens"]  # the unit of TRL's count, whatever was run

    def run():
        torch.set_num_threads(args.threads)
        if state["step"] == 0:
            step()  # warm-up, untimed
        with h.Stopwatch() as sw:
            tokens = sum(step() for _ in range(args.steps))
        return tokens, sw.seconds

    return run


def trl_trainer(args, ws, pairs: list[dict], *, precompute: bool):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from safer_dist.train.models import load_tokenizer

    tok = load_tokenizer(ws.model_dir)
    rows = []
    for p in pairs:
        prompt = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True,
                                         tokenize=False)
        rows.append({"prompt": prompt + p["prefix"], "chosen": p["chosen_text"], "rejected": p["rejected_text"]})
    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True)
    clock = TokenClock(model)
    name = "precompute" if precompute else "default"
    config = DPOConfig(
        output_dir=str(ws.root / f"trl-dpo-{name}"), max_steps=args.steps + 1,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.global_batch // args.micro_batch,
        precompute_ref_log_probs=precompute, beta=0.1, learning_rate=1e-5, lr_scheduler_type="constant",
        bf16=False, gradient_checkpointing=False, use_cpu=True,
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10, dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[clock.callback()])
    trainer.remove_callback(PrinterCallback)
    return trainer, clock


def main() -> None:
    p = h.parser(__doc__.split("\n")[0], repeats=3, steps=3)
    p.add_argument("--global-batch", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--num-pairs", type=int, default=128)
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="safer packs each pair's prefix twice (erpo.loss.share_prefix=false)")
    args = p.parse_args()
    h.apply_smoke(args, global_batch=4, micro_batch=2, num_pairs=8)
    h.set_threads(args.threads)
    h.header("step-DPO: safer learner step vs TRL DPOTrainer", args)
    ws = h.workspace(args, num_sft=max(64, args.num_pairs))
    try:
        pairs = make_pairs(ws.records, args.num_pairs)
        ref_s = reference_logprobs(ws, pairs)
        pairs_path = ws.root / "pairs.jsonl"
        pairs_path.write_text("".join(json.dumps(x) + "\n" for x in pairs))
        mean_tokens = sum(x["chosen_len"] + x["rejected_len"] for x in pairs) / len(pairs)
        print(f"# {len(pairs)} pairs, mean step tokens (chosen + rejected) {mean_tokens:.0f}; global batch "
              f"{args.global_batch} pairs = {args.global_batch // args.micro_batch} x {args.micro_batch}")
        print(f"# safer reference pass (rollout-worker side, untimed in the rate): {ref_s:.2f} s for "
              f"{len(pairs)} pairs")

        # TRL first: see sft_vs_trl.py (accelerate would otherwise wrap its models in DDP).
        trl_default = trl_trainer(args, ws, pairs, precompute=False)
        with h.Stopwatch() as sw:
            trl_pre = trl_trainer(args, ws, pairs, precompute=True)
        print(f"# TRL DPOTrainer(precompute_ref_log_probs=True) construction incl. its reference pass: {sw.seconds:.2f} s")
        sections = h.learner_sections(args, ws.model_dir, ws.sft_path, lr=1e-5, min_lr_ratio=1.0)
        sections["dpo_loss"] = dataclasses.replace(sections["dpo_loss"], share_prefix=args.share_prefix)
        learner = h.safer_learner(sections, args.seed)
        learner.load_pairs(str(pairs_path), args.seed)
        print_tokens_per_pair(learner)
        shared = "prefix once" if learner.share_prefix else "prefix twice"
        names = {
            "safer": f"safer Learner.dpo_step (ZeRO-{args.zero_stage}, {shared}, {learner.attn_implementation})",
            "default": "TRL DPOTrainer (defaults: ref model each step)",
            "precompute": "TRL DPOTrainer (precompute_ref_log_probs)",
        }
        rates = h.alternate({
            names["safer"]: safer_window(args, learner),
            names["default"]: trl_window(args, *trl_default),
            names["precompute"]: trl_window(args, *trl_pre),
        }, args.repeats)
        h.print_table(f"step-DPO pair tokens/s, preset {args.preset}, {args.threads} thread(s), "
                      f"{args.steps} optimizer steps per window", "pair tokens/s", rates)
        safer = h.median(rates[names["safer"]])
        print(h.paired_line(rates, names["safer"], names["default"]) + "  [vs TRL defaults]")
        print(h.paired_line(rates, names["safer"], names["precompute"]) + "  [vs TRL precompute_ref_log_probs]")
        print(h.ratio_line(safer, h.median(rates[names["default"]]), "vs TRL defaults"))
        print(h.ratio_line(safer, h.median(rates[names["precompute"]]), "vs TRL precompute_ref_log_probs"))
        peer = max(h.median(rates[names["default"]]), h.median(rates[names["precompute"]]))
        print(h.ratio_line(safer, peer))
    finally:
        ws.cleanup(keep=bool(args.workdir))


if __name__ == "__main__":
    main()
