"""Candidate-step sampling: safer's prefix-KV reuse vs Hugging Face ``generate(num_return_sequences=N)``.

ERPO samples N candidates of one step for many prefixes (prompt + the steps before it). safer
(``safer_dist.rollout.sampling.sample_candidates``) prefills each prefix once (packed, no padding),
stores its KV cache once for its N candidates (shared-prefix decode attention), and batches
continuously (a row that ends leaves, a waiting prefix joins); the peer is what a transformers
user writes: ``generate(..., num_return_sequences=N)`` on the same left-padded prefixes, which
encodes every prefix N times and keeps N copies of its cache. Both sample
(temperature ``--temperature``, top-p 1), stop a row at EOS or at the step's closing tag
(``stop_strings``; transformers' own ``StopStringCriteria`` for the peer), batch the same
number of rows (``--batch-rows`` = prefixes per batch x N), and run the same random Llama
(``--preset``, default bench-20m; or ``--shape``, a shape of bench/gpu.py such as
``tinyllama-1.1b``) with the KV cache on, loaded with SDPA attention: fp32 on CPU (the default
``--device``), bf16 on CUDA. The peer runs SDPA; safer's sampler runs its own attention
whatever the model's (``safer_segments`` for the packed prefill, shared-prefix for decode steps),
and on CPU runs the fp32 linear layers on weights reordered once per call for oneDNN
(``safer_dist.rollout.packed_linear``). The comparison is like for like: on CPU the peer's
``generate`` runs inside the same ``packed_linears`` context, so both contestants run the same
weights path, and the ratio line compares those two. Two more CPU contestants, the sampler on
``nn.Linear`` (``packed_weights=False``) and ``generate`` on ``nn.Linear``, give the same
comparison on the layers as loaded ("on nn.Linear" line).

The figure is candidate tokens/s: sampled tokens before EOS, up to and including the
closing tag, per second. A random model rarely writes the closing tag, so rows run to
``--max-new-tokens``; by default that is the mean length of the step in the demo traces, as a
trained model would stop there. Rows that all end together leave continuous batching nothing
to gain: this figure measures prefix reuse and the decode loop, not early exits. A window is
``--steps`` passes over the prefixes.

Work: the bench counts the token positions each contestant runs through the model (padding
included) and splits each window's time into prefill calls, decode steps and the rest (sampling,
stop checks, batching), from hooks on the model's forward.

Decode bound: a decode step reads every weight (all parameters but the input embedding, of
which it reads one row per token) and the KV cache of every row in flight, so decoding runs at
most at ``rows x HBM bandwidth / (weight bytes + rows x KV bytes per token x mean context)``
tokens/s, the mean context being the mean prefix plus half the new tokens. Rows in flight are
the batch's (``--batch-rows``, rounded down to whole prefixes); the bandwidth comes from
bench/gpu.py's table of GPUs by name, or ``--hbm-gbps`` (GB/s). Each contestant's tokens/s is
also printed as a fraction of that bound (n/a without a bandwidth, as on CPU). Prefill and
sampling are not in the bound, so no contestant reaches 1.

    .venv/bin/python bench/rollout.py                 # ~2.5 min on 2 cores
    .venv/bin/python bench/rollout.py --step answer --max-new-tokens 96
    python bench/rollout.py --device cuda --shape tinyllama-1.1b --prefixes 256 --n 8 --batch-rows 256
"""

from __future__ import annotations

import _harness as h  # noqa: I001 - sets DS_ACCELERATOR etc. before torch/transformers imports

import contextlib
import statistics
import time

import torch

from gpu import SHAPES, build_model_dir, hbm_gbps, synchronize, write_json
from safer_dist.rollout.packed_linear import packed_linears


def prefixes_for(ws, tok, step: str, num: int) -> tuple[list[list[int]], float]:
    """Token ids of ``num`` prefixes before ``step``, and the mean token length of that step."""
    from safer_dist.reasoning.exante import STEPS, step_texts
    from safer_dist.train.sft_data import encode_prompt

    k = STEPS.index(step)
    out, lens = [], []
    for r in (ws.records[i] for i in range(min(num, len(ws.records)))):
        steps = step_texts(r["response"])
        prefix = "".join(steps[:k])
        out.append(encode_prompt(tok, r["prompt"]) + (tok.encode(prefix, add_special_tokens=False) if prefix else []))
        lens.append(len(tok.encode(steps[k], add_special_tokens=False)))
    return out, statistics.mean(lens)


def _kept_tokens(rows: list[list[int]], tok, stops: list[str]) -> int:
    """Tokens of each sampled row before EOS, up to and including the first stop string
    (what ``sample_candidates`` reports as ``num_tokens``)."""
    total = 0
    for row in rows:
        n = len(row)
        if tok.eos_token_id in row:
            n = row.index(tok.eos_token_id)
        text = ""
        for i, t in enumerate(row[:n]):  # first token whose text completes a stop string
            text += tok.decode([t], skip_special_tokens=False)
            if any(s in text for s in stops):
                n = i + 1
                break
        total += n
    return total


def _safer_tokens(c: dict, max_new: int) -> int:
    """A candidate's sampled tokens. A row that did not stop ran to the limit (exact); for a
    row that stopped, ``num_tokens`` re-encodes the kept text, which for a random model's
    byte soup can exceed what was sampled, so it is capped at the limit."""
    return min(c["num_tokens"], max_new) if c["stopped"] else max_new


def weight_bytes_per_step(model) -> int:
    """Bytes of the parameters one decode step reads: all but the input embedding (a lookup
    reads one row per token), unless it is tied to the LM head, which reads it whole."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes of one token: keys and values of every layer's KV heads, in the model's dtype."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize


def decode_bound(weight_bytes: int, kv_per_token: int, rows: int, mean_context: float, gbps: float) -> float:
    """Tokens/s of ``rows`` rows decoding at ``gbps`` GB/s when each step reads the weights once
    and each row's KV cache of ``mean_context`` tokens."""
    return rows * gbps * 1e9 / (weight_bytes + rows * kv_per_token * mean_context)


class ForwardLedger:
    """Hooks on a model's forward that, inside :meth:`window`, add up the token positions it runs
    (``input_ids.numel()``, padding included) and the seconds its calls take, split into prefill
    calls (more than one position per row) and decode calls (one per row). On CUDA each call is
    timed between two synchronizations (both samplers synchronize every step anyway)."""

    def __init__(self, model, device: str):
        self.device, self.record, self._start = device, None, None
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, _module, _args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if self.record is not None and ids is not None:
            synchronize(self.device)
            self._start = (time.perf_counter(), "decode" if ids.shape[1] == 1 else "prefill", ids.numel())

    def _after(self, _module, _args, _kwargs, _output) -> None:
        if self.record is not None and self._start is not None:
            synchronize(self.device)
            start, kind, positions = self._start
            self.record[f"{kind}_s"] += time.perf_counter() - start
            self.record[f"{kind}_calls"] += 1
            self.record["positions"] += positions
            self._start = None

    @contextlib.contextmanager
    def window(self):
        self.record = dict.fromkeys(("positions", "prefill_s", "prefill_calls", "decode_s", "decode_calls"), 0)
        try:
            yield self.record
        finally:
            self.record = None

    @staticmethod
    def describe(w: dict) -> str:
        """One line from a window's record (or the mean of several, with ``window_s``)."""
        step_ms = 1e3 * w["decode_s"] / w["decode_calls"] if w["decode_calls"] else 0.0
        rest = w["window_s"] - w["prefill_s"] - w["decode_s"]
        return (f"{w['window_s']:.2f} s = prefill {w['prefill_s']:.2f} s ({w['prefill_calls']:.0f} calls) + decode "
                f"{w['decode_s']:.2f} s ({w['decode_calls']:.0f} steps, {step_ms:.1f} ms each) + outside the model "
                f"{rest:.2f} s")


def load_contestant_model(args, ws):
    """The model both contestants sample from: ``--shape`` built at random (bench/gpu.py), else
    the workspace's ``--preset``; fp32 on CPU, bf16 on CUDA; SDPA attention, as generate uses."""
    from safer_dist.train.engine import resolve_dtype
    from safer_dist.train.models import load_model, load_tokenizer

    dtype, model_dir = resolve_dtype("auto", args.device), ws.model_dir
    if args.shape:
        model_dir = ws.root / f"model-{args.shape}"
        build_model_dir(SHAPES[args.shape], load_tokenizer(ws.model_dir), model_dir, device=args.device,
                        dtype=dtype, seed=args.seed)
    return load_model(model_dir, dtype=dtype, attn_implementation="sdpa", device=args.device).eval()


def main() -> None:
    p = h.parser(__doc__.split("\n")[0], repeats=5, steps=1)
    p.add_argument("--step", default="rules", choices=("assessment", "rules", "calibration", "answer"))
    p.add_argument("--prefixes", type=int, default=32, help="prefixes sampled per window")
    p.add_argument("--n", type=int, default=4, help="candidates per prefix (erpo.num_candidates)")
    p.add_argument("--batch-rows", type=int, default=64, help="rows (prefixes x n) per generate call")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the step's mean length in the demo traces")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="a random Llama of this bench/gpu.py shape instead of --preset (the 3k tokenizer is kept)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth (GB/s) for the decode bound "
                   "(default: from the GPU's name)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the rates and the bound's terms to OUT")
    args = p.parse_args()
    h.apply_smoke(args, prefixes=4, n=2, batch_rows=4, max_new_tokens=4)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.shape:
        args.preset = "test"  # the workspace's model gives only the tokenizer
    h.set_threads(args.threads)
    h.header("candidate sampling: prefix KV reuse vs generate(num_return_sequences=N)", args)

    from safer_dist.reasoning.exante import STEP_CLOSE
    from safer_dist.train.models import load_tokenizer
    from safer_dist.rollout.sampling import sample_candidates

    ws = h.workspace(args, num_sft=max(64, args.prefixes))
    try:
        tok = load_tokenizer(ws.model_dir)
        model = load_contestant_model(args, ws)
        device = args.device
        prefixes, mean_step = prefixes_for(ws, tok, args.step, args.prefixes)
        max_new = args.max_new_tokens or round(mean_step)
        stops = [STEP_CLOSE[args.step]] if STEP_CLOSE[args.step] else []
        lens = [len(x) for x in prefixes]
        print(f"# model: {args.shape or 'preset ' + args.preset}, {model.dtype}, {device}"
              + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
        print(f"# {len(prefixes)} prefixes before step {args.step!r}: {min(lens)}-{max(lens)} tokens "
              f"(mean {statistics.mean(lens):.0f}); {args.n} candidates each; max_new_tokens {max_new} "
              f"(the step's mean length {mean_step:.1f}); {args.batch_rows} rows per batch; "
              f"attention {model.config._attn_implementation}")
        per_batch = max(1, args.batch_rows // args.n)
        pad = tok.pad_token_id
        # Work: token positions each contestant runs through the model (padding included) and the
        # time its forward calls take, prefill (several positions per row) and decode (one) apart,
        # from hooks on the model's forward, per window. Both run the same fp32/bf16 matrix
        # products per position, so the positions' ratio bounds the speed-up the sampler can show.
        ledger = ForwardLedger(model, device)
        work: dict[str, list[dict]] = {}

        def counted(key, window):
            def run():
                with ledger.window() as record:
                    units, seconds = window()
                work.setdefault(key, []).append({**record, "window_s": seconds})
                return units, seconds
            return run

        def safer_window(packed_weights: bool = True):
            def run():
                torch.set_num_threads(args.threads)
                outs = []
                with h.Stopwatch() as sw:
                    for _ in range(args.steps):
                        outs += sample_candidates(model, tok, prefixes, args.n, max_new_tokens=max_new,
                                                  stop_strings=stops or None, temperature=args.temperature, top_p=1.0,
                                                  seed=args.seed, batch_rows=args.batch_rows,
                                                  packed_weights=packed_weights)
                    synchronize(device)
                assert len(outs) == args.steps * len(prefixes) and all(len(c) == args.n for c in outs)
                return sum(_safer_tokens(c, max_new) for cs in outs for c in cs), sw.seconds
            return run

        def hf_window(packed_weights: bool = True):
            return lambda: hf_run(packed_weights)

        @torch.no_grad()
        def hf_run(packed_weights: bool):
            torch.set_num_threads(args.threads)
            torch.manual_seed(args.seed)
            rows = []
            weights = packed_linears(model, rows_hint=args.batch_rows) if packed_weights else contextlib.nullcontext()
            with weights, h.Stopwatch() as sw:
                for start in [s for _ in range(args.steps) for s in range(0, len(prefixes), per_batch)]:
                    chunk = prefixes[start : start + per_batch]
                    width = max(len(x) for x in chunk)
                    ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
                    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
                    gen = model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=True,
                        temperature=args.temperature, top_p=1.0, top_k=None, num_return_sequences=args.n,
                        eos_token_id=tok.eos_token_id, pad_token_id=pad, use_cache=True,
                        stop_strings=stops or None, tokenizer=tok,
                    )
                    rows += gen[:, width:].tolist()
                synchronize(device)
            return _kept_tokens(rows, tok, stops), sw.seconds

        windows = {"safer": safer_window(), "hf": hf_window()}
        if device == "cpu":  # the reordered weights are a CPU path: on CUDA the pairs would be the same
            windows["nn_linear"] = safer_window(packed_weights=False)
            windows["hf_linear"] = hf_window(packed_weights=False)
        for window in windows.values():  # warm-up
            window()
        names = {"safer": "safer sample_candidates (prefix reuse, continuous)",
                 "nn_linear": "safer sample_candidates on nn.Linear",
                 "hf": f"HF generate(num_return_sequences={args.n})",
                 "hf_linear": f"HF generate(num_return_sequences={args.n}) on nn.Linear"}
        rates = h.alternate({names[key]: counted(key, window) for key, window in windows.items()}, args.repeats)
        mean_work = {key: {k: statistics.mean(w[k] for w in ws) for k in ws[0]} for key, ws in work.items()}
        assert mean_work.get("nn_linear", mean_work["safer"])["positions"] == mean_work["safer"]["positions"]
        assert mean_work.get("hf_linear", mean_work["hf"])["positions"] == mean_work["hf"]["positions"]
        work_ratio = mean_work["hf"]["positions"] / mean_work["safer"]["positions"]
        print(f"positions through the model per window: safer {mean_work['safer']['positions']:.0f}, "
              f"HF {mean_work['hf']['positions']:.0f} (HF / safer = {work_ratio:.2f}: the speed-up if a position "
              "cost both the same)")
        for key, name in (("safer", "safer"), ("nn_linear", "safer on nn.Linear"), ("hf", "HF"),
                          ("hf_linear", "HF on nn.Linear")):
            if key not in mean_work:
                continue
            print(f"time per window ({name}, mean): {ledger.describe(mean_work[key])}")
        # The decode bound, for the rows a batch holds (whole prefixes, at most all of them).
        rows_in_flight = min(per_batch, len(prefixes)) * args.n
        weights, kv_token = weight_bytes_per_step(model), kv_bytes_per_token(model)
        mean_context = statistics.mean(lens) + max_new / 2
        gbps, gbps_source = hbm_gbps(args.hbm_gbps, device)
        bound = decode_bound(weights, kv_token, rows_in_flight, mean_context, gbps) if gbps else None
        fraction = {name: h.median(r) / bound if bound else None for name, r in rates.items()}
        print(f"decode bound: {f'{bound:.0f} tokens/s' if bound else 'n/a'} = {rows_in_flight} rows x "
              f"{gbps or 'n/a'} GB/s ({gbps_source}) / ({weights / 1e9:.3f} GB weights + {rows_in_flight} x "
              f"{kv_token} B KV per token x {mean_context:.1f} tokens) per step")
        h.print_table(f"candidate tokens/s, {args.shape or 'preset ' + args.preset}, step {args.step}, {device}, "
                      f"{args.threads} thread(s)", "tokens/s", rates,
                      {name: f"{f:.3f} of the decode bound" if f is not None else "n/a of the decode bound"
                       for name, f in fraction.items()})
        if args.json:
            write_json(args.json, args, [
                {"contestant": name, "tokens_per_s": h.median(r), "window_tokens_per_s": r,
                 "fraction_of_bound": fraction[name]} for name, r in rates.items()
            ], device=device, model=args.shape or args.preset, dtype=str(model.dtype), max_new_tokens=max_new,
                mean_prefix_tokens=statistics.mean(lens), prefix_tokens=lens, rows_in_flight=rows_in_flight,
                weight_bytes=weights, kv_bytes_per_token=kv_token, mean_context_tokens=mean_context, hbm_gbps=gbps,
                hbm_source=gbps_source, bound_tokens_per_s=bound,
                positions_per_window={key: w["positions"] for key, w in mean_work.items()},
                forward_time_per_window=mean_work)
        if "nn_linear" in windows:
            print("on nn.Linear: " + h.paired_line(rates, names["nn_linear"], names["hf_linear"]))
        print(h.paired_line(rates, names["safer"], names["hf"]))
        print(h.ratio_line(h.median(rates[names["safer"]]), h.median(rates[names["hf"]])))
    finally:
        ws.cleanup(keep=bool(args.workdir))


if __name__ == "__main__":
    main()
