"""Rollout workers: an inference copy of the policy on a Ray actor.

A ``RolloutWorker`` loads a Hugging Face directory and generates batched, left-padded,
with the same prompt tokenization as training (:func:`safer_dist.train.sft_data.encode_prompt`).
``RolloutGroup`` spreads a list of prompts over M workers and returns results in order.
A worker that dies is restarted by Ray (``rollout.max_restarts``) and its shard is retried
(see :meth:`RolloutGroup._map`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from safer_dist.cluster.group import gpus_per_learner
from safer_dist.config import Config, ModelSection, RolloutSection
from safer_dist.train.sft_data import encode_context, encode_prompt
from safer_dist.runtime.log import get_logger, quiet_libraries

log = get_logger("rollout")


class RolloutFailure(RuntimeError):
    """A rollout worker kept dying, or came back without the weights the others hold."""


class RolloutWorker:
    def __init__(self, model: ModelSection, rollout: RolloutSection, *, path: str | None = None, device: str = "auto"):
        from safer_dist.train.learner import resolve_device, resolve_dtype
        from safer_dist.train.models import load_model, load_tokenizer

        quiet_libraries()
        self.cfg = rollout
        self.device = resolve_device(device)
        if self.device == "cpu":
            torch.set_num_threads(rollout.cpus_per_worker)
        path = path or model.path
        self.tokenizer = load_tokenizer(path, trust_remote_code=model.trust_remote_code)
        self.model = load_model(
            path, dtype=resolve_dtype(model.dtype, self.device), attn_implementation=model.attn_implementation,
            device=self.device, trust_remote_code=model.trust_remote_code,
        )
        self.model.eval()
        self.path = path

    def weights_version(self) -> int:
        """Version of the weights held: 0 as loaded from ``path``, then what the last sync sent."""
        return getattr(self, "version", 0)

    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
        batch_size: int = 32, seed: int = 0,
    ) -> list[dict]:
        """Complete each chat prompt; returns [{text, num_tokens, latency_s}] in input order."""
        tok = self.tokenizer
        encoded = [encode_prompt(tok, p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[dict | None] = [None] * len(prompts)
        torch.manual_seed(seed)
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
            sample = temperature > 0
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens,
                do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                top_k=None, eos_token_id=tok.eos_token_id, pad_token_id=pad, use_cache=True,
            )
            latency = (time.perf_counter() - t0) / len(idx)
            for row, i in enumerate(idx):
                new = gen[row, width:].tolist()
                if tok.eos_token_id in new:
                    new = new[: new.index(tok.eos_token_id)]
                out[i] = {
                    "text": tok.decode(new, skip_special_tokens=True),
                    "num_tokens": len(new),
                    "latency_s": latency,
                }
        return out  # type: ignore[return-value]


    # -- ERPO ------------------------------------------------------------------------------
    def sample(
        self, items: list[tuple[str, str]], *, n: int, stop_strings: list[str] | None, max_new_tokens: int,
        temperature: float, top_p: float = 1.0, seed: int = 0,
    ) -> list[list[dict]]:
        """``n`` continuations of each (prompt, response prefix), one prefill per prefix."""
        from safer_dist.erpo.sampling import sample_candidates

        contexts = [encode_context(self.tokenizer, p, x) for p, x in items]
        return sample_candidates(
            self.model, self.tokenizer, contexts, n, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
            temperature=temperature, top_p=top_p, seed=seed, batch_rows=self.cfg.batch_size,
        )

    def logprobs(self, items: list[tuple[str, str, str, bool]]) -> list[tuple[float, int]]:
        """log p(continuation | prompt, prefix) under the weights held, for (prompt, prefix,
        continuation, ends_with_eos) items; tokenized exactly as the learners do."""
        from safer_dist.erpo.pairs import step_sequence
        from safer_dist.erpo.sampling import continuation_logprobs

        pairs = [step_sequence(self.tokenizer, p, x, c, eos) for p, x, c, eos in items]
        return continuation_logprobs(self.model, pairs)

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def init_sync(self, host: str, port: int, rank: int, world_size: int) -> None:
        from safer_dist.erpo.weight_sync import make_group

        backend = "nccl" if self.device == "cuda" else "gloo"
        self.sync_group = make_group(host, port, rank, world_size, backend, local_ip=self.node_ip())
        self.version = 0

    def receive_weights(self, version: int) -> int:
        from safer_dist.erpo.weight_sync import receive_weights

        receive_weights(self.model, self.sync_group)
        self.version = version
        return version

    def logits(self, input_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            ids = torch.tensor([input_ids], device=self.device)
            return self.model(input_ids=ids, use_cache=False).logits[0].float().cpu()


def _get_alive(refs: list) -> list:
    """Results of the calls whose actor did not die."""
    import ray
    from ray.exceptions import RayActorError

    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except RayActorError:
            continue
    return out


class RolloutGroup:
    """M rollout workers as Ray actors (one GPU each on CUDA, else ``cpus_per_worker``).

    ``expected_version``: the least weight version every worker should hold (0: the weights
    loaded from ``path``). A restarted worker holds version 0; it is used again only if that
    matches both this and every surviving worker, so it never silently serves stale weights.
    """

    @classmethod
    def for_run(cls, cfg: Config, path: str | Path) -> RolloutGroup:
        """Workers holding the model at ``path``, placed as the run's config says: one GPU
        each where the learners get GPUs, else ``rollout.cpus_per_worker`` CPUs."""
        return cls(cfg.model, cfg.rollout, path=str(path), device=cfg.launch.device, use_gpu=gpus_per_learner(cfg) > 0)

    def __init__(self, model: ModelSection, rollout: RolloutSection, *, path: str | None = None, device: str = "auto", use_gpu: bool = False):
        import ray

        remote = ray.remote(
            num_cpus=rollout.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=rollout.max_restarts,
        )(RolloutWorker)
        self.cfg = rollout
        self.workers = [remote.remote(model, rollout, path=path, device=device) for _ in range(rollout.num_workers)]
        self.expected_version = 0
        self.num_retries = 0  # shards re-run after a worker died (for logs and tests)

    def _map(self, what: str, call: Callable[[Any, list], Any], items: list) -> list:
        """``call(worker, shard)`` (a Ray call's reference) on interleaved shards of ``items``,
        one per worker; results in the order of ``items``. ``what`` names the call in messages.

        Fault tolerance: when a worker dies mid-call, Ray restarts it (``rollout.max_restarts``)
        and its whole shard is sent again to the restarted worker, with the same arguments (a
        call seeds its own sampling, so the retry returns what the first try would have). Each
        shard has one call in flight at a time and its result is placed by position, so no item
        is lost or duplicated. A shard whose worker died more than ``max_restarts`` times, or a
        worker that comes back without ``expected_version`` weights, raises RolloutFailure.
        """
        import ray
        from ray.exceptions import RayActorError

        n = len(self.workers)
        shards = {i: items[i::n] for i in range(n) if items[i::n]}
        attempts = dict.fromkeys(shards, 0)
        running = {call(self.workers[i], s): i for i, s in shards.items()}
        out: list = [None] * len(items)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ref)
            try:
                res = ray.get(ref)
            except RayActorError as e:
                attempts[i] += 1
                cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if attempts[i] > self.cfg.max_restarts:
                    raise RolloutFailure(
                        f"rollout worker {i} died {attempts[i]} time(s) during {what} (rollout.max_restarts="
                        f"{self.cfg.max_restarts}): {cause}"
                    ) from e
                log.warning("rollout worker %d died during %s (%s); retrying its %d item(s) on the restarted worker",
                            i, what, cause, len(shards[i]))
                self._check_restarted(i)
                self.num_retries += 1
                running[call(self.workers[i], shards[i])] = i
                continue
            assert len(res) == len(shards[i]), (what, i, len(res), len(shards[i]))
            out[i::n] = res
        return out

    def _check_restarted(self, i: int, timeout_s: float = 600.0) -> None:
        """Wait until Ray has restarted worker ``i``; refuse it if its weights are stale."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                version = ray.get(self.workers[i].weights_version.remote())
                break
            except ActorUnavailableError as e:  # still restarting (loading the model)
                if time.monotonic() > deadline:
                    raise RolloutFailure(f"rollout worker {i} was not back within {timeout_s:.0f} s of dying") from e
                time.sleep(0.1)
            except RayActorError as e:
                raise RolloutFailure(f"rollout worker {i} died and could not be restarted: {e}") from e
        # The survivors hold the current weights (each answers after its running call).
        others = [w.weights_version.remote() for j, w in enumerate(self.workers) if j != i]
        expected = max([self.expected_version, *(v for v in _get_alive(others))])
        if version != expected:
            raise RolloutFailure(
                f"rollout worker {i} was restarted with weights version {version}, but the policy is at version "
                f"{expected}; its results would be stale"
            )

    def generate(self, prompts: list[str], **kwargs) -> list[dict]:
        """``RolloutWorker.generate`` over all workers; results in the order of ``prompts``."""
        return self._map("generate", lambda w, shard: w.generate.remote(shard, **kwargs), prompts)

    def sample(self, items: list[tuple[str, str]], **kwargs) -> list[list[dict]]:
        """``RolloutWorker.sample`` over all workers; results in the order of ``items``."""
        return self._map("sample", lambda w, shard: w.sample.remote(shard, **kwargs), items)

    def logprobs(self, items: list[tuple[str, str, str, bool]]) -> list[tuple[float, int]]:
        """``RolloutWorker.logprobs`` over all workers; results in the order of ``items``."""
        return self._map("logprobs", lambda w, shard: w.logprobs.remote(shard), items)

    # -- weight sync (driven by LearnerGroup.connect_weight_sync / push_weights) ------------
    def init_sync_refs(self, host: str, port: int, *, first_rank: int, world_size: int) -> list:
        return [w.init_sync.remote(host, port, first_rank + i, world_size) for i, w in enumerate(self.workers)]

    def receive_weights_refs(self, version: int) -> list:
        return [w.receive_weights.remote(version) for w in self.workers]

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
