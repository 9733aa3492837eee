"""The weight sync, driver side: forming the channel between the learners and a rollout group,
pushing weights, and bringing restarted rollout workers back to the pushed version.

::

    LearnerGroup.connect_weight_sync(rollout) ──▶ WeightSync(learners, rollout).connect()
    LearnerGroup.push_weights(rollout, v)      ──▶ rollout.weight_sync.push(v)
    RolloutGroup, a worker came back restarted ──▶ rollout.weight_sync.resync()
                         │
                         ▼  Ray calls on the actors' ends (safer_dist/weights/ends.py)
    learner rank 0 ──broadcast / CUDA-IPC hand-over──▶ rollout workers (safer_dist/weights/channel.py)

:class:`WeightSync` owns this protocol; the groups own their actors and how a call on them is
waited for. It imports neither group (both import it): what it needs of them is
:class:`Learners` and :class:`Rollout`. Every wait has a deadline (``learner.call_timeout_s``, and
``rollout.sync_timeout_s`` for the set-up) and its error names who did not answer.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from safer_dist.config import RolloutSection
from safer_dist.runtime.log import get_logger
from safer_dist.weights.layout import layout, member_device_key

log = get_logger("weight_sync")


class StaleWeights(RuntimeError):
    """The learners no longer hold the weights a rollout worker must get again."""


class Learners(Protocol):
    """What :class:`WeightSync` uses of the learner group (``cluster.group.LearnerGroup``)."""

    actors: list  # Ray actors of ``train.learner.Learner``, by rank
    world_size: int
    slots: Any  # where the ranks are placed (``cluster.placement.Slots``)
    weights_version: int | None  # the version the learners hold; None once a step or restore changed them

    def wait(self, refs: list, what: str, *, timeout_s: float | None = None, names: list[str] | None = None) -> list:
        """The results of ``refs``, or an error naming who died or did not answer in time."""


class Rollout(Protocol):
    """What :class:`WeightSync` uses of a rollout group (``cluster.rollout.RolloutGroup``)."""

    cfg: RolloutSection
    workers: list  # Ray actors of ``rollout.worker.RolloutWorker`` (a tensor-parallel worker's rank 0)
    expected_version: int  # the version every worker must hold
    weight_sync: WeightSync | None


def release_cuda_cache(_actor=None) -> None:
    """Hand this process's cached, unused CUDA memory back to the GPU, for a process sharing it."""
    import torch  # runs in a learner actor; the driver does not import torch for this module

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class WeightSync:
    """The weight sync between ``learners`` and ``rollout``: learner rank 0 is member 0, rollout
    worker i member i + 1 (:mod:`safer_dist.weights.layout`)."""

    def __init__(self, learners: Learners, rollout: Rollout):
        self.learners, self.rollout = learners, rollout

    def connect(self) -> None:
        """Form the weight-sync group: a worker on learner rank 0's GPU (colocated) gets the
        CUDA-IPC hand-over, the others the broadcast. Any group formed before is left first, so
        this also rebuilds it (on a new port); the workers keep their weights. Makes this the
        rollout group's ``weight_sync`` (its restarted workers come back through :meth:`resync`)."""
        learners, rollout = self.learners, self.rollout
        rank0 = learners.actors[0]
        host, port = learners.wait([rank0.address.remote()], "address")[0]
        keys = learners.wait([a.__ray_call__.remote(member_device_key) for a in [rank0, *rollout.workers]],
                             "device query", names=self._names(1))
        members = layout(keys)
        refs = [rank0.init_sync.remote(host, port, members[0])]
        refs += [w.init_sync.remote(host, port, m) for w, m in zip(rollout.workers, members[1:])]
        learners.wait(refs, f"weight-sync set-up (rollout.sync_timeout_s={rollout.cfg.sync_timeout_s:g})",
                      timeout_s=rollout.cfg.sync_timeout_s, names=self._names(1))
        rollout.weight_sync = self

    def push(self, version: int) -> None:
        """Send the learners' weights to every rollout worker, which then holds ``version``."""
        learners, rollout = self.learners, self.rollout
        t0 = time.perf_counter()
        if learners.slots.gpus and learners.slots.gpus < 1:
            # Colocated on CUDA: the learners' cached activation memory goes back to the GPU for
            # the rollout workers' KV cache (the workers release theirs after each call).
            learners.wait([a.__ray_call__.remote(release_cuda_cache) for a in learners.actors],
                          "release cached GPU memory")
        refs = [a.send_weights.remote(version) for a in learners.actors]
        refs += [w.receive_weights.remote(version) for w in rollout.workers]
        learners.wait(refs, f"weight sync (version {version})", names=self._names(learners.world_size))
        rollout.expected_version = version
        learners.weights_version = version
        log.info("weights version %d sent to %d rollout worker(s) in %.2f s", version, len(rollout.workers),
                 time.perf_counter() - t0)

    def resync(self) -> None:
        """Bring a rollout worker that Ray restarted back to ``rollout.expected_version``.

        The restarted worker is a new process outside the weight-sync group, so every member
        leaves the group and a new one is formed (:meth:`connect`); then the learners' weights
        are sent again with that version. Only possible while the learners still hold that
        version (no step or restore since it was pushed); otherwise StaleWeights, and nothing is
        changed. The rollout workers must be idle.
        """
        version = self.rollout.expected_version
        held = self.learners.weights_version
        if held != version:
            held_s = f"version {held}" if held is not None else "weights trained or restored since it was sent"
            raise StaleWeights(
                f"the learners no longer hold weights version {version} (they hold {held_s}), so it cannot be sent again"
            )
        self.connect()
        self.push(version)

    def _names(self, num_learner_refs: int) -> list[str]:
        """Who answers each reference of a weight-sync call: learner ranks, then rollout workers."""
        return [f"learner rank {r}" for r in range(num_learner_refs)] + [
            f"rollout worker {i}" for i in range(len(self.rollout.workers))
        ]
