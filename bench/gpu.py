"""Training throughput and MFU on one GPU: safer's learner steps vs a plain PyTorch loop and TRL.

One process, one GPU (CPU with ``--smoke``), a randomly initialised Llama of a named shape
(``--shape``):

- ``tinyllama-1.1b``: hidden 2048, 22 layers, 32 query / 4 key-value heads, ffn 5632, vocab 32000
  (1.10B parameters);
- ``llama3-8b-slice``: Llama-3-8B's layer (hidden 4096, 32 / 8 heads, ffn 14336) and vocabulary
  (128256) with 8 layers instead of 32 (2.80B parameters);
- ``smoke``: hidden 64, 2 layers, 4 / 2 heads, the tokenizer's 3k vocabulary (``--smoke``).

Data: the seeded demo Ex-Ante traces, tokenized by a 3k byte-level BPE trained on them (the
larger vocabularies only size the embedding and LM head). Every row trains on the same packed,
padding-free micro-batches of ``--micro-batch`` traces (position_ids restart per sequence; ~128
traces are ~18k tokens), bf16 on CUDA (fp32 on CPU), and the same attention kernel: the one
the learner resolves (``safer_varlen`` on CUDA without flash-attn, ``safer_segments`` on CPU).
Rows:

- ``safer Learner.sft_step``: ``safer_dist.train.learner.Learner`` as a learner rank runs it — a
  single-process DeepSpeed engine (ZeRO ``--zero-stage``, world size 1), with the learner's own
  defaults for everything but the batch sizes and the learning rate (mixed precision: fp32
  master weights and Adam states), tokenizing and packing each step's traces on the fly.
- ``safer Learner.dpo_step``: the same engine on step-level pairs (built as in
  bench/dpo_vs_trl.py: ``--micro-batch`` pairs per micro-batch, prefix+chosen and
  prefix+rejected packed as separate sequences — ``load_pairs(share_prefix=False)``, so that the
  plain loop runs the same batches; reference log-probs computed once before).
- ``safer Learner.dpo_step`` (``DPO-SHARED``): the same engine and pairs with each pair's prefix
  packed once (``erpo.loss.share_prefix``, the default: a tree row; on CUDA ``safer_varlen``
  runs it through ``flex_attention``). Its tokens are the pairs' unshared tokens
  (``num_pair_tokens``, as for the rows above), so its tokens/s over the ``DPO`` row's is the
  speed-up of sharing on the same pairs; the pairs are reloaded (untimed) before each DPO window.
- ``safer Learner LoRA`` (with ``--lora-rank R``): the same three learner rows with LoRA adapters
  (``model.lora.rank`` R, alpha 2R, on every linear layer of the blocks), a fourth contestant:
  the base frozen, only the adapters in the optimizer, on the same batches. Its MFU counts
  4 x N + 2 x the adapters' parameters per token (frozen weights get no weight gradient:
  ``safer_dist.train.throughput.mfu``); its peak memory is what adapters save.
- ``plain PyTorch``: the limit for this model, kernel and batch — the model alone, bf16
  parameters, fused AdamW on them, ``F.cross_entropy`` on fp32 logits, gradient clipping,
  batches packed before timing. Its DPO row computes the same loss (``losses.sequence_logprobs``
  + ``losses.step_dpo_loss``) on the same pair batches.
- ``TRL SFTTrainer``: ``packing=True`` (``bfd``, padding-free with position_ids), rows of
  ``--micro-batch`` x the mean trace length, the same model object type, dtype and kernel,
  ``bf16=True`` on CUDA, its default fused AdamW, no gradient checkpointing (bench/sft_vs_trl.py).

Figures per row: tokens/s (every token of the packed batches: prompt and response, for DPO
prefix+chosen and prefix+rejected, whether or not the prefix is packed once); MFU = 6 x (parameters - input embedding) x tokens/s / peak
bf16 FLOP/s (attention's own FLOPs are not counted; peak from ``PEAK_BF16_TFLOPS`` by GPU name,
or ``--peak-tflops``); peak memory (``torch.cuda.max_memory_allocated`` over the row's windows,
model and optimizer states included; not reported on CPU); the ratio to the plain loop of the
same kind (SFT or DPO; DPO-SHARED to the plain DPO row; LoRA rows to the plain full fine-tuning).

Protocol: the contestants' model states do not fit on one GPU together (the 8B slice's learner
alone holds 52 GiB of them under ZeRO-2), so contestants run one after another — TRL, the plain
loop, the learner, the LoRA learner — each built, warmed up with one untimed step, timed in ``--repeats`` windows
of ``--steps`` optimizer steps (its SFT and DPO windows alternating), then freed. A contestant
that runs out of memory gets ``OOM`` rows and the others still run. ``--json OUT`` writes the rows.

    python bench/gpu.py --shape tinyllama-1.1b --json tinyllama.json     # one GPU
    python bench/gpu.py --shape llama3-8b-slice                          # H200; 80 GB: --micro-batch 32
    python bench/gpu.py --shape llama3-8b-slice --lora-rank 16           # + the LoRA learner's rows
    python bench/gpu.py --smoke                                          # tiny shape, seconds (CPU here)

On an offline GPU host, with the wheels of bench/gpu-wheels.sh: docs/BENCHMARKS.md ("One GPU").
"""

from __future__ import annotations

import _harness as h  # noqa: I001 - sets DS_ACCELERATOR etc. before torch/transformers imports

import gc
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from dpo_vs_trl import make_pairs, reference_logprobs
from sft_vs_trl import pack_length, trl_trainer, trl_window
from safer_dist.cluster.gpu_memory import SHAPES as PUBLISHED_SHAPES, ModelShape
from safer_dist.train.engine import BACKWARD, FORWARD_LOSS, OPTIMIZER_STEP, PHASES
from safer_dist.train.throughput import mfu

SHAPES: dict[str, ModelShape] = {
    "tinyllama-1.1b": ModelShape(2048, 22, 32, 4, 5632, 32000),
    "llama3-8b-slice": replace(PUBLISHED_SHAPES["llama3-8b"], num_layers=8),
    "smoke": ModelShape(64, 2, 4, 2, 128, 3000),
}
# Dense bf16 tensor-core peak (vendor datasheets, TFLOP/s), matched in order against
# torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# HBM bandwidth (vendor datasheets, GB/s), matched in order the same way (bench/rollout.py's
# decode bound). "NVIDIA H100 80GB HBM3" is the SXM card; A100 names carry 80GB only on 80 GB cards.
HBM_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0),
            ("A100 80GB PCIe", 1935.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0), ("L40S", 864.0))
ROWS = ("sft", "dpo")
LEARNER_ROWS = (*ROWS, "dpo-shared")
PLAIN_KIND = {"dpo-shared": "dpo"}  # the plain row a learner row's vs_plain compares with, where not its own kind
TRL, PLAIN, LEARNER, LORA = "TRL SFTTrainer", "plain PyTorch", "safer Learner", "safer Learner LoRA"


def device_figure(table, given: float | None, option: str, device: str, what: str, purpose: str):
    """(value, where it came from): ``given`` (the command line's ``option``), else the first
    entry of ``table`` whose key is in the CUDA device's name; None off CUDA or when none matches."""
    if given:
        return given, option
    if device != "cuda":
        return None, f"CPU: pass {option} {purpose}"
    name = torch.cuda.get_device_name()
    for key, value in table:
        if key in name:
            return value, f"{name}, {what}"
    return None, f"{name}: not in the table, pass {option}"


def peak_tflops(args, device: str) -> tuple[float | None, str]:
    return device_figure(PEAK_BF16_TFLOPS, args.peak_tflops, "--peak-tflops", device, "dense bf16", "for an MFU")


def hbm_gbps(given: float | None, device: str) -> tuple[float | None, str]:
    return device_figure(HBM_GBPS, given, "--hbm-gbps", device, "HBM", "for a bound")


def build_model_dir(shape: ModelShape, tok, out: Path, *, device: str, dtype: torch.dtype, seed: int) -> int:
    """Write a random Llama of ``shape`` (in ``dtype``, built on ``device``) and ``tok`` to ``out``;
    return its parameters minus the input embedding (the N of MFU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safer_dist.train.models import _LLAMA_COMMON

    config = LlamaConfig(
        hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, intermediate_size=shape.intermediate_size,
        vocab_size=max(shape.vocab_size, len(tok)), tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None, use_cache=False, **_LLAMA_COMMON,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    del model
    free_memory()
    return n


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def new_record(num_trained: int | None = None) -> dict:
    """What a row keeps of its windows: tokens/s, tokens and peak CUDA memory (bytes) of each;
    ``num_trained``: the parameters with a weight gradient where not all are (adapters)."""
    return {"rates": [], "tokens": [], "peaks": [], "num_trained": num_trained}


def measured(step, steps: int, device: str, record: dict) -> h.Window:
    """A window of ``steps`` calls of ``step(index) -> tokens`` after one untimed warm-up call;
    the window's tokens and peak CUDA memory go into ``record``."""
    state = {"step": 0}

    def run():
        if state["step"] == 0:
            step(0)  # warm-up: kernels chosen, optimizer states allocated
            state["step"] = 1
        synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with h.Stopwatch() as sw:
            tokens = 0
            for _ in range(steps):
                tokens += step(state["step"])
                state["step"] += 1
            synchronize(device)
        record["tokens"].append(tokens)
        if device == "cuda":
            record["peaks"].append(torch.cuda.max_memory_allocated())
        return tokens, sw.seconds

    return run


def profile_rows(label: str, steps: dict, device: str, out_dir: str | None) -> None:
    """With ``--profile DIR``: one more step of each kind under ``torch.profiler`` (CPU, and CUDA
    on a GPU). Writes ``DIR/<label>-<kind>.txt`` (the ops by self time, device time first on a
    GPU) and adds to ``DIR/phases.json`` the step's wall time and each phase's time (the ranges
    the learner and the plain loop mark: forward + loss, backward, optimizer step)."""
    if not out_dir:
        return
    from torch.profiler import ProfilerActivity, profile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "phases.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for kind, step in steps.items():
        name = f"{label} {kind.upper()}"
        synchronize(device)
        with profile(activities=activities) as prof:
            with h.Stopwatch() as sw:
                step()
                synchronize(device)
        events = prof.key_averages()
        sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        (out / f"{name.replace(' ', '-')}.txt").write_text(events.table(sort_by=sort, row_limit=40))
        phases = {e.key: {"cpu_ms": e.cpu_time_total / 1e3, "device_ms": e.device_time_total / 1e3, "calls": e.count}
                  for e in events if e.key in PHASES}
        summary[name] = {"step_ms": sw.seconds * 1e3, "phases": phases}
        print(f"# profile {name}: step {sw.seconds * 1e3:.0f} ms; "
              + ", ".join(f"{k.split('.')[1]} {v['cpu_ms']:.0f} ms CPU / {v['device_ms']:.0f} ms device"
                          for k, v in phases.items()))
    summary_path.write_text(json.dumps(summary, indent=1))


def run_rows(label: str, windows: dict[str, h.Window], records: dict[str, dict], repeats: int) -> dict[str, dict]:
    """Alternate ``label``'s windows (one per kind, as ``records``); each record gets its rates."""
    rates = h.alternate({f"{label} {kind.upper()}": w for kind, w in windows.items()}, repeats)
    for kind in windows:
        records[kind]["rates"] = rates[f"{label} {kind.upper()}"]
    return records


class PlainLoop:
    """The model alone: fused AdamW on its own (bf16 on CUDA) parameters, batches on the device."""

    def __init__(self, model_dir: Path, train, *, device: str, dtype: torch.dtype, attn: str):
        from safer_dist.train.models import load_model

        self.model = load_model(model_dir, dtype=dtype, attn_implementation=attn, device=device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                     weight_decay=train.weight_decay, fused=True)
        self.grad_clip, self.device = train.grad_clip, device

    def to_device(self, batches: list[dict]) -> list[dict]:
        """Tensors onto the device; 0-d counts become ints (reading them later would sync)."""
        return [{k: int(v) if v.dim() == 0 else v.to(self.device) for k, v in b.items()} for b in batches]

    def step(self, batches: list[dict], loss_fn) -> int:
        for b in batches:  # the phases carry the learner's range names (--profile)
            with record_function(FORWARD_LOSS):
                logits = self.model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
                loss = loss_fn(logits, b)
            with record_function(BACKWARD):
                loss.backward()
        with record_function(OPTIMIZER_STEP):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return sum(b["input_ids"].numel() for b in batches)

    def sft_step(self, batches: list[dict]) -> int:
        from safer_dist.train.losses import IGNORE_INDEX
        from safer_dist.train.sft_data import num_label_tokens

        n = sum(num_label_tokens(b) for b in batches)  # mean NLL over the step's labelled tokens

        def loss(logits, b):
            return F.cross_entropy(logits[0, :-1].float(), b["labels"][0, 1:], ignore_index=IGNORE_INDEX,
                                   reduction="sum") / n

        return self.step(batches, loss)

    def dpo_step(self, batches: list[dict], erpo) -> int:
        from safer_dist.train.losses import sequence_logprobs, step_dpo_loss

        n_pairs = sum(b["num_pairs"] for b in batches)

        def loss(logits, b):
            logp, _ = sequence_logprobs(logits, b["labels"], b["seq_ids"], 2 * b["num_pairs"])
            out, _ = step_dpo_loss(logp[0::2], logp[1::2], b["ref_chosen"].to(logp), b["ref_rejected"].to(logp),
                                   beta=erpo.beta, num_pairs_global=n_pairs, label_smoothing=erpo.label_smoothing)
            return out

        return self.step(batches, loss)


def run_trl(args, ws, model_dir, *, device, dtype, attn, pack_len) -> dict:
    from safer_dist.train.models import load_model

    model = load_model(model_dir, dtype=dtype, attn_implementation=attn, device=device)
    trainer, clock = trl_trainer(args, ws, pack_len, model=model, learning_rate=args.lr,
                                 bf16=dtype == torch.bfloat16, use_cpu=device == "cpu")
    window, record = trl_window(args, trainer, clock), new_record()

    def run():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tokens, seconds = window()  # its first optimizer step is untimed: the warm-up
        record["tokens"].append(tokens)
        if device == "cuda":
            record["peaks"].append(torch.cuda.max_memory_allocated())
        return tokens, seconds

    out = run_rows(TRL, {"sft": run}, {"sft": record}, args.repeats)
    trainer.accelerator.free_memory()
    return out


def run_plain(args, ws, model_dir, sections, pairs, erpo, *, device, dtype, attn) -> dict:
    from safer_dist.data.records import load_records
    from safer_dist.train.models import load_tokenizer
    from safer_dist.erpo.pairs import PairData
    from safer_dist.train.sft_data import SFTData

    train, data = sections["train"], sections["data"]
    plain = PlainLoop(model_dir, train, device=device, dtype=dtype, attn=attn)
    with h.Stopwatch() as sw:  # reference log-probs with the initial weights, as rollout workers do
        reference_logprobs(ws, pairs, model=plain.model.eval())
    plain.model.train()
    print(f"# reference log-probs of {len(pairs)} pairs: {sw.seconds:.1f} s (untimed)")
    # The learner's own batches: the same data classes, seeds and sizes (world size 1).
    tok = load_tokenizer(model_dir)
    sft = SFTData(load_records(data.train, "sft"), tok, seed=args.seed, max_seq_len=data.max_seq_len,
                  overlong=data.overlong, segment_dropout=data.segment_dropout)
    pair_data = PairData(pairs, tok, seed=args.seed)
    sizes = dict(global_batch_size=train.global_batch_size, rank=0, world_size=1,
                 micro_batch_size=train.micro_batch_size)
    num_steps = 1 + args.repeats * args.steps
    sft_batches = [plain.to_device([b for b in sft.micro_batches(s, **sizes)[0] if b is not None])
                   for s in range(num_steps)]
    dpo_batches = [plain.to_device(pair_data.micro_batches(s, **sizes)) for s in range(num_steps)]
    records = {kind: new_record() for kind in ROWS}
    out = run_rows(PLAIN, {
        "sft": measured(lambda s: plain.sft_step(sft_batches[s]), args.steps, device, records["sft"]),
        "dpo": measured(lambda s: plain.dpo_step(dpo_batches[s], erpo), args.steps, device, records["dpo"]),
    }, records, args.repeats)
    # the first timed step's batches again, as the learner's profiled step
    profile_rows(PLAIN, {"sft": lambda: plain.sft_step(sft_batches[1]),
                         "dpo": lambda: plain.dpo_step(dpo_batches[1], erpo)}, device, args.profile)
    return out


def run_learner(args, sections, pairs_path, *, device, label: str = LEARNER) -> dict:
    # The DPO row packs each prefix twice, as the plain loop's batches do, so both run the same
    # batches; the DPO-SHARED row packs it once (the learner's default), on the same pairs.
    learner = h.safer_learner(sections, args.seed, device=device)
    if not learner.share_prefix:
        print(f"# no DPO-SHARED row: attention {learner.attn_implementation} takes no shared prefix")
    num_trained = None
    if learner.adapters is not None:
        num_trained = learner.adapters.num_trainable
        print(f"# {label}: {learner.adapters.describe()}")

    records = {kind: new_record(num_trained) for kind in (LEARNER_ROWS if learner.share_prefix else ROWS)}

    def load(share: bool) -> None:
        learner.load_pairs(str(pairs_path), args.seed, share_prefix=share)

    def dpo_window(share: bool) -> h.Window:
        record = records["dpo-shared" if share else "dpo"]
        window = measured(lambda s: learner.dpo_step(s)["num_pair_tokens"], args.steps, device, record)

        def run():
            load(share)  # untimed: the window times its steps only
            return window()

        return run

    windows = {"sft": measured(lambda s: learner.sft_step(s)["num_tokens"], args.steps, device, records["sft"]),
               "dpo": dpo_window(False)}
    if learner.share_prefix:
        windows["dpo-shared"] = dpo_window(True)
    out = run_rows(label, windows, records, args.repeats)
    load(False)
    profile_rows(label, {"sft": lambda: learner.sft_step(1), "dpo": lambda: learner.dpo_step(1)}, device, args.profile)
    if learner.share_prefix:
        load(True)
        profile_rows(label, {"dpo-shared": lambda: learner.dpo_step(1)}, device, args.profile)
    learner.engine.destroy()
    return out


def contestant(name: str, kinds: tuple[str, ...], fn, *fn_args, **fn_kwargs) -> dict:
    """Run one contestant (its rows of ``kinds``); a CUDA out-of-memory error becomes their result."""
    try:
        return fn(*fn_args, **fn_kwargs)
    except torch.OutOfMemoryError as e:
        print(f"# {name}: out of memory ({str(e).splitlines()[0]})", flush=True)
        return {kind: "OOM" for kind in kinds}
    finally:
        free_memory()


def make_rows(results: dict, n_params: int, tflops: float | None) -> list[dict]:
    rows = []
    for label, res in results.items():
        for kind, r in res.items():
            row = {"row": f"{label} {kind.upper()}", "contestant": label, "kind": kind}
            if isinstance(r, str):
                rows.append({**row, "error": r})
                continue
            rate = h.median(r["rates"])
            rows.append({
                **row, "tokens_per_s": rate, "window_tokens_per_s": r["rates"], "window_tokens": r["tokens"],
                "mfu": mfu(n_params, rate, tflops * 1e12, r["num_trained"]) if tflops else None,
                "num_params_trained": r["num_trained"] if r["num_trained"] is not None else n_params,
                "peak_memory_gib": max(r["peaks"]) / 2**30 if r["peaks"] else None,
            })
    plain = {r["kind"]: r.get("tokens_per_s") for r in rows if r["contestant"] == PLAIN}
    for r in rows:
        base = plain.get(PLAIN_KIND.get(r["kind"], r["kind"]))
        r["vs_plain"] = r["tokens_per_s"] / base if r.get("tokens_per_s") and base else None
    return rows


def print_rows(rows: list[dict]) -> None:
    fmt = lambda x, spec, scale=1, unit="": "n/a" if x is None else format(scale * x, spec) + unit  # noqa: E731
    head = f"| {'row':<32s} | {'tokens/s':>10s} | {'MFU':>6s} | {'peak GiB':>8s} | {'vs plain':>8s} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['row']:<32s} | {r['error']:>10s} | {'':>6s} | {'':>8s} | {'':>8s} |")
            continue
        print(f"| {r['row']:<32s} | {r['tokens_per_s']:10.0f} | {fmt(r['mfu'], '.1f', 100, '%'):>6s} | "
              f"{fmt(r['peak_memory_gib'], '.1f'):>8s} | {fmt(r['vs_plain'], '.2f'):>8s} |")


def parse_args():
    p = h.parser(__doc__.split("\n")[0], repeats=3, steps=3, preset=None)
    p.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    p.add_argument("--micro-batch", type=int, default=128, help="traces (or pairs) per packed micro-batch")
    p.add_argument("--global-batch", type=int, default=None, help="per optimizer step (default: one micro-batch)")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora-rank", type=int, default=0, help="add the LoRA learner's rows with adapters of this rank "
                   "(0: no LoRA rows, so the default run takes the time it did)")
    p.add_argument("--num-sft", type=int, default=512, help="demo SFT traces")
    p.add_argument("--num-pairs", type=int, default=256)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device for MFU (TFLOP/s)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the rows (and the set-up) to OUT")
    p.add_argument("--profile", default=None, metavar="DIR", help="after the timed windows, profile one more step "
                   "of each safer and plain row into DIR (op tables, phases.json)")
    args = p.parse_args()
    h.apply_smoke(args, shape="smoke", micro_batch=4, num_sft=32, num_pairs=8)
    args.global_batch = args.global_batch or args.micro_batch
    if args.global_batch % args.micro_batch:
        p.error(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def write_json(path: str, args, rows: list[dict], **setup) -> None:
    Path(path).write_text(json.dumps({
        "command": " ".join(sys.argv), "machine": h.machine(), **setup,
        "args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows,
    }, indent=1) + "\n")


def main() -> None:
    args = parse_args()
    device = args.device
    # DeepSpeed picks its accelerator when first imported (the learner imports it later).
    assert "deepspeed" not in sys.modules
    os.environ["DS_ACCELERATOR"] = device
    h.set_threads(args.threads)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    h.header(f"one-device training: safer learner vs plain PyTorch vs TRL ({device})", args)

    from safer_dist.config import LoraSection
    from safer_dist.train.attention import resolve_attn_implementation
    from safer_dist.train.engine import resolve_dtype
    from safer_dist.train.models import load_tokenizer

    ws = h.workspace(args, num_sft=max(args.num_sft, args.num_pairs))
    try:
        dtype, attn = resolve_dtype("auto", device), resolve_attn_implementation("auto", device)
        model_dir = ws.root / f"model-{args.shape}"
        with h.Stopwatch() as sw:
            n_params = build_model_dir(SHAPES[args.shape], load_tokenizer(ws.model_dir), model_dir, device=device,
                                       dtype=dtype, seed=args.seed)
        tflops, tflops_source = peak_tflops(args, device)
        pack_len, lens = pack_length(ws, args.micro_batch)
        print(f"# model: {args.shape}, {n_params:,} parameters besides the input embedding, {dtype}, "
              f"attention {attn}; written in {sw.seconds:.1f} s")
        print(f"# peak: {tflops or 'n/a'} TFLOP/s ({tflops_source})")
        print(f"# data: {len(lens)} traces, mean {sum(lens) / len(lens):.0f} tokens; {args.micro_batch} traces or "
              f"pairs per micro-batch, {args.global_batch // args.micro_batch} per step; TRL rows of {pack_len} tokens")

        sections = h.learner_sections(args, model_dir, ws.sft_path, lr=args.lr)
        erpo = sections["dpo_loss"]
        pairs = make_pairs(ws.records, args.num_pairs)
        pairs_path = ws.root / "pairs.jsonl"
        kw = dict(device=device, dtype=dtype, attn=attn)
        results = {}
        # TRL first: accelerate would wrap its model in DDP once the learner's process group exists.
        results[TRL] = contestant(TRL, ("sft",), run_trl, args, ws, model_dir, pack_len=pack_len, **kw)
        # The plain loop fills in the pairs' reference log-probs, which the learner reads.
        results[PLAIN] = contestant(PLAIN, ROWS, run_plain, args, ws, model_dir, sections, pairs, erpo, **kw)
        pairs_path.write_text("".join(json.dumps(x) + "\n" for x in pairs))
        results[LEARNER] = contestant(LEARNER, LEARNER_ROWS, run_learner, args, sections, pairs_path, device=device)
        if args.lora_rank:
            lora = LoraSection(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
            results[LORA] = contestant(LORA, LEARNER_ROWS, run_learner, args,
                                       {**sections, "model": replace(sections["model"], lora=lora)}, pairs_path,
                                       device=device, label=LORA)

        rows = make_rows(results, n_params, tflops)
        print(f"\ntokens/s, {args.shape}, {device}, {args.steps} optimizer steps per window, median of "
              f"{args.repeats} windows")
        print_rows(rows)
        if device == "cpu":
            print("  peak GiB: CUDA memory only; not measured on CPU")
        if args.json:
            write_json(args.json, args, rows, device=device, shape=asdict(SHAPES[args.shape]) | {"name": args.shape},
                       non_embedding_params=n_params, peak_tflops=tflops, peak_source=tflops_source,
                       dtype=str(dtype), attention=attn)
        by = {r["row"]: r for r in rows}
        learner_sft, plain_sft = by[f"{LEARNER} SFT"], by[f"{PLAIN} SFT"]
        if "error" in learner_sft or "error" in plain_sft:
            sys.exit("no SFT ratio: a contestant ran out of memory")
        print(h.ratio_line(learner_sft["tokens_per_s"], plain_sft["tokens_per_s"],
                           "safer Learner.sft_step vs plain PyTorch SFT"))
        shared, unshared = by.get(f"{LEARNER} DPO-SHARED", {}), by[f"{LEARNER} DPO"]
        if shared.get("tokens_per_s") and unshared.get("tokens_per_s"):
            print(h.ratio_line(shared["tokens_per_s"], unshared["tokens_per_s"],
                               "safer Learner.dpo_step, prefix shared vs packed twice (same pairs)"))
    finally:
        ws.cleanup(keep=bool(args.workdir))


if __name__ == "__main__":
    main()
