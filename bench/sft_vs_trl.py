"""SFT training throughput: safer's learner step vs TRL ``SFTTrainer`` with packing.

Same random Llama (``--preset``, default bench-20m, ~20M parameters), same data (the seeded
demo SFT set: variable-length Ex-Ante traces, loss on the assistant tokens), same effective
batch (``--global-batch`` sequences per optimizer step in micro-batches of ``--micro-batch``),
fp32, AdamW, one process, CPU. The figure is training tokens/s (prompt + response tokens of
the packed batches; neither side pads).

- safer: ``safer_dist.train.learner.Learner`` exactly as a learner rank runs it — a single-process
  DeepSpeed engine (ZeRO ``--zero-stage``, world size 1, gloo), ``Learner.sft_step``: the
  step's micro-batches tokenized and packed on the fly (``sft_data.pack``), forward, backward,
  optimizer step. Attention: the CPU default (``safer_segments``); a second row forces
  ``sdpa`` on the same engine to separate the attention kernel from the rest.
- TRL: ``SFTTrainer`` with ``packing=True`` (its default ``bfd`` strategy, padding-free
  rows with position_ids), prompt-completion data (loss on the completion), rows of
  ``micro-batch x mean example length`` tokens, ``per_device_train_batch_size=1``, the same
  gradient accumulation. Two TRL defaults are changed to match safer's run: ``bf16=False``
  (fp32 on CPU, as safer) and ``gradient_checkpointing=False`` (TRL turns it on by default;
  it recomputes the forward). The dataset is tokenized and packed once before timing.

Each window is ``--steps`` optimizer steps after one untimed step; contestants alternate.

    .venv/bin/python bench/sft_vs_trl.py            # ~4 min on 2 cores
    .venv/bin/python bench/sft_vs_trl.py --repeats 7 --steps 4 --threads 2
"""

from __future__ import annotations

import _harness as h  # noqa: I001 - sets DS_ACCELERATOR etc. before torch/transformers imports

import statistics
import time

import torch


def safer_window(args, learner, attn: str | None):
    state = {"step": 0}
    module = learner.engine.module
    default_attn = module.config._attn_implementation

    def step() -> int:
        m = learner.sft_step(state["step"])
        state["step"] += 1
        return m["num_tokens"]

    def run():
        torch.set_num_threads(args.threads)
        if attn:
            module.set_attn_implementation(attn)
        try:
            if state["step"] == 0:
                step()  # warm-up, untimed
            with h.Stopwatch() as sw:
                tokens = sum(step() for _ in range(args.steps))
        finally:
            module.set_attn_implementation(default_attn)
        return tokens, sw.seconds

    return run


class TokenClock:
    """Counts the tokens the policy model is fed in training mode and stamps each optimizer step."""

    def __init__(self, model):
        self.tokens = 0
        self.stamps: list[tuple[float, int]] = []
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += int(mask.sum()) if mask is not None else ids.numel()

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the step's kernels have finished when it is stamped
                clock.stamps.append((time.perf_counter(), clock.tokens))

        return _Stamp()


def trl_window(args, trainer, clock):
    """One window = one ``trainer.train()`` of steps+1 optimizer steps; the first is untimed."""

    def run():
        torch.set_num_threads(args.threads)
        clock.stamps.clear()
        trainer.train()
        (t0, n0), (t1, n1) = clock.stamps[0], clock.stamps[-1]
        assert len(clock.stamps) == args.steps + 1, len(clock.stamps)
        return n1 - n0, t1 - t0

    return run


def pack_length(ws, micro_batch: int) -> tuple[int, list[int]]:
    """TRL's packed row length (``micro_batch`` x the mean example length) and every example's length."""
    from safer_dist.train.models import load_tokenizer
    from safer_dist.train.sft_data import encode_example

    tok = load_tokenizer(ws.model_dir)
    lens = [len(encode_example(tok, r["prompt"], r["response"], max_seq_len=1 << 20, overlong="drop").input_ids)
            for r in ws.records]
    return round(micro_batch * statistics.mean(lens)), lens


def trl_trainer(args, ws, pack_len: int, *, model=None, **overrides):
    """TRL ``SFTTrainer`` as described in the module docstring, on ``model`` (default: the
    workspace's model in fp32 with ``sdpa``); ``overrides`` replace ``SFTConfig`` fields."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from safer_dist.train.models import load_tokenizer

    tok = load_tokenizer(ws.model_dir)
    rows = []
    for r in ws.records:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                         tokenize=False)
        rows.append({"prompt": prompt, "completion": r["response"]})  # TRL appends the EOS token
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(ws.model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                     local_files_only=True)
    clock = TokenClock(model)
    config = SFTConfig(**{**dict(
        output_dir=str(ws.root / "trl-sft"), max_steps=args.steps + 1,
        per_device_train_batch_size=1, gradient_accumulation_steps=args.global_batch // args.micro_batch,
        packing=True, max_length=pack_len, learning_rate=2e-4, lr_scheduler_type="constant",
        adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, gradient_checkpointing=False, use_cpu=True,
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10, dataloader_num_workers=0,
        seed=args.seed,
    ), **overrides})
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[clock.callback()])
    trainer.remove_callback(PrinterCallback)  # it prints a metrics dict at the end of every window
    return trainer, clock


def main() -> None:
    p = h.parser(__doc__.split("\n")[0], repeats=5, steps=2)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per packed micro-batch")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--num-sft", type=int, default=512, help="demo SFT examples")
    p.add_argument("--no-sdpa-row", action="store_true", help="skip the safer-with-sdpa row")
    args = p.parse_args()
    h.apply_smoke(args, global_batch=4, micro_batch=2, num_sft=32, no_sdpa_row=True)
    h.set_threads(args.threads)
    h.header("SFT: safer learner step vs TRL SFTTrainer (packing)", args)
    ws = h.workspace(args, num_sft=args.num_sft)
    try:
        pack_len, lens = pack_length(ws, args.micro_batch)
        print(f"# data: {len(lens)} traces, {min(lens)}-{max(lens)} tokens (mean {statistics.mean(lens):.0f}); "
              f"global batch {args.global_batch} = {args.global_batch // args.micro_batch} x {args.micro_batch}; "
              f"TRL packed rows of {pack_len} tokens")

        # TRL first: accelerate decides at construction whether the process is distributed, and
        # after the safer learner has formed its (1-rank) process group it would wrap TRL's model
        # in DDP.
        trainer, clock = trl_trainer(args, ws, pack_len)
        learner = h.safer_learner(h.learner_sections(args, ws.model_dir, ws.sft_path, lr=2e-4), args.seed)
        name_safer = f"safer Learner.sft_step (ZeRO-{args.zero_stage}, {learner.attn_implementation})"
        contestants = {name_safer: safer_window(args, learner, None)}
        if not args.no_sdpa_row:
            contestants[f"safer Learner.sft_step (ZeRO-{args.zero_stage}, sdpa)"] = safer_window(args, learner, "sdpa")
        contestants["TRL SFTTrainer (packing=bfd, sdpa)"] = trl_window(args, trainer, clock)
        rates = h.alternate(contestants, args.repeats)
        h.print_table(f"SFT training tokens/s, preset {args.preset}, {args.threads} thread(s), "
                      f"{args.steps} optimizer steps per window", "tokens/s", rates)
        print(h.paired_line(rates, name_safer, "TRL SFTTrainer (packing=bfd, sdpa)"))
        print(h.ratio_line(h.median(rates[name_safer]), h.median(rates["TRL SFTTrainer (packing=bfd, sdpa)"])))
    finally:
        ws.cleanup(keep=bool(args.workdir))


if __name__ == "__main__":
    main()
