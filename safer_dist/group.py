"""Ray plumbing: start or join Ray, and place learner ranks as actors.

``LearnerGroup`` owns N ``Learner`` actors in one placement group (one bundle per rank).
Rank 0 publishes its address; every rank then forms the torch.distributed group itself.
Every call fans out to all ranks (the collective ones must) and waits with a timeout, so a
dead or hung rank ends the job with a message naming it instead of hanging.
"""

from __future__ import annotations

import os
import time
from typing import Any

from safer_dist.config import Config
from safer_dist.log import get_logger

log = get_logger("group")


class LearnerFailure(RuntimeError):
    """A learner actor died or did not answer in time."""


def _actor_pid(_actor) -> int:
    return os.getpid()


def _actor_node_ip(_actor) -> str:
    import ray

    return ray.util.get_node_ip_address()


def cuda_available_in_cluster() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def start_ray(cfg: Config) -> None:
    """Join ``launch.ray_address`` or start Ray in this process (loopback, no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if cfg.launch.device == "cpu" or (cfg.launch.device == "auto" and not _local_cuda()):
        env["DS_ACCELERATOR"] = "cpu"
    runtime_env = {"env_vars": env}
    if cfg.launch.ray_address:
        ray.init(address=cfg.launch.ray_address, runtime_env=runtime_env, log_to_driver=True)
        _reclaim_stop_signals()
        log.info("joined Ray cluster at %s: %s", cfg.launch.ray_address, _resources())
        return
    # A single-machine cluster binds to loopback only with this setting.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # ERPO holds learners and rollout workers at once; they take turns, so the logical CPUs
    # may exceed the cores.
    needed = cfg.learner.num_learners * cfg.learner.cpus_per_learner + cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
    num_cpus = cfg.launch.num_cpus or max(os.cpu_count() or 1, needed)
    # address="local": always a new instance, never a cluster that `ray start` left running.
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
        log_to_driver=True, _node_ip_address="127.0.0.1",
    )
    _reclaim_stop_signals()
    log.info("started Ray in-process: %s", _resources())


def _reclaim_stop_signals() -> None:
    # ray.init replaces the driver's SIGTERM handler with sys.exit; take graceful stop back.
    from safer_dist import stop

    stop.reinstall()


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _resources() -> str:
    import ray

    r = ray.cluster_resources()
    return ", ".join(f"{k}={r[k]:g}" for k in ("CPU", "GPU") if k in r) + f", {len(ray.nodes())} node(s)"


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def gpus_per_learner(cfg: Config) -> int:
    if cfg.learner.gpus_per_learner == "auto":
        if cfg.launch.device == "cpu":
            return 0
        return 1 if cuda_available_in_cluster() else 0
    return int(cfg.learner.gpus_per_learner)


class LearnerGroup:
    """N learner ranks as Ray actors. Methods mirror ``Learner``'s and run on every rank."""

    def __init__(self, cfg: Config, num_learners: int | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from safer_dist.learner import Learner

        self.cfg = cfg
        self.world_size = num_learners or cfg.learner.num_learners
        self.timeout_s = cfg.learner.call_timeout_s
        # The newest complete checkpoint this job saved or resumed from (set by Checkpointer),
        # named in the message when a learner fails.
        self.last_checkpoint: str | None = None
        self.pids: list[int] = []
        gpus = gpus_per_learner(cfg)
        cpus = cfg.learner.cpus_per_learner
        bundles = [{"CPU": cpus, **({"GPU": gpus} if gpus else {})} for _ in range(self.world_size)]
        self.pg = placement_group(bundles, strategy=cfg.learner.placement)
        self._get([self.pg.ready()], "placement group", timeout_s=cfg.learner.placement_timeout_s, ranked=False)
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(Learner)
        device = cfg.launch.device if gpus or cfg.launch.device != "auto" else "cpu"
        self.actors = [
            remote.options(
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(cfg.learner, cfg.train, cfg.model, cfg.data, seed=cfg.run.seed, device=device)
            for i in range(self.world_size)
        ]
        self.pids = self._get([a.__ray_call__.remote(_actor_pid) for a in self.actors], "start")
        addr, port = self._get([self.actors[0].address.remote()], "address")[0]
        # Where Ray put each rank (learner.placement decides); rank 0's address is MASTER_ADDR.
        self.node_ips = self._get([a.__ray_call__.remote(_actor_node_ip) for a in self.actors], "start")
        log.info(
            "learner ranks placed (%s) on nodes %s; MASTER_ADDR %s:%d", cfg.learner.placement,
            ", ".join(f"{r}:{ip}" for r, ip in enumerate(self.node_ips)), addr, port,
        )
        infos = self._call("setup", lambda r: (r, self.world_size, addr, port))
        self.info, self.infos = infos[0], infos
        log.info(
            "%d learner(s) ready: ZeRO-%d, %s, %s, attention %s, loss head %s, %.2fM parameters (%.2fM non-embedding)",
            self.world_size, cfg.learner.zero_stage, self.info["device"], self.info["dtype"],
            self.info["attn_implementation"], self.info["loss_head"], self.info["num_params"] / 1e6,
            self.info["num_params_non_embedding"] / 1e6,
        )
        log.info("learner pids by rank: %s", " ".join(f"{r}:{pid}" for r, pid in enumerate(self.pids)))

    def _get(self, refs: list, what: str, timeout_s: float | None = None, ranked: bool = True) -> list:
        """Results of ``refs`` (``refs[i]`` from rank i). A dead rank raises LearnerFailure as
        soon as its death is known, not when the surviving ranks give up on their collective;
        no answer within ``timeout_s`` (default learner.call_timeout_s) raises it too."""
        import ray
        from ray.exceptions import RayError

        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        rank_of = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                who = f"learner rank(s) {sorted(rank_of[r] for r in pending)}" if ranked else "Ray"
                raise LearnerFailure(
                    f"{who} did not finish {what} within {timeout_s:.0f} s; {self._checkpoint_note()}"
                )
            try:
                ray.get(ready[0])
            except RayError as e:
                failure = self._failure(e, rank_of[ready[0]], pending, rank_of, what)
                if failure is e:
                    raise
                raise failure from e
        return ray.get(list(refs))

    def _failure(self, first, rank: int, pending: list, rank_of: dict, what: str) -> Exception:
        """The error to raise for a failed call: LearnerFailure naming the dead rank, if any."""
        import ray
        from ray.exceptions import RayActorError, RayError

        failures = {rank: first}
        if not isinstance(first, RayActorError) and pending:
            # A rank whose peer died fails its collective too: let the death itself surface.
            more, _ = ray.wait(pending, num_returns=len(pending), timeout=5.0)
            for ref in more:
                try:
                    ray.get(ref)
                except RayError as e:
                    failures[rank_of[ref]] = e
        dead = sorted(r for r, e in failures.items() if isinstance(e, RayActorError))
        if not dead:
            return first
        r = dead[0]
        pid = f", pid {self.pids[r]}" if r < len(self.pids) else ""
        cause = str(failures[r]).strip().splitlines()[0] if str(failures[r]).strip() else type(failures[r]).__name__
        return LearnerFailure(
            f"learner rank {r} (Ray actor {self.actors[r]._actor_id.hex()}{pid}) died during {what}: {cause}; "
            f"{self._checkpoint_note()}"
        )

    def _checkpoint_note(self) -> str:
        if self.last_checkpoint:
            return f"last complete checkpoint: {self.last_checkpoint} (run the same command again to resume from it)"
        return "no checkpoint was saved or resumed by this job"

    def _call(self, method: str, args=lambda rank: (), kwargs: dict[str, Any] | None = None) -> list:
        refs = [getattr(a, method).remote(*args(r), **(kwargs or {})) for r, a in enumerate(self.actors)]
        return self._get(refs, method)

    def sft_step(self, step: int) -> dict:
        return self._call("sft_step", lambda r: (step,))[0]

    def load_pairs(self, path: str, seed: int, safety_repeats: int = 1) -> int:
        return self._call("load_pairs", lambda r: (path, seed, safety_repeats))[0]

    def dpo_step(self, step: int, erpo) -> dict:
        return self._call("dpo_step", lambda r: (step, erpo))[0]

    def sync_address(self) -> tuple[str, int]:
        return self._get([self.actors[0].address.remote()], "address")[0]

    def init_sync_refs(self, host: str, port: int, world_size: int) -> list:
        return [self.actors[0].init_sync.remote(host, port, world_size)]

    def send_weights_refs(self, version: int) -> list:
        return [a.send_weights.remote(version) for a in self.actors]

    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> None:
        self._call("save_checkpoint", lambda r: (root, tag, client_state))

    def load_checkpoint(self, root: str, tag: str, **kwargs) -> dict:
        return self._call("load_checkpoint", lambda r: (root, tag), kwargs)[0]

    def export_hf(self, out_dir: str) -> None:
        self._call("export_hf", lambda r: (out_dir,))

    def logits(self, input_ids: list[int]):
        return self._call("logits", lambda r: (input_ids,))[0]

    def full_state_dict(self):
        """The consolidated weights (rank 0's answer; collective under ZeRO-3)."""
        return self._call("full_state_dict")[0]

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
