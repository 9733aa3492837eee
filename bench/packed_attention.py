"""Packed-batch attention on CPU: ``sdpa`` (one call over the row with a dense block-diagonal
T x T mask, what transformers builds for packed position_ids) vs ``safer_segments`` (one causal
SDPA call per packed sequence, no mask; safer's CPU default).

Forward + backward of a random Llama of a preset shape (default: the tiny model, hidden 256,
4 layers) on packs of ``--seqs-per-pack`` sequences of ``--min-len``..``--max-len`` tokens.
Both contestants are the same weights and the same packs; the logits are checked to agree.

    .venv/bin/python bench/packed_attention.py                 # ~1 min on 2 cores
    .venv/bin/python bench/packed_attention.py --preset bench-20m --threads 2
"""

from __future__ import annotations

import _harness as h  # noqa: I001 - sets DS_ACCELERATOR etc. before torch/transformers imports

import copy
import random

import torch
import torch.nn.functional as F


def main() -> None:
    p = h.parser(__doc__.split("\n")[0], repeats=5, steps=3, preset="tiny")
    p.add_argument("--seqs-per-pack", type=int, default=8)
    p.add_argument("--min-len", type=int, default=150)
    p.add_argument("--max-len", type=int, default=250)
    args = p.parse_args()
    h.apply_smoke(args, seqs_per_pack=3, min_len=20, max_len=40)
    h.set_threads(args.threads)
    h.header("packed attention, CPU: sdpa vs safer_segments", args)

    from transformers import LlamaForCausalLM

    from safer_dist.train.attention_kernels import register_varlen_attention
    from safer_dist.train.models import PRESETS, _LLAMA_COMMON
    from transformers import LlamaConfig

    register_varlen_attention()
    vocab = 3000
    config = LlamaConfig(vocab_size=vocab, use_cache=False, **{**_LLAMA_COMMON, **PRESETS[args.preset]})
    models = {}
    for name in ("sdpa", "safer_segments"):
        c = copy.deepcopy(config)
        c._attn_implementation = name
        torch.manual_seed(args.seed)
        models[name] = LlamaForCausalLM(c).train()

    rng = random.Random(args.seed)

    def make_pack():
        lens = [rng.randint(args.min_len, args.max_len) for _ in range(args.seqs_per_pack)]
        ids = torch.randint(0, vocab, (1, sum(lens)), generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        pos = torch.tensor([[i for n in lens for i in range(n)]])
        return ids, pos

    packs = [make_pack() for _ in range(args.steps)]
    with torch.no_grad():
        a = models["sdpa"](input_ids=packs[0][0], position_ids=packs[0][1], use_cache=False).logits
        b = models["safer_segments"](input_ids=packs[0][0], position_ids=packs[0][1], use_cache=False).logits
    max_diff = float((a - b).abs().max())
    print(f"# max |logits(sdpa) - logits(safer_segments)| = {max_diff:.2e}")
    assert max_diff < 1e-4, max_diff

    def window(model):
        def run():
            tokens = 0
            with h.Stopwatch() as sw:
                for ids, pos in packs:
                    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
                    F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
                    model.zero_grad(set_to_none=True)
                    tokens += ids.numel()
            return tokens, sw.seconds
        return run

    for m in models.values():  # warm-up
        window(m)()
    rates = h.alternate({name: window(m) for name, m in models.items()}, args.repeats)
    h.print_table(
        f"forward+backward tokens/s, preset {args.preset}, packs of {args.seqs_per_pack} x "
        f"{args.min_len}-{args.max_len} tokens, {args.threads} thread(s)", "tokens/s", rates,
    )
    print(h.paired_line(rates, "safer_segments", "sdpa"))
    print(h.ratio_line(h.median(rates["safer_segments"]), h.median(rates["sdpa"]), "safer_segments vs sdpa"))


if __name__ == "__main__":
    main()
