"""Where a stage's Ray actors go, and whether they fit: the one rule that `safer plan`, `safer
slurm submit`, the host-memory estimate, the jobs and the Ray groups all use.

A stage runs phases one after another; each places its actors, runs, and releases them::

    stage  phases  actors of the phase
    sft    sft     learners
    eval   eval    policy rollout (+ judge rollout, judge.kind=model or classifier)
    erpo   erpo    learners + policy rollout (+ judge rollout, judge.kind=model or classifier)
                   (+ SFT-reference rollout, erpo.reference=sft without LoRA adapters)
    run    sft, eval, erpo (erpo.iterations > 0); the second evaluation places as the first

Learners: ``learner.num_learners`` actors of ``learner.cpus_per_learner`` CPUs and, where
learners get GPUs (:func:`learner_gpus`), one GPU each. Each rollout group:
``rollout.num_workers`` actors of ``rollout.cpus_per_worker`` CPUs, on GPUs where learners are.

``rollout.placement`` (:func:`resolve_mode`):

- ``separate``: each group has a placement group of its own, one bundle per actor
  (``{CPU: c, GPU: 1}``); the learners' strategy is ``learner.placement``, rollout groups PACK.
- ``colocate``: the phase has one shared placement group of ``max(learners, workers)`` bundles
  (strategy ``learner.placement``); bundle i holds learner i and worker i of every rollout
  group, where they exist. Its one GPU is shared: each of the ``k`` kinds of actor in the phase
  takes ``1/k`` of it (learner 0.5 + worker 0.5 in ERPO with the rule judge); its CPUs are the
  sum of its actors'. A colocated phase needs no more GPUs than its largest group has actors.
- ``auto``: colocate where learners get GPUs, separate on CPU (as before this option existed:
  the CPU demo and its tests place rollout workers apart from the learners).

``rollout.tensor_parallel`` K > 1 (safer_dist/rollout/tensor_parallel.py): every rollout worker (of
every rollout group: policy, model judge, SFT reference) is K rank actors on K devices of one
node. Each such worker gets a placement group of its own, K bundles ``{CPU: c, GPU: 1}`` (GPU
where learners get GPUs) with strategy STRICT_PACK, so its ranks are on one node whatever the
learners' strategy. Tensor-parallel workers are always placed separately: ``auto`` resolves to
``separate``, and ``rollout.placement=colocate`` with K > 1 is refused when the config is
checked (a shared bundle holds one actor of each kind, and Ray cannot keep K chosen bundles of
one shared placement group on one node). So ERPO with K > 1 needs ``learner.num_learners +
groups x rollout.num_workers x K`` GPUs, and K free GPUs on one node for each worker.

Whether a phase fits is decided by placing its placement groups, in order, on the cluster's
nodes the way Ray's strategies do (:func:`_place`); the first that does not fit is named with
what it needs and what is free. Every caller asks :func:`placement` and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from safer_dist.config import Config, ConfigError, RolloutSection

ROLES = {"learner": "learner", "rollout": "policy rollout", "judge": "judge-model rollout",
         "reference": "SFT-reference rollout"}


class PlacementError(ConfigError):
    """A stage's actors cannot be placed on the cluster (exit code 2 from the CLI)."""


@dataclass(frozen=True)
class Cluster:
    """Nodes as (GPUs, CPUs); CPUs None: not limited (`safer plan`, or SLURM's default ask)."""

    nodes: tuple[tuple[int, float | None], ...]
    source: str

    @classmethod
    def uniform(cls, nodes: int, gpus_per_node: int, cpus_per_node: float | None = None) -> Cluster:
        cpus = f" --cpus-per-node {cpus_per_node:g}" if cpus_per_node is not None else ""
        return cls(((gpus_per_node, cpus_per_node),) * nodes,
                   f"--nodes {nodes} --gpus-per-node {gpus_per_node}{cpus}")

    @classmethod
    def from_ray(cls) -> Cluster:
        """The alive nodes of the Ray cluster this process joined (their total resources)."""
        import ray

        nodes = tuple((int(n["Resources"].get("GPU", 0)), float(n["Resources"].get("CPU", 0)))
                      for n in ray.nodes() if n.get("Alive"))
        return cls(nodes, "the Ray cluster")

    @property
    def num_gpus(self) -> int:
        return sum(g for g, _ in self.nodes)


@dataclass(frozen=True)
class Actors:
    """One group's actors: each takes ``cpus`` and ``gpus`` (a fraction when colocated) of
    bundle ``bundles[i]`` of the phase's placement group number ``group``."""

    role: str  # learner | rollout | judge | reference
    count: int
    cpus: float
    gpus: float
    group: int
    bundles: tuple[int, ...]
    # Ranks per actor (rollout.tensor_parallel): with K > 1, actor i is K processes, rank r in
    # bundle ``bundles[r]`` of placement group ``group + i`` (one STRICT_PACK group per worker).
    tensor_parallel: int = 1

    @property
    def processes(self) -> int:
        return self.count * self.tensor_parallel


@dataclass(frozen=True)
class BundleGroup:
    """A placement group: its bundles, its strategy, and the roles in each bundle."""

    name: str
    bundles: tuple[dict[str, float], ...]
    strategy: str
    members: tuple[tuple[str, ...], ...]
    keys: str = ""  # the config fields that size it, for messages

    def describe(self) -> str:
        kinds: dict[str, int] = {}
        for b in self.bundles:
            key = ", ".join(f"{k}={v:g}" for k, v in sorted(b.items(), key=lambda kv: kv[0] != "GPU"))
            kinds[key] = kinds.get(key, 0) + 1
        return " + ".join(f"{{{k}}} x {n}" for k, n in kinds.items())


@dataclass
class Phase:
    name: str  # sft | eval | erpo
    actors: dict[str, Actors]
    groups: list[BundleGroup]
    colocated: bool
    # Where the simulation put the bundles: per node, the roles' actor counts; None when unplaced.
    nodes: list[dict[str, int]] | None = None
    problem: str | None = None

    @property
    def num_gpus(self) -> int:
        return sum(int(b.get("GPU", 0)) for g in self.groups for b in g.bundles)

    @property
    def num_cpus(self) -> float:
        return sum(b.get("CPU", 0) for g in self.groups for b in g.bundles)

    def describe(self) -> str:
        parts = [f"{a.count} {ROLES[a.role]} actor(s)" + (f" of {a.tensor_parallel} tensor-parallel ranks on one node"
                                                          if a.tensor_parallel > 1 else "")
                 + f" x {_res(a.gpus, a.cpus)}" for a in self.actors.values()]
        how = ("colocated in shared bundles" if self.colocated else
               "separate bundles" if len(self.actors) > 1 else "a bundle each")
        return f"{self.name}: {' + '.join(parts)} ({how}) = {self.num_gpus} GPU(s), {self.num_cpus:g} CPU(s)"


@dataclass
class Placement:
    stage: str
    cluster: Cluster
    gpu: bool  # learners (and rollout workers) get GPUs
    mode: str  # colocate | separate
    phases: list[Phase] = field(default_factory=list)
    tensor_parallel: int = 1  # rollout.tensor_parallel

    @property
    def fits(self) -> bool:
        return all(p.problem is None for p in self.phases)

    def problems(self) -> list[str]:
        return [f"{p.name}: {p.problem}" for p in self.phases if p.problem]

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def check(self) -> None:
        """PlacementError naming what does not fit, if anything."""
        if not self.fits:
            raise PlacementError(
                f"the {self.stage} stage cannot be placed on {self.cluster.source} (rollout.placement={self.mode}): "
                + "; ".join(self.problems()) + ". " + advice(self)
            )

    def max_cpus(self) -> float:
        return max((p.num_cpus for p in self.phases), default=0.0)


def learner_gpus(cfg: Config, cluster: Cluster) -> int:
    """GPUs per learner: learner.gpus_per_learner, ``auto`` being 1 where the cluster has GPUs
    (and launch.device is not cpu)."""
    if cfg.learner.gpus_per_learner == "auto":
        return int(cfg.launch.device != "cpu" and cluster.num_gpus > 0)
    return int(cfg.learner.gpus_per_learner)


def resolve_mode(cfg: Config, gpu: bool) -> str:
    """rollout.placement with ``auto`` resolved: colocate on GPUs, separate on CPU or with
    tensor-parallel rollout workers (rollout.tensor_parallel > 1, which the config check does
    not let be colocated)."""
    mode = cfg.rollout.placement
    if mode != "auto":
        return mode
    return "colocate" if gpu and cfg.rollout.tensor_parallel == 1 else "separate"


def stage_phases(cfg: Config, stage: str) -> list[str]:
    if stage == "run":
        return ["sft", "eval"] + (["erpo"] if cfg.erpo.iterations > 0 else [])
    if stage not in ("sft", "eval", "erpo"):
        raise ValueError(f"stage must be run, sft, eval or erpo (got {stage!r})")
    return [stage]


def phase_roles(cfg: Config, phase: str) -> list[str]:
    """The actor groups a phase places, as jobs.py creates them."""
    if phase == "sft":
        return ["learner"]
    roles = ["learner"] if phase == "erpo" else []
    roles.append("rollout")
    if cfg.judge.kind in ("model", "classifier"):  # a judge model on rollout workers of its own
        roles.append("judge")
    if phase == "erpo" and cfg.erpo.reference == "sft" and not cfg.model.lora.enabled:
        roles.append("reference")  # LoRA learners are the reference themselves, adapters off
    return roles


def placement(cfg: Config, stage: str, cluster: Cluster) -> Placement:
    """What every phase of ``stage`` places on ``cluster``, and whether it fits."""
    gpu = bool(learner_gpus(cfg, cluster))
    out = Placement(stage, cluster, gpu, resolve_mode(cfg, gpu), tensor_parallel=cfg.rollout.tensor_parallel)
    for name in stage_phases(cfg, stage):
        ph = _phase(cfg, name, gpu, out.mode == "colocate")
        ph.nodes, ph.problem = _place(ph.groups, cluster)
        out.phases.append(ph)
    return out


def require_placement(cfg: Config, stage: str, cluster: Cluster | None = None) -> Placement:
    """:func:`placement` on ``cluster`` (default: the Ray cluster joined); PlacementError when it does not fit."""
    p = placement(cfg, stage, cluster or Cluster.from_ray())
    p.check()
    return p


def _phase(cfg: Config, name: str, gpu: bool, colocate: bool) -> Phase:
    lr, ro = cfg.learner, cfg.rollout
    roles = phase_roles(cfg, name)
    counts = {r: lr.num_learners if r == "learner" else ro.num_workers for r in roles}
    cpus = {r: float(lr.cpus_per_learner if r == "learner" else ro.cpus_per_worker) for r in roles}
    if colocate and len(roles) > 1:
        width = max(counts.values())
        share = math.floor(10_000 / len(roles)) / 10_000 if gpu else 0.0  # Ray keeps 4 decimals
        members = tuple(tuple(r for r in roles if i < counts[r]) for i in range(width))
        bundles = tuple({"CPU": sum(cpus[r] for r in m), **({"GPU": 1.0} if gpu else {})} for m in members)
        strategy = lr.placement if "learner" in roles else "PACK"
        groups = [BundleGroup("shared (colocated)", bundles, strategy, members, ", ".join(_keys(cfg, r) for r in roles))]
        actors = {r: Actors(r, counts[r], cpus[r], share, 0, tuple(range(counts[r]))) for r in roles}
        return Phase(name, actors, groups, True)
    groups, actors = [], {}
    for r in roles:
        if r != "learner" and ro.tensor_parallel > 1:
            grps, actors[r] = _tensor_parallel(r, ROLES[r], counts[r], cpus[r], gpu, ro.tensor_parallel,
                                               _keys(cfg, r), len(groups))
            groups += grps
            continue
        strategy = lr.placement if r == "learner" else "PACK"
        grp, actors[r] = _own(r, ROLES[r], counts[r], cpus[r], gpu, strategy, _keys(cfg, r), len(groups))
        groups.append(grp)
    return Phase(name, actors, groups, False)


def own_phase(role: str, name: str, count: int, cpus: float, gpu: bool, keys: str, tensor_parallel: int = 1) -> Phase:
    """One group alone in placement groups of its own (PACK; STRICT_PACK per worker of
    ``tensor_parallel`` > 1 ranks): a rollout group made outside a job's phase (tests, synthesis)."""
    if tensor_parallel > 1:
        groups, actors = _tensor_parallel(role, name, count, cpus, gpu, tensor_parallel, keys, 0)
        return Phase(name, {role: actors}, groups, False)
    grp, actors = _own(role, name, count, cpus, gpu, "PACK", keys, 0)
    return Phase(name, {role: actors}, [grp], False)


def _tensor_parallel(role: str, name: str, count: int, cpus: float, gpu: bool, k: int, keys: str,
                     index: int) -> tuple[list[BundleGroup], Actors]:
    """``count`` tensor-parallel workers: a STRICT_PACK placement group of ``k`` bundles each
    (one per rank, ``cpus`` CPUs and one GPU), so a worker's ranks share a node."""
    bundle = {"CPU": cpus, **({"GPU": 1.0} if gpu else {})}
    groups = [BundleGroup(f"{name} worker {w}", (bundle,) * k, "STRICT_PACK", ((role,),) * k, keys)
              for w in range(count)]
    return groups, Actors(role, count, cpus, 1.0 if gpu else 0.0, index, tuple(range(k)), k)


def _own(role: str, name: str, count: int, cpus: float, gpu: bool, strategy: str, keys: str,
         index: int) -> tuple[BundleGroup, Actors]:
    """A separate group: one bundle of ``cpus`` CPUs (and one GPU) per actor."""
    bundle = {"CPU": cpus, **({"GPU": 1.0} if gpu else {})}
    grp = BundleGroup(name, (bundle,) * count, strategy, ((role,),) * count, keys)
    return grp, Actors(role, count, cpus, 1.0 if gpu else 0.0, index, tuple(range(count)))


def _keys(cfg: Config, role: str) -> str:
    lr = cfg.learner
    if role == "learner":
        return f"learner.num_learners={lr.num_learners}, learner.cpus_per_learner={lr.cpus_per_learner}"
    return f"{ROLES[role]}: {rollout_keys(cfg.rollout)}"


def rollout_keys(ro: RolloutSection) -> str:
    """The config fields that size a rollout group, as messages name them."""
    tp = f", rollout.tensor_parallel={ro.tensor_parallel}" if ro.tensor_parallel > 1 else ""
    return f"rollout.num_workers={ro.num_workers}, rollout.cpus_per_worker={ro.cpus_per_worker}{tp}"


def _place(groups: list[BundleGroup], cluster: Cluster) -> tuple[list[dict[str, int]] | None, str | None]:
    """Place ``groups`` in order on ``cluster`` as Ray's strategies would (greedily): per node,
    the actor count of each role; or None and what does not fit."""
    free = [[float(g), math.inf if c is None else float(c)] for g, c in cluster.nodes]
    load: list[dict[str, int]] = [{} for _ in free]
    for grp in groups:
        nodes = _assign(grp, free)
        if nodes is None:
            return None, (f"the {grp.name} placement group ({grp.keys}) needs {grp.describe()} ({grp.strategy}); "
                          f"the cluster has {_free(free)} free")
        for b, n, m in zip(grp.bundles, nodes, grp.members):
            free[n][0] -= b.get("GPU", 0)
            free[n][1] -= b.get("CPU", 0)
            for role in m:
                load[n][role] = load[n].get(role, 0) + 1
    return load, None


def _assign(grp: BundleGroup, free: list[list[float]]) -> list[int] | None:
    """A node for each bundle of ``grp`` given what is ``free``, or None."""
    need = lambda b: (b.get("GPU", 0), b.get("CPU", 0))  # noqa: E731
    total = (sum(need(b)[0] for b in grp.bundles), sum(need(b)[1] for b in grp.bundles))
    if grp.strategy in ("PACK", "STRICT_PACK"):
        for n, (g, c) in enumerate(free):
            if total[0] <= g + 1e-9 and total[1] <= c + 1e-9:
                return [n] * len(grp.bundles)
        if grp.strategy == "STRICT_PACK":
            return None
    left = [list(f) for f in free]
    used: list[int] = []
    for b in grp.bundles:
        g, c = need(b)
        ok = [n for n, (fg, fc) in enumerate(left) if g <= fg + 1e-9 and c <= fc + 1e-9
              and not (grp.strategy == "STRICT_SPREAD" and n in used)]
        if not ok:
            return None
        # PACK fills the first node with room; SPREAD takes the node with fewest of this group's bundles
        n = ok[0] if grp.strategy == "PACK" else min(ok, key=lambda k: (used.count(k), k))
        left[n][0] -= g
        left[n][1] -= c
        used.append(n)
    return used


def _free(free: list[list[float]]) -> str:
    def one(g: float, c: float) -> str:
        return f"GPU={g:g}" + ("" if math.isinf(c) else f", CPU={c:g}")

    total = one(sum(g for g, _ in free), sum(c for _, c in free))
    if len(free) == 1:
        return total
    return f"{total} on {len(free)} nodes ({'; '.join(one(g, c) for g, c in free)})"


def _res(gpus: float, cpus: float) -> str:
    return (f"GPU={gpus:g}, " if gpus else "") + f"CPU={cpus:g}"


@dataclass(frozen=True)
class Slots:
    """Where one group's actors go at run time: bundle ``bundles[i]`` of the ready placement
    group ``pg`` for actor i, which asks for ``cpus`` CPUs and ``gpus`` GPUs (a fraction when
    the bundle is shared). Tensor-parallel workers (``worker_pgs``: one placement group per
    worker): rank r of worker i goes to bundle ``bundles[r]`` of ``worker_pgs[i]``."""

    pg: Any
    bundles: tuple[int, ...]
    cpus: float
    gpus: float
    worker_pgs: tuple[Any, ...] = ()

    def options(self, i: int, rank: int = 0) -> dict:
        """``.options(...)`` of a Ray actor class for actor ``i`` (its rank ``rank`` when tensor-parallel)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg, index = (self.worker_pgs[i], self.bundles[rank]) if self.worker_pgs else (self.pg, self.bundles[i])
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "scheduling_strategy":
                PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


class PhaseBundles:
    """The placement groups of one phase, created at once and ready (or PlacementError naming
    what is missing within ``timeout_s``); :meth:`slots` hands each group its share. The owner
    calls :meth:`remove` when the phase ends."""

    def __init__(self, phase: Phase, timeout_s: float, timeout_key: str):
        import ray
        from ray.util.placement_group import placement_group

        self.phase = phase
        self.pgs = [placement_group(list(g.bundles), strategy=g.strategy) for g in phase.groups]
        try:
            for grp, pg in zip(phase.groups, self.pgs):
                ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
                if not ready:
                    raise PlacementError(
                        f"the {grp.name} placement group needs {grp.describe()} ({grp.strategy}) and was not ready "
                        f"within {timeout_key}={timeout_s:g} s; the Ray cluster has {ray_free()} free"
                    )
        except BaseException:
            self.remove()
            raise

    def slots(self, role: str) -> Slots:
        a = self.phase.actors[role]
        workers = tuple(self.pgs[a.group : a.group + a.count]) if a.tensor_parallel > 1 else ()
        return Slots(self.pgs[a.group], a.bundles, a.cpus, a.gpus, workers)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs:
            remove_placement_group(pg)
        self.pgs = []


def ray_free() -> str:
    """GPUs and CPUs the Ray cluster has free now."""
    import ray

    free = ray.available_resources()
    return ", ".join(f"{k}={free.get(k, 0):g}" for k in ("GPU", "CPU"))


def advice(p: Placement) -> str:
    if p.gpu and p.cluster.num_gpus == 0:
        return "learner.gpus_per_learner=1 needs GPUs and the cluster has none: set learner.gpus_per_learner=auto or 0"
    if p.gpu and p.tensor_parallel > 1:
        return (f"rollout.tensor_parallel={p.tensor_parallel} places each rollout worker on that many GPUs of one "
                "node, apart from the learners (tensor-parallel workers are never colocated): lower "
                "learner.num_learners, rollout.num_workers or rollout.tensor_parallel, or ask for more GPUs")
    if p.gpu and p.mode == "separate":
        return ("Use rollout.placement=colocate (rollout workers share the learners' GPUs), or lower "
                "learner.num_learners or rollout.num_workers, or ask for more GPUs")
    if p.gpu:
        return "Lower learner.num_learners or rollout.num_workers, or ask for more GPUs"
    return ("Lower learner.num_learners, rollout.num_workers, learner.cpus_per_learner or rollout.cpus_per_worker, "
            "or give the cluster more CPUs (launch.num_cpus, --cpus-per-node)")
