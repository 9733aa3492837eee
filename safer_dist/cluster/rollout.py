"""Rollout groups: the driver's side of the rollout workers.

``RolloutGroup`` spreads a list of prompts over M rollout workers (Ray actors running
:class:`safer_dist.rollout.worker.RolloutWorker`) and returns results in order.
A worker that dies is restarted by Ray (``rollout.max_restarts``), rejoins the weight sync
and gets the current weights again, and its shard is retried (see :meth:`RolloutGroup._map`).
:class:`TensorParallelWorkers` starts the rank actors of tensor-parallel workers
(:mod:`safer_dist.rollout.tensor_parallel`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safer_dist.cluster.placement import (
    Cluster, PhaseBundles, Slots, learner_gpus, own_phase, ray_free, rollout_keys,
)
from safer_dist.config import Config, ModelSection, RolloutSection
from safer_dist.data.chat import Prompt
from safer_dist.rollout.tensor_parallel import TIMEOUT_S, TensorParallelRank
from safer_dist.rollout.worker import RolloutFailure, RolloutWorker
from safer_dist.runtime import stop
from safer_dist.runtime.log import get_logger
from safer_dist.weights.driver import StaleWeights, WeightSync
from safer_dist.weights.layout import free_address

# How often a rollout call in flight checks for a graceful stop (seconds).
STOP_POLL_S = 0.5

log = get_logger("rollout")


class RolloutGroup:
    """M rollout workers as Ray actors, one per bundle of a placement group: the group's own
    (``{CPU: cpus_per_worker, GPU: 1}`` per worker on GPUs) or, given ``slots``, a phase's
    shared one (colocated with the learners: safer_dist/cluster/placement.py). The placement
    group must be ready within ``rollout.placement_timeout_s`` and every call must answer within
    ``rollout.call_timeout_s``; else the error names what is missing or who did not answer.
    With ``rollout.tensor_parallel`` K > 1, each worker is K rank actors in a STRICT_PACK
    placement group of K bundles on one node (:mod:`safer_dist.rollout.tensor_parallel`), never
    colocated, and not restarted when one dies.

    ``expected_version``: the weight version every worker must hold (0: the weights loaded from
    ``path``; each weight push sets it). Every call's answer is checked against it.
    A worker that Ray restarted holds version 0 again: its answer is discarded, the worker is
    brought back to ``expected_version`` through ``weight_sync`` and its shard runs again; where
    that cannot be done, RolloutFailure. A worker never silently serves stale weights.

    ``weight_sync``: the group's :class:`~safer_dist.weights.driver.WeightSync`, set when the
    learners connect to it (``LearnerGroup.connect_weight_sync``); its ``resync()`` rebuilds the
    weight-sync group with every worker and sends the weights of ``expected_version`` again, or
    raises StaleWeights when the learners no longer hold them. None: no weight sync.
    """

    @classmethod
    def for_run(cls, cfg: Config, path: str | Path, slots: Slots | None = None, name: str = "policy rollout",
                head: str = "causal_lm") -> RolloutGroup:
        """Workers holding the model at ``path``, placed as the run's config says: in ``slots``,
        or on a GPU each where the learners get GPUs, else ``rollout.cpus_per_worker`` CPUs.
        ``head="sequence"``: a sequence-classification model (a classifier judge's), for ``classify``."""
        return cls(cfg.model, cfg.rollout, path=str(path), device=cfg.launch.device,
                   use_gpu=learner_gpus(cfg, Cluster.from_ray()) > 0, slots=slots, name=name, head=head)

    def __init__(self, model: ModelSection, rollout: RolloutSection, *, path: str | None = None, device: str = "auto",
                 use_gpu: bool = False, slots: Slots | None = None, name: str = "rollout", head: str = "causal_lm"):
        import ray

        self.own_bundles = None
        if slots is None:
            phase = own_phase("rollout", name, rollout.num_workers, float(rollout.cpus_per_worker), use_gpu,
                              rollout_keys(rollout), rollout.tensor_parallel)
            self.own_bundles = PhaseBundles(phase, rollout.placement_timeout_s, "rollout.placement_timeout_s")
            slots = self.own_bundles.slots("rollout")
        self.cfg = rollout
        self.tp_workers = None
        assert head == "causal_lm" or rollout.tensor_parallel == 1, "config validation refuses this"
        if rollout.tensor_parallel > 1:  # each worker is K rank actors; its rank 0 stands for it here
            try:
                self.tp_workers = TensorParallelWorkers(model, rollout, slots, path=path, device=device)
            except BaseException:
                if self.own_bundles is not None:
                    self.own_bundles.remove()
                raise
            self.workers = list(self.tp_workers.leaders)
        else:
            remote = ray.remote(max_restarts=rollout.max_restarts)(RolloutWorker)
            self.workers = [remote.options(**slots.options(i)).remote(model, rollout, path=path, device=device,
                                                                       share_gpu=0 < slots.gpus < 1, head=head)
                            for i in range(rollout.num_workers)]
        self.expected_version = 0
        self.weight_sync: WeightSync | None = None
        self.num_retries = 0  # shards re-run after a worker died or came back restarted (for logs and tests)

    def _map(self, what: str, call: Callable[[Any, list], Any], items: list,
             key: Callable[[Any], Any] | None = None) -> list:
        """``call(worker, shard)`` (a Ray call's reference) on interleaved shards of ``items``,
        one per worker; results in the order of ``items``. ``what`` names the call in messages.
        ``key``: consecutive items with the same key go to one shard together (runs of items are
        interleaved instead of single items), e.g. a prefix's continuations, which a worker then
        packs as one tree whatever the number of workers.

        Fault tolerance: a worker that dies is restarted by Ray (``rollout.max_restarts``),
        whether it died during this call or before it. Either way its answer is not used: the
        call fails, or the restarted process answers with weights of the wrong version. The
        worker is brought back to ``expected_version`` (:meth:`_bring_back`) and its whole shard
        is sent again with the same arguments (a call seeds its own sampling, so the retry
        returns what the first try would have). Each shard has one call in flight at a time and
        its result is placed by position, so no item is lost or duplicated. A shard retried more
        than ``max_restarts`` times, or a worker that cannot be brought to ``expected_version``,
        raises RolloutFailure.

        A graceful stop (SIGTERM, SIGUSR1, Ctrl-C: :mod:`safer_dist.runtime.stop`) is noticed
        within ``STOP_POLL_S`` and raises :class:`~safer_dist.runtime.stop.Preempted`: the call's
        results are dropped (the workers' answers are not waited for), so a long evaluation or
        sampling call does not hold the stop until its grace period runs out.
        """
        import ray
        from ray.exceptions import RayActorError

        n = len(self.workers)
        runs: list[list[int]] = []  # positions of items, in runs of one key
        for j, item in enumerate(items):
            if key is not None and runs and key(items[runs[-1][0]]) == key(item):
                runs[-1].append(j)
            else:
                runs.append([j])
        positions = {i: [j for run in runs[i::n] for j in run] for i in range(n) if runs[i::n]}
        shards = {i: [items[j] for j in pos] for i, pos in positions.items()}
        attempts = dict.fromkeys(shards, 0)
        running: dict = {}  # a call's reference -> (worker index, reference of its version check)

        def submit(i: int) -> None:
            w = self.workers[i]
            ref = call(w, shards[i])
            # Queued right behind the call on the same actor, so it runs in the process that ran
            # the call (or in a later one, if that died): the version the call's answer came from.
            running[ref] = (i, w.weights_version.remote(), time.monotonic() + self.cfg.call_timeout_s)

        for i in shards:
            submit(i)
        out: list = [None] * len(items)
        while running:
            first_deadline = min(d for _, _, d in running.values())
            wait_s = min(STOP_POLL_S, max(0.0, first_deadline - time.monotonic()))
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            if stop.requested():
                raise stop.Preempted(f"stopped during {what} on the rollout workers (its results are dropped); "
                                     "run the same command to resume")
            if not ready and time.monotonic() < first_deadline:
                continue
            if not ready:
                late = sorted(i for i, _, d in running.values() if d <= time.monotonic())
                raise RolloutFailure(
                    f"rollout worker(s) {late} did not answer {what} within rollout.call_timeout_s="
                    f"{self.cfg.call_timeout_s:g} s (Ray has {ray_free()} free)"
                )
            ref = ready[0]
            i, version_ref, _ = running.pop(ref)
            try:
                res = ray.get(ref)
                version = ray.get(version_ref)
            except RayActorError as e:
                failed = f"died during {what} ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
            else:
                if version == self.expected_version:
                    assert len(res) == len(shards[i]), (what, i, len(res), len(shards[i]))
                    for j, r in zip(positions[i], res):
                        out[j] = r
                    continue
                failed = (f"was restarted: it answered {what} with weights version {version}, the policy is at "
                          f"version {self.expected_version}")
            attempts[i] += 1
            if attempts[i] > self.cfg.max_restarts:
                raise RolloutFailure(
                    f"rollout worker {i} failed {attempts[i]} time(s) during {what} (rollout.max_restarts="
                    f"{self.cfg.max_restarts}); last: {failed}"
                )
            log.warning("rollout worker %d %s; retrying its %d item(s) on the restarted worker",
                        i, failed, len(shards[i]))
            self._bring_back(i, busy=list(running))
            self.num_retries += 1
            submit(i)
        return out

    def _bring_back(self, i: int, busy: list, timeout_s: float = 600.0) -> None:
        """Wait until Ray has restarted worker ``i``, then make sure it holds ``expected_version``.

        A restarted worker holds version 0 (the weights at ``path``). For any later version the
        weight-sync group is rebuilt with every worker and the weights are sent again
        (``weight_sync.resync``), once the calls still running on the other workers (``busy``,
        references whose results the caller collects afterwards) have finished: a rebuild needs
        every worker. RolloutFailure if the worker does not come back, or cannot get those weights.
        """
        import ray
        from ray.exceptions import RayError

        version = self._wait_alive(i, timeout_s)
        if version == self.expected_version:
            return
        stale = (f"rollout worker {i} was restarted with weights version {version}, but the policy is at version "
                 f"{self.expected_version}")
        if self.weight_sync is None:
            raise RolloutFailure(
                f"{stale}, and this group has no weight sync to send those weights again "
                "(LearnerGroup.connect_weight_sync); its results would be stale"
            )
        if busy:
            _, late = ray.wait(busy, num_returns=len(busy), timeout=self.cfg.call_timeout_s)
            if late:
                raise RolloutFailure(f"{stale}, and {len(late)} other rollout call(s) did not finish within "
                                     f"rollout.call_timeout_s={self.cfg.call_timeout_s:g} s")
        t0 = time.perf_counter()
        try:
            self.weight_sync.resync()
        except StaleWeights as e:
            raise RolloutFailure(f"{stale}: {e}") from e
        except (RuntimeError, RayError) as e:  # LearnerFailure: a member died or hung during the rebuild
            raise RolloutFailure(f"{stale}, and rebuilding the weight-sync group failed: {e}") from e
        version = self._wait_alive(i, timeout_s)
        if version != self.expected_version:  # it died again during the rebuild
            raise RolloutFailure(f"{stale}; after the weight-sync group was rebuilt it holds version {version}")
        log.info("rollout worker %d restarted and rejoined the weight-sync group: weights version %d resent to %d "
                 "worker(s) in %.2f s", i, version, len(self.workers), time.perf_counter() - t0)

    def _wait_alive(self, i: int, timeout_s: float) -> int:
        """The weights version of worker ``i``, once Ray has it running again."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(self.workers[i].weights_version.remote())
            except ActorUnavailableError as e:  # still restarting (loading the model)
                if time.monotonic() > deadline:
                    raise RolloutFailure(f"rollout worker {i} was not back within {timeout_s:.0f} s of dying") from e
                time.sleep(0.1)
            except RayActorError as e:
                raise RolloutFailure(f"rollout worker {i} died and could not be restarted: {e}") from e

    def generate(self, prompts: list[Prompt], **kwargs) -> list[dict]:
        """``RolloutWorker.generate`` over all workers; results in the order of ``prompts``."""
        return self._map("generate", lambda w, shard: w.generate.remote(shard, **kwargs), prompts)

    def classify(self, items: list[Prompt], **kwargs) -> list[str]:
        """``RolloutWorker.classify`` over all workers; labels in the order of ``items``."""
        return self._map("classify", lambda w, shard: w.classify.remote(shard, **kwargs), items)

    def sample(self, items: list[tuple[Prompt, str]], **kwargs) -> list[list[dict]]:
        """``RolloutWorker.sample`` over all workers; results in the order of ``items``."""
        return self._map("sample", lambda w, shard: w.sample.remote(shard, **kwargs), items)

    def logprobs(self, items: list[tuple[Prompt, str, str, bool]], share_prefix: bool = True) -> list[tuple[float, int]]:
        """``RolloutWorker.logprobs`` over all workers; results in the order of ``items``. The
        items of one (prompt, prefix) go to one worker, so their sums come from the same packed
        tree, bit for bit, whatever ``rollout.num_workers``."""
        return self._map("logprobs", lambda w, shard: w.logprobs.remote(shard, share_prefix), items,
                         key=lambda item: (item[0], item[1]))

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        if self.tp_workers is not None:
            self.tp_workers.shutdown()
        if self.own_bundles is not None:
            self.own_bundles.remove()


class TensorParallelWorkers:
    """``rollout.num_workers`` tensor-parallel workers of ``rollout.tensor_parallel`` ranks each,
    in ``slots`` (ready placement groups, one STRICT_PACK group of K bundles per worker, from
    safer_dist/cluster/placement.py; their owner removes them). ``leaders[i]`` is worker i as
    the group sees it (rank 0); :meth:`shutdown` ends all ranks. RolloutFailure when the ranks
    do not start within ``timeout_s``."""

    def __init__(self, model: ModelSection, rollout: RolloutSection, slots, *, path: str | None, device: str,
                 timeout_s: float = TIMEOUT_S):
        import ray

        k, m = rollout.tensor_parallel, rollout.num_workers
        assert len(slots.worker_pgs) == m and len(slots.bundles) == k, "slots of another placement"
        self.ranks: list[list] = []
        remote = ray.remote(max_restarts=0)(TensorParallelRank)
        address = ray.remote(free_address)
        for w in range(m):
            addr, port = ray.get(address.options(**{**slots.options(w, 0), "num_cpus": 0, "num_gpus": 0}).remote(),
                                 timeout=timeout_s)
            args = dict(path=path, device=device, addr=addr, port=port, timeout_s=timeout_s)
            followers = [remote.options(**slots.options(w, r)).remote(model, rollout, rank=r, **args)
                         for r in range(1, k)]
            leader = remote.options(**slots.options(w, 0)).remote(model, rollout, rank=0, followers=followers, **args)
            self.ranks.append([leader, *followers])
        self.leaders = [ranks[0] for ranks in self.ranks]
        started = [r.weights_version.remote() for ranks in self.ranks for r in ranks]
        done, _ = ray.wait(started, num_returns=len(started), timeout=timeout_s)
        try:
            if len(done) < len(started):
                raise RolloutFailure(f"tensor-parallel rollout ranks did not load the model within {timeout_s:.0f} s")
            ray.get(started)
        except BaseException:
            self.shutdown()
            raise
        log.info("%d tensor-parallel rollout worker(s) of %d ranks each ready%s", m, k,
                 f" (rollout.max_restarts={rollout.max_restarts} does not apply: a rank that dies is not replaced)"
                 if rollout.max_restarts else "")

    def shutdown(self) -> None:
        import ray

        for ranks in self.ranks:
            for r in ranks:
                ray.kill(r, no_restart=True)
        self.ranks = []
