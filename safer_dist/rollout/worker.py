"""Rollout workers: an inference copy of the policy on a Ray actor.

A ``RolloutWorker`` loads a Hugging Face directory and generates batched, left-padded,
with the same prompt tokenization as training (:func:`safer_dist.train.sft_data.encode_prompt`);
a prompt is a string or a message list (:mod:`safer_dist.data.chat`). The driver talks to M of
them through ``RolloutGroup`` (:mod:`safer_dist.cluster.rollout`).
"""

from __future__ import annotations

import time

import torch

from safer_dist.config import ModelSection, RolloutSection
from safer_dist.data.chat import Prompt
from safer_dist.erpo.pairs import step_sequence
from safer_dist.rollout.draw import Seed
from safer_dist.rollout.sampling import continuation_logprobs, sample_candidates, sample_token_ids
from safer_dist.train.engine import resolve_device, resolve_dtype
from safer_dist.train.models import load_model, load_tokenizer
from safer_dist.train.sft_data import encode_context, encode_prompt
from safer_dist.runtime.log import get_logger, quiet_libraries
from safer_dist.weights.ends import WorkerEnd
from safer_dist.weights.layout import Member

log = get_logger("rollout")


class RolloutFailure(RuntimeError):
    """A rollout worker kept dying, or came back without the weights the others hold."""


class RolloutWorker:
    # Ranks the model is sharded over (a rank of a tensor-parallel worker sets its own,
    # safer_dist/rollout/tensor_parallel.py).
    tensor_parallel = 1

    def __init__(self, model: ModelSection, rollout: RolloutSection, *, path: str | None = None, device: str = "auto",
                 share_gpu: bool = False, head: str = "causal_lm"):
        quiet_libraries()
        self.cfg = rollout
        self.device = resolve_device(device)
        if self.device == "cpu":
            torch.set_num_threads(rollout.cpus_per_worker)
        path = path or model.path
        self.tokenizer = load_tokenizer(path, trust_remote_code=model.trust_remote_code)
        self.model = load_model(
            path, dtype=resolve_dtype(model.dtype, self.device), attn_implementation=model.attn_implementation,
            device=self.device, trust_remote_code=model.trust_remote_code, tensor_parallel=self.tensor_parallel,
            head=head,
        )
        self.model.eval()
        self.path = path
        self.version = 0
        self.sync = WorkerEnd(model, self.device)  # this worker's end of the weight sync
        # Colocated with a learner on one GPU: the KV cache and scoring buffers go back to the GPU
        # after every call (torch's allocator would keep them cached), so the learner can train.
        self.share_gpu = share_gpu and self.device == "cuda"

    def _release(self) -> None:
        if self.share_gpu:
            torch.cuda.empty_cache()

    def weights_version(self) -> int:
        """Version of the weights held: 0 as loaded from ``path``, then what the last sync sent."""
        return self.version

    @torch.no_grad()
    def generate(
        self, prompts: list[Prompt], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
        batch_size: int = 32, seed: int = 0,
    ) -> list[dict]:
        """Complete each chat prompt; returns [{text, num_tokens, latency_s}] in input order.

        Temperature 0 is ``model.generate``'s greedy decoding. Above 0 a prompt's answer is drawn
        as an ERPO candidate is (:func:`safer_dist.rollout.sampling.sample_token_ids`, one stream
        per prompt keyed by ``seed`` and its token ids), so it depends on (seed, prompt) only: not
        on the other prompts of the call or how a ``RolloutGroup`` shared them over workers."""
        tok = self.tokenizer
        encoded = [encode_prompt(tok, p) for p in prompts]
        if temperature > 0:
            return self._sample_answers(encoded, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, batch_size=batch_size, seed=seed)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[dict | None] = [None] * len(prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            t0 = time.perf_counter()
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens,
                do_sample=False, temperature=None, top_p=None,
                top_k=None, eos_token_id=tok.eos_token_id, pad_token_id=pad, use_cache=True,
            )
            latency = (time.perf_counter() - t0) / len(idx)
            for row, i in enumerate(idx):
                out[i] = self._answer(gen[row, width:].tolist(), latency)
        self._release()
        return out  # type: ignore[return-value]

    def _sample_answers(self, encoded: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                        batch_size: int, seed: int) -> list[dict]:
        """One sampled answer per encoded prompt, from the ERPO sampler's per-row streams."""
        t0 = time.perf_counter()
        rows = sample_token_ids(self.model, self.tokenizer, encoded, 1, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed, batch_rows=batch_size)
        latency = (time.perf_counter() - t0) / max(len(encoded), 1)
        self._release()
        return [self._answer(r[0], latency) for r in rows]

    def _answer(self, new: list[int], latency: float) -> dict:
        """An answer's record from its generated ids: cut at the first EOS, special tokens dropped."""
        eos = self.tokenizer.eos_token_id
        if eos in new:
            new = new[: new.index(eos)]
        return {"text": self.tokenizer.decode(new, skip_special_tokens=True), "num_tokens": len(new), "latency_s": latency}


    @torch.no_grad()
    def classify(self, items: list[Prompt], *, batch_size: int = 32) -> list[str]:
        """The label (``config.id2label``) a sequence-classification model (``head="sequence"``)
        gives each item: a string as it is, a message list rendered by the tokenizer's chat
        template (without a generation prompt), or its contents joined by blank lines when the
        tokenizer has none. Batches are right-padded; the model pools the last non-pad token."""
        tok, cfg = self.tokenizer, self.model.config
        if cfg.pad_token_id is None:  # the pooling finds each row's last token by the pad id
            cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        texts = [x if isinstance(x, str) else tok.apply_chat_template(x, tokenize=False) if tok.chat_template
                 else "\n\n".join(m["content"] for m in x) for x in items]
        labels: list[str] = []
        for start in range(0, len(texts), batch_size):
            rows = [tok.encode(t, add_special_tokens=False) for t in texts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            labels += [cfg.id2label[int(k)] for k in logits.argmax(-1).tolist()]
        self._release()
        return labels

    # -- ERPO ------------------------------------------------------------------------------
    def sample(
        self, items: list[tuple[Prompt, str]], *, n: int, stop_strings: list[str] | None, max_new_tokens: int,
        temperature: float, top_p: float = 1.0, seed: Seed = 0,
    ) -> list[list[dict]]:
        """``n`` continuations of each (prompt, response prefix), one prefill per prefix."""
        contexts = [encode_context(self.tokenizer, p, x) for p, x in items]
        out = sample_candidates(
            self.model, self.tokenizer, contexts, n, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
            temperature=temperature, top_p=top_p, seed=seed, batch_rows=self.cfg.batch_size,
        )
        self._release()
        return out

    def logprobs(self, items: list[tuple[Prompt, str, str, bool]], share_prefix: bool = True) -> list[tuple[float, int]]:
        """log p(continuation | prompt, prefix) under the weights held, for (prompt, prefix,
        continuation, ends_with_eos) items; tokenized exactly as the learners do. Items with the
        same prompt and prefix encode it once when ``share_prefix`` and the attention allows."""
        pairs = [step_sequence(self.tokenizer, p, x, c, eos) for p, x, c, eos in items]
        out = continuation_logprobs(self.model, pairs, share_prefix=share_prefix)
        self._release()
        return out

    def node_ip(self) -> str:
        import ray  # heavy: imported by the calls that use it (tests and bench import this module)

        return ray.util.get_node_ip_address()

    def init_sync(self, host: str, port: int, member: Member) -> None:
        """Open this worker's end of the weight sync as ``member``, leaving any opened before (the
        channel is rebuilt when a worker restarts). The weights held, and their version, stay."""
        self.sync.open(host, port, member, local_ip=self.node_ip())

    def receive_weights(self, version: int) -> int:
        """Receive a push of ``version``: all weights, or the adapters alone, merged here
        (safer_dist/weights/ends.py)."""
        self.sync.receive(self.model, version)
        self.version = version
        return version

    def logits(self, input_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            ids = torch.tensor([input_ids], device=self.device)
            return self.model(input_ids=ids, use_cache=False).logits[0].float().cpu()
