"""SFT examples: tokenization with an assistant-only loss mask, a deterministic global batch
order, and padding-free packing.

A prompt (a string or a message list, :mod:`safer_dist.data.chat`) is rendered with the
tokenizer's chat template by :func:`encode_prompt`, the one tokenization shared by SFT, ERPO
sampling and pair training, reference log-probs and evaluation.

Data position is a pure function of the optimizer step: step ``s`` covers positions
``[s*B, (s+1)*B)`` of an endless stream of epochs, each epoch a permutation of the data
seeded by ``(seed, epoch)``. A resumed run therefore continues on exactly the examples an
uninterrupted run would have seen, and every rank derives the same global batch without
talking to the others.

Packed micro-batch (what the learner feeds the model, ``use_cache=False``)::

    input_ids    [1, T]   sequences concatenated, no padding
    position_ids [1, T]   restart at 0 at each sequence start (marks the boundaries)
    labels       [1, T]   token id on assistant tokens (reasoning + answer + EOS), else -100
    seq_ids      [1, T]   index of the sequence each token belongs to

With ``share_prefix`` (``train.share_prefix``) the examples of a micro-batch that begin with the
same prompt tokens (a system prompt) encode them once, as a tree row (:func:`pack`).
"""

from __future__ import annotations

import random
import re
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from safer_dist.data.chat import Prompt, as_messages
from safer_dist.runtime.log import get_logger
from safer_dist.train.losses import IGNORE_INDEX

log = get_logger("sft_data")

_WORD = re.compile(r"\S{2,}")
# A micro-batch's common prompt prefix is packed once (``train.share_prefix``) when it is at
# least this long (the demo tokenizer's two-token turn header is not worth a tree).
MIN_SHARED_PREFIX = 16


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def split_segments(text: str, p: float, rng: random.Random) -> list[str]:
    """Split some words of ``text`` at a random interior point (probability ``p`` each).

    The pieces concatenate back to ``text``. Encoding the pieces separately makes the
    tokenizer emit the sub-word tokens it would otherwise merge away, so rare words at
    evaluation time map to tokens the model has seen (a deterministic BPE-dropout).
    """
    if p <= 0:
        return [text]
    pieces, last = [], 0
    for m in _WORD.finditer(text):
        if rng.random() < p:
            cut = rng.randint(m.start() + 1, m.end() - 1)
            pieces.append(text[last:cut])
            last = cut
    pieces.append(text[last:])
    return [x for x in pieces if x]


# One sentinel per message; NUL never occurs in a chat template's own text.
_SENTINEL = "\u0000SAFER{}\u0000"


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The chat-formatted prompt (with the generation prompt) as ``(text, is_content)`` segments.

    The template is rendered with a sentinel in place of every message's content; the text
    around the sentinels is the template's frame (role headers, separators, a default system
    prompt). Segments alternate frame and content when that frame with the real contents put
    back is exactly the template's rendering of ``messages``. A template that changes contents
    (a Llama-3 style ``| trim`` on content with outer whitespace, one that drops a system turn)
    gives one frame segment: the rendering itself, tokenized whole and never split.
    """
    render = lambda msgs: tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)  # noqa: E731
    marks = [_SENTINEL.format(i) for i in range(len(messages))]
    rest = render([{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)])
    real = render(messages)
    segments: list[tuple[str, bool]] = []
    for m, mark in zip(messages, marks):
        before, found, rest = rest.partition(mark)
        if not found:
            return [(real, False)]
        segments += [(before, False), (m["content"], True)]
    segments.append((rest, False))
    if "".join(text for text, _ in segments) != real:
        return [(real, False)]
    return segments


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def encode_prompt(tokenizer, prompt: Prompt, dropout: float = 0.0, rng: random.Random | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's header.

    ``prompt`` is a string (one user turn) or a message list (:mod:`safer_dist.data.chat`); the
    tokenizer's chat template renders it. The template's frame and each message's content are
    tokenized separately (so ``dropout`` can split content words, see :func:`split_segments`),
    which for byte-level BPE templates gives the tokens of the whole rendering.
    """
    rng = rng or random.Random(0)
    ids: list[int] = []
    for text, is_content in _chat_segments(tokenizer, as_messages(prompt)):
        if not is_content:
            ids += _encode(tokenizer, text)
            continue
        for piece in split_segments(text, dropout, rng):
            ids += _encode(tokenizer, piece)
    return ids


def encode_context(tokenizer, prompt: Prompt, prefix_text: str = "") -> list[int]:
    """Token ids of the chat-formatted prompt followed by a partial response ``prefix_text``:
    the context a rollout worker samples a step from and a learner scores it in."""
    ids = encode_prompt(tokenizer, prompt)
    return ids + tokenizer.encode(prefix_text, add_special_tokens=False) if prefix_text else ids


def encode_response(tokenizer, response: str) -> list[int]:
    """Token ids of an assistant response, ending with EOS (the end of turn)."""
    return _encode(tokenizer, response) + [tokenizer.eos_token_id]


def end_of_turn_mismatch(tokenizer) -> str | None:
    """What the chat template writes after an assistant turn's content, when that does not start
    with the tokenizer's EOS (the end of turn safer trains on and stops generation at); None
    when it does, or when the template cannot render a user + assistant exchange."""
    mark = _SENTINEL.format(1)
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL.format(0)}, {"role": "assistant", "content": mark}],
            tokenize=False,
        )
    except Exception:  # a template may refuse this exchange (e.g. require a system turn)
        return None
    after = text.partition(mark)[2]
    return None if not after or after.startswith(tokenizer.eos_token or "\u0000") else after


def encode_example(
    tokenizer, prompt: Prompt, response: str, *, max_seq_len: int, overlong: str,
    dropout: float = 0.0, rng: random.Random | None = None,
) -> Encoded | None:
    """Tokenize one chat; loss only on the response and its EOS (the end of the assistant
    turn). None when dropped for length."""
    p = encode_prompt(tokenizer, prompt, dropout, rng)
    r = encode_response(tokenizer, response)
    ids = p + r
    labels = [IGNORE_INDEX] * len(p) + r
    if len(ids) <= max_seq_len:
        return Encoded(ids, labels)
    if overlong == "drop" or len(p) >= max_seq_len:
        return None
    return Encoded(ids[:max_seq_len], labels[:max_seq_len], truncated=True)


def shared_prompt_length(examples: list[Encoded]) -> int:
    """Leading tokens that every example has, none of them labelled: the part of their prompts
    (a system prompt, the chat template's frame) that :func:`pack` can encode once."""
    first = examples[0].input_ids
    n = min(next((t for t, label in enumerate(ex.labels) if label != IGNORE_INDEX), len(ex.labels))
            for ex in examples)
    for ex in examples[1:]:
        n = next((t for t in range(n) if ex.input_ids[t] != first[t]), n)
    return n


def pack(examples: list[Encoded], *, share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Concatenate examples into one padding-free row (see the module docstring).

    ``share_prefix``: when the examples start with the same :data:`MIN_SHARED_PREFIX` or more
    unlabelled tokens (:func:`shared_prompt_length`), the row is a tree
    (:mod:`safer_dist.train.tree_attention`): the first example whole, then each other one from
    the shared prefix's last token on, at its own positions, attending to the first example's
    copy of the prefix. Every labelled token's log-prob and gradient are those of the plain
    packing, in exact arithmetic. Only for attention that takes trees
    (:func:`safer_dist.train.attention.tree_packing_unsupported`).
    """
    shared = shared_prompt_length(examples) if share_prefix and len(examples) > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    ids, pos, labels, seq = [], [], [], []
    for i, ex in enumerate(examples):
        start = shared - 1 if i and shared else 0  # a branch repeats the prefix's last token
        n = len(ex.input_ids)
        ids += ex.input_ids[start:]
        pos += range(start, n)
        # The first token of a sequence (or branch) is never predicted from the previous one.
        labels += [IGNORE_INDEX] + ex.labels[start + 1:]
        seq += [i] * (n - start)
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(ids), "position_ids": as_row(pos), "labels": as_row(labels), "seq_ids": as_row(seq)}


def num_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Labelled (loss-bearing) next-token targets in a packed batch."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def split_valid(records, fraction: float, seed: int) -> tuple[list, list]:
    """(train, valid): a held-out ``fraction`` of ``records`` (at least one, at most all but
    one), chosen by ``seed`` alone, so every rank and every resumed run picks the same
    examples. Both keep the records' order. ``fraction`` 0: (all records, [])."""
    records = list(records)
    if fraction <= 0:
        return records, []
    n = len(records)
    k = min(max(1, round(n * fraction)), n - 1)
    if k < 1:
        raise ValueError(f"data.valid_fraction={fraction}: the training set has {n} example(s), too few to split")
    held = set(random.Random(f"valid-{seed}").sample(range(n), k))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def eval_micro_batches(
    examples: list[Encoded | None], *, rank: int, world_size: int, micro_batch_size: int, share_prefix: bool = False,
) -> list[dict[str, torch.Tensor] | None]:
    """This rank's packed micro-batches of a validation set (None where a micro-batch has no
    example left). Ranks take contiguous shards of ``ceil(n / world_size)`` examples; every rank
    gets the same number of micro-batches (the largest shard's), so that collective forward
    passes (ZeRO-3) stay in step. Examples dropped for length (None) are skipped."""
    per_rank = -(-len(examples) // world_size)
    shard = examples[rank * per_rank : (rank + 1) * per_rank]
    num_batches = -(-per_rank // micro_batch_size)
    out = []
    for i in range(num_batches):
        part = [ex for ex in shard[i * micro_batch_size : (i + 1) * micro_batch_size] if ex is not None]
        out.append(pack(part, share_prefix=share_prefix) if part else None)
    return out


class SFTData:
    """The tokenized view of an SFT data set that each learner rank builds for itself.

    ``records`` is a sequence of mappings with ``prompt`` (a string or a message list) and
    ``response``.
    """

    def __init__(self, records, tokenizer, *, seed: int, max_seq_len: int, overlong: str, segment_dropout: float,
                 share_prefix: bool = False):
        self.prompts = [r["prompt"] for r in records]
        self.responses = [r["response"] for r in records]
        if not self.prompts:
            raise ValueError("SFT data set is empty")
        suffix = end_of_turn_mismatch(tokenizer)
        if suffix is not None:
            log.warning("the chat template ends an assistant turn with %r, but the tokenizer's eos_token is %r: "
                        "responses are trained to end with %r (set eos_token to the end-of-turn token)",
                        suffix, tokenizer.eos_token, tokenizer.eos_token)
        self.tokenizer = tokenizer
        self.seed = seed
        self.max_seq_len = max_seq_len
        self.overlong = overlong
        self.segment_dropout = segment_dropout
        self.share_prefix = share_prefix
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self)))
            random.Random(f"order-{self.seed}-{epoch}").shuffle(order)
            self._perms = {epoch: order}  # keep one epoch: the stream only moves forward
        return self._perms[epoch]

    def global_batch(self, step: int, global_batch_size: int) -> list[tuple[int, int]]:
        """(epoch, example index) of every example of optimizer step ``step`` (0-based)."""
        n = len(self)
        out = []
        for pos in range(step * global_batch_size, (step + 1) * global_batch_size):
            epoch = pos // n
            out.append((epoch, self._perm(epoch)[pos % n]))
        return out

    def encode(self, epoch: int, index: int) -> Encoded | None:
        rng = random.Random(f"segments-{self.seed}-{epoch}-{index}")
        return encode_example(
            self.tokenizer, self.prompts[index], self.responses[index],
            max_seq_len=self.max_seq_len, overlong=self.overlong,
            dropout=self.segment_dropout, rng=rng,
        )

    def micro_batches(
        self, step: int, *, global_batch_size: int, rank: int, world_size: int, micro_batch_size: int
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, int]]:
        """This rank's packed micro-batches for ``step`` and counts (truncated, dropped).

        The global batch is split into contiguous per-rank shards, each into contiguous
        micro-batches of ``micro_batch_size`` examples (fewer if examples were dropped).
        """
        items = self.global_batch(step, global_batch_size)
        per_rank = global_batch_size // world_size
        shard = items[rank * per_rank : (rank + 1) * per_rank]
        counts = {"truncated": 0, "dropped": 0}
        batches = []
        for start in range(0, len(shard), micro_batch_size):
            encoded = []
            for epoch, index in shard[start : start + micro_batch_size]:
                ex = self.encode(epoch, index)
                if ex is None:
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += ex.truncated
                encoded.append(ex)
            batches.append(pack(encoded, share_prefix=self.share_prefix) if encoded else None)
        return batches, counts


class StepPrefetcher:
    """``fn(step)`` for consecutive steps, the next one computed on a background thread while
    the caller trains on this one (tokenizing and packing off the step's critical path).

    ``get(step)`` returns ``fn(step)``: the prefetched result when ``step`` is the one that was
    scheduled, else computed now; then ``fn(step + 1)`` is scheduled. At most one computation
    runs at a time and results do not depend on timing, so training is the same with and
    without it. ``fn`` must not touch global RNG state (SFTData seeds its own generators).
    """

    def __init__(self, fn, enabled: bool = True):
        self.fn, self.enabled = fn, enabled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safer-prefetch") if enabled else None
        self._next: tuple[int, Future] | None = None

    def get(self, step: int):
        if self._next is not None and self._next[0] == step:
            out = self._next[1].result()
        else:
            if self._next is not None and not self._next[1].cancel():
                wait([self._next[1]])  # never two computations at once
            out = self.fn(step)
        if self._pool is not None:
            self._next = (step + 1, self._pool.submit(self.fn, step + 1))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._next = None
