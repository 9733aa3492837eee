"""Ray plumbing: start or join Ray, and place learner ranks as actors.

``LearnerGroup`` owns N ``Learner`` actors, one per bundle of a placement group: its own, or the
phase's shared one that colocated rollout workers also use (safer_dist/cluster/placement.py).
Rank 0 publishes its address; every rank then forms the torch.distributed group itself.
Every call fans out to all ranks (the collective ones must) and waits with a timeout, so a
dead or hung rank ends the job with a message naming it instead of hanging.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

from safer_dist.cluster.placement import Cluster, PhaseBundles, Slots, placement
from safer_dist.config import Config, DpoLossSection, OptimSection
from safer_dist.runtime.log import get_logger
from safer_dist.weights.driver import Rollout, WeightSync

log = get_logger("group")


class LearnerFailure(RuntimeError):
    """A learner actor died or did not answer in time."""


def _actor_pid(_actor) -> int:
    return os.getpid()


def _actor_node_ip(_actor) -> str:
    import ray

    return ray.util.get_node_ip_address()


def cuda_available_in_cluster() -> bool:
    return Cluster.from_ray().num_gpus > 0


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
    _local_token_auth()
    # ERPO holds learners and rollout workers at once; they take turns, so the logical CPUs
    # may exceed the cores: as many as the fullest phase places (safer_dist/cluster/placement.py).
    gpus = _local_gpus() if cfg.launch.device != "cpu" else 0
    needed = math.ceil(placement(cfg, "run", Cluster.uniform(1, gpus)).max_cpus())
    num_cpus = cfg.launch.num_cpus or max(os.cpu_count() or 1, needed)
    # address="local": always a new instance, never a cluster that `ray start` left running.
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
        log_to_driver=True, _node_ip_address="127.0.0.1",
    )
    _reclaim_stop_signals()
    log.info("started Ray in-process: %s", _resources())


def _local_token_auth() -> None:
    """Keep Ray's token authentication on for the in-process cluster, stated explicitly.

    Ray 2.60's ``ray.init()`` turns token auth on for a new local cluster when ``RAY_AUTH_MODE``
    is unset and warns that it did so, on every run (ray/_private/authentication/
    authentication_token_setup.py ``enable_token_auth_by_default``); with the variable set it
    does the same without the warning. Ray reads its config when it is imported, so the setting
    is refreshed the way Ray's own ``_enable_token_auth`` does. A mode the user set is kept, and
    joining a cluster (``launch.ray_address``) never comes here: that mode must match the
    cluster's (slurm/ray-cluster.sh).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    from ray._raylet import Config as RayConfig

    os.environ["RAY_AUTH_MODE"] = "token"
    RayConfig.initialize("")


def _reclaim_stop_signals() -> None:
    # ray.init replaces the driver's SIGTERM handler with sys.exit; take graceful stop (SIGTERM,
    # SIGUSR1, SIGINT) back.
    from safer_dist.runtime import stop

    stop.reinstall()


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _resources() -> str:
    import ray

    r = ray.cluster_resources()
    return ", ".join(f"{k}={r[k]:g}" for k in ("CPU", "GPU") if k in r) + f", {len(ray.nodes())} node(s)"


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class LearnerGroup:
    """N learner ranks as Ray actors. Methods mirror ``Learner``'s and run on every rank.

    ``optim`` is the stage's optimisation (default ``cfg.train``; ERPO passes
    ``cfg.erpo.optim``), ``model_path`` the weights to start from (default ``model.path``),
    ``dpo_loss`` the loss of :meth:`dpo_step` (ERPO passes ``cfg.erpo.loss``). All are handed
    to the ranks once, at set-up. ``slots``: where the ranks go, in a phase's placement groups
    (``PhaseBundles.slots("learner")``, shared with colocated rollout workers); None: a placement
    group of the group's own, as the SFT phase places it (safer_dist/cluster/placement.py).
    """

    def __init__(
        self, cfg: Config, *, optim: OptimSection | None = None,
        model_path: str | None = None, dpo_loss: DpoLossSection | None = None, slots: Slots | None = None,
    ):
        import ray

        from safer_dist.train.learner import Learner

        self.cfg = cfg
        self.world_size = cfg.learner.num_learners
        self.timeout_s = cfg.learner.call_timeout_s
        # The newest complete checkpoint this job saved or resumed from (set by Checkpointer),
        # named in the message when a learner fails.
        self.last_checkpoint: str | None = None
        # The weights version the learners hold: set by push_weights, None once a step or a
        # restore changed the weights (a restarted rollout worker can then not get it again).
        self.weights_version: int | None = None
        self.pids: list[int] = []
        self.own_bundles = None
        if slots is None:
            phase = placement(cfg, "sft", Cluster.from_ray()).phase("sft")
            self.own_bundles = PhaseBundles(phase, cfg.learner.placement_timeout_s, "learner.placement_timeout_s")
            slots = self.own_bundles.slots("learner")
        self.slots = slots
        remote = ray.remote(max_restarts=0)(Learner)
        device = cfg.launch.device if slots.gpus or cfg.launch.device != "auto" else "cpu"
        self.actors = [
            remote.options(name=None, **slots.options(i)).remote(
                cfg.learner, optim or cfg.train, cfg.model, cfg.data, seed=cfg.run.seed, device=device,
                model_path=model_path, dpo_loss=dpo_loss)
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
        infos = self._all("setup", lambda a, r: a.setup.remote(r, self.world_size, addr, port))
        self.info, self.infos = infos[0], infos
        log.info(
            "%d learner(s) ready: ZeRO-%d, %s, %s, attention %s, loss head %s, %.2fM parameters (%.2fM non-embedding)",
            self.world_size, cfg.learner.zero_stage, self.info["device"], self.info["dtype"],
            self.info["attn_implementation"], self.info["loss_head"], self.info["num_params"] / 1e6,
            self.info["num_params_non_embedding"] / 1e6,
        )
        log.info("learner pids by rank: %s", " ".join(f"{r}:{pid}" for r, pid in enumerate(self.pids)))

    def _get(self, refs: list, what: str, timeout_s: float | None = None, ranked: bool = True,
             names: list[str] | None = None) -> list:
        """Results of ``refs`` (``refs[i]`` from rank i, or from the actor ``names[i]`` names). A
        dead rank raises LearnerFailure as soon as its death is known, not when the surviving
        ranks give up on their collective; no answer within ``timeout_s`` (default
        learner.call_timeout_s) raises it too."""
        import ray
        from ray.exceptions import RayError

        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        rank_of = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if names:
                    who = ", ".join(names[rank_of[r]] for r in pending)
                else:
                    who = f"learner rank(s) {sorted(rank_of[r] for r in pending)}" if ranked else "Ray"
                raise LearnerFailure(
                    f"{who} did not finish {what} within {timeout_s:.0f} s; {self._checkpoint_note()}"
                )
            try:
                ray.get(ready[0])
            except RayError as e:
                failure = self._failure(e, rank_of[ready[0]], pending, rank_of, what, names)
                if failure is e:
                    raise
                raise failure from e
        return ray.get(list(refs))

    def _failure(self, first, rank: int, pending: list, rank_of: dict, what: str, names: list[str] | None) -> Exception:
        """The error to raise for a failed call: LearnerFailure naming the dead rank (or the
        dead actor ``names`` names), if any."""
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
        who = names[r] if names else f"learner rank {r} (Ray actor {self.actors[r]._actor_id.hex()}{pid})"
        cause = str(failures[r]).strip().splitlines()[0] if str(failures[r]).strip() else type(failures[r]).__name__
        return LearnerFailure(f"{who} died during {what}: {cause}; {self._checkpoint_note()}")

    def _checkpoint_note(self) -> str:
        if self.last_checkpoint:
            return f"last complete checkpoint: {self.last_checkpoint} (run the same command again to resume from it)"
        return "no checkpoint was saved or resumed by this job"

    def _all(self, what: str, call: Callable[[Any, int], Any]) -> list:
        """``call(actor, rank)`` on every rank (it returns the Ray call's reference); results by rank."""
        return self._get([call(a, r) for r, a in enumerate(self.actors)], what)

    def sft_step(self, step: int) -> dict:
        self.weights_version = None
        return self._all("sft_step", lambda a, r: a.sft_step.remote(step))[0]

    def eval_loss(self) -> dict:
        """Validation loss of the current weights (``Learner.eval_loss``): ``valid_loss``, ``num_valid_tokens``."""
        return self._all("eval_loss", lambda a, r: a.eval_loss.remote())[0]

    def load_pairs(self, path: str, seed: int, safety_repeats: int = 1) -> int:
        return self._all("load_pairs", lambda a, r: a.load_pairs.remote(path, seed, safety_repeats))[0]

    def dpo_step(self, step: int) -> dict:
        self.weights_version = None
        return self._all("dpo_step", lambda a, r: a.dpo_step.remote(step))[0]

    def reference_logprobs(self, items: list, share_prefix: bool = True) -> list[tuple[float, int]]:
        """``Learner.reference_logprobs`` (LoRA learners, adapters off), rank 0's answer."""
        import ray

        ref = ray.put(items)  # stored once, read by every rank
        return self._all("reference log-probs", lambda a, r: a.reference_logprobs.remote(ref, share_prefix))[0]

    # -- weight sync to rollout workers (safer_dist/weights/driver.py) ----------------------
    def connect_weight_sync(self, rollout: Rollout) -> None:
        """Form (or rebuild) the weight-sync group of these learners and ``rollout``'s workers
        (:meth:`WeightSync.connect <safer_dist.weights.driver.WeightSync.connect>`)."""
        WeightSync(self, rollout).connect()

    def push_weights(self, rollout: Rollout, version: int) -> None:
        """Send the learners' weights to every worker of ``rollout`` (connected by
        :meth:`connect_weight_sync`), which then holds ``version``."""
        assert rollout.weight_sync is not None and rollout.weight_sync.learners is self, "connect_weight_sync first"
        rollout.weight_sync.push(version)

    def wait(self, refs: list, what: str, *, timeout_s: float | None = None, names: list[str] | None = None) -> list:
        """The results of ``refs`` (from learner ranks, then any other actors ``names`` names), waited
        for as every call of this group is: LearnerFailure naming a dead rank or actor, or whoever
        did not answer within ``timeout_s`` (default learner.call_timeout_s)."""
        return self._get(refs, what, timeout_s, names=names)

    # -- checkpoints and export -------------------------------------------------------------
    def save_checkpoint(self, root: str, tag: str, client_state: dict, hash_files: bool = True,
                        background: bool = False) -> dict:
        """Every rank writes its shards; returns the digests of their files, by name
        (``checkpoint.rank_digests``: each rank hashed its own, in parallel). ``background``:
        the ranks copy the state to host memory and write it on a thread of their own; nothing
        is returned (safer_dist/checkpointing/async_save.py)."""
        per_rank = self._all("save_checkpoint",
                             lambda a, r: a.save_checkpoint.remote(root, tag, client_state, hash_files, background))
        return {name: d for digests in per_rank for name, d in digests.items()}

    def load_checkpoint(self, root: str, tag: str, **kwargs) -> dict:
        self.weights_version = None
        return self._all("load_checkpoint", lambda a, r: a.load_checkpoint.remote(root, tag, **kwargs))[0]

    def export_hf(self, out_dir: str) -> None:
        self._all("export_hf", lambda a, r: a.export_hf.remote(out_dir))

    def logits(self, input_ids: list[int]):
        return self._all("logits", lambda a, r: a.logits.remote(input_ids))[0]

    def full_state_dict(self):
        """The consolidated weights (rank 0's answer; collective under ZeRO-3)."""
        return self._all("full_state_dict", lambda a, r: a.full_state_dict.remote())[0]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.own_bundles is not None:
            self.own_bundles.remove()
