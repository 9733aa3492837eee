"""Per-GPU memory planner for a run config: ``safer plan CONFIG --gpus-per-node G --nodes N --gpu-mem-gb M``.

The memory model (bytes per GPU for a model shape and a setup) is safer_dist/cluster/gpu_memory.py.

Where the actors go is safer_dist/cluster/placement.py's rule (`safer slurm submit` and the jobs
use the same), printed one line per phase; anything that does not fit — the placement, the
learners, a rollout worker — is listed in a last ``DOES NOT FIT:`` line and `safer plan` exits 3.
With rollout workers colocated on the learners' GPUs (``rollout.placement=colocate``) the GPU is
time-shared and a setup must fit twice: while the learners train (their total + the workers'
bf16 weights, which stay) and while the workers sample (the learners' model states and buffers,
which stay, + the workers' weights, KV cache and scoring logits). Where the optimizer states do
not fit next to the rollout side, the walk below reaches optimizer offload and says so.

The recommendation walks setups from fastest to leanest — ZeRO-2, ZeRO-3, then both with
gradient checkpointing, then optimizer offload (first without checkpointing, then with it),
then parameter offload — each at the
configured micro-batch or the largest smaller one that fits and divides the global batch,
and takes the first that fits with the configured micro-batch or with at least
``MIN_MICRO_BATCH_TOKENS`` tokens per micro-batch (else the fitting one with the largest
micro-batch). A smaller micro-batch only adds accumulation steps; checkpointing recomputes
the forward (~1/3 more compute) and offload moves the optimizer step to the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safer_dist.cluster.gpu_memory import (
    GIB, Adapters, Estimate, ModelShape, Setup, estimate, resolve_shape, rollout_bytes,
)
from safer_dist.cluster.placement import Cluster, Placement, advice, placement
from safer_dist.config import Config

USABLE_FRACTION = 0.9
# Below this many tokens a micro-batch underuses a GPU; the planner would rather checkpoint or
# shard more than shrink the micro-batch further.
MIN_MICRO_BATCH_TOKENS = 4096


# Fastest first. Offloading the optimizer only pays once the model states are what does not fit.
CANDIDATES = (
    (2, False, False, False), (3, False, False, False),
    (2, False, False, True), (3, False, False, True),
    (2, True, False, False), (3, True, False, False),
    (2, True, False, True), (3, True, False, True), (3, True, True, True),
)



@dataclass
class Plan:
    shape: ModelShape
    shape_source: str
    world_size: int
    gpus_per_node: int
    nodes: int
    gpu_mem_bytes: float
    max_seq_len: int
    mixed_precision: bool
    configured: Setup
    rows: list[tuple[Setup, Estimate]]
    recommended: tuple[Setup, Estimate] | None
    rollout: dict[str, float]
    lines: list[str]  # ERPO and rollout findings, notes
    placement: Placement | None = None
    # Colocated ERPO: rollout copies sharing each learner's GPU (0: separate placement). Their
    # weights stay while the learners train; their KV cache and scoring logits exist only while
    # sampling, when the learners hold their model states but no activations.
    colocated_copies: int = 0
    problems: list[str] = field(default_factory=list)  # what does not fit besides the learners
    adapters: Adapters | None = None  # model.lora (and model.quantization), as counted

    @property
    def usable_bytes(self) -> float:
        return USABLE_FRACTION * self.gpu_mem_bytes

    def fits(self, est: Estimate | float) -> bool:
        if not isinstance(est, Estimate):
            return est <= self.usable_bytes
        return self.training_peak(est) <= self.usable_bytes and self.sampling_peak(est) <= self.usable_bytes

    def training_peak(self, est: Estimate) -> float:
        """A learner's GPU while it trains: its total + the colocated rollout weights."""
        return est.total + self.colocated_copies * self.rollout["weights"]

    def sampling_peak(self, est: Estimate) -> float:
        """A learner's GPU while the colocated workers sample: learner model states and buffers +
        the workers' weights, KV cache and scoring logits (0 when not colocated)."""
        if not self.colocated_copies:
            return 0.0
        return est.model_states + est.buffers + self.colocated_copies * self.rollout["total"]

    @property
    def ok(self) -> bool:
        """Everything fits: the learners (some setup), the placement, the rollout workers."""
        return self.recommended is not None and not self.problems


def _recommend(plan: Plan, shape: ModelShape, configured: Setup, sizes: list[int], kw: dict):
    """Walk CANDIDATES (see the module docstring); appends the rows it looked at to plan.rows."""
    best = fallback = None
    adapters = kw.get("adapters")
    for stage, off_opt, off_par, ckpt in CANDIDATES:
        if stage == 3 and adapters is not None and adapters.quantized_4bit:
            continue  # a 4-bit base trains under ZeRO 0-2 only (config check)
        fits = False
        for m in [configured.micro_batch_size] + [m for m in sizes if m < configured.micro_batch_size]:
            setup = Setup(stage, off_opt, off_par, ckpt, m)
            est = estimate(shape, setup, **kw)
            fits = plan.fits(est)
            if setup != configured and (fits or m == configured.micro_batch_size):
                plan.rows.append((setup, est))
            if fits:
                break
        if not fits:
            continue
        if fallback is None or setup.micro_batch_size > fallback[0].micro_batch_size:
            fallback = (setup, est)
        if setup.micro_batch_size == configured.micro_batch_size or \
                setup.micro_batch_size * kw["max_seq_len"] >= MIN_MICRO_BATCH_TOKENS:
            best = (setup, est)
            break
    return best or fallback


def plan_config(cfg: Config, *, gpus_per_node: int, nodes: int, gpu_mem_gb: float, shape: str | None = None,
                stage: str = "run") -> Plan:
    """Estimate ``stage`` of ``cfg`` (``learner.num_learners`` learners, one GPU each) on ``nodes`` x
    ``gpus_per_node`` GPUs of ``gpu_mem_gb`` GiB and recommend a setup. Where the actors go is
    safer_dist/cluster/placement.py's rule, the same `safer slurm submit` applies; what does not
    fit is listed in ``Plan.problems`` (``Plan.ok`` is False). Raises ValueError on bad arguments
    or an unknown model shape."""
    if gpus_per_node < 1 or nodes < 1 or gpu_mem_gb <= 0:
        raise ValueError("--gpus-per-node and --nodes must be >= 1 and --gpu-mem-gb > 0")
    model_shape, source = resolve_shape(cfg.model.path, cfg.model.init_preset, shape)
    ln, t, e = cfg.learner, cfg.train, cfg.erpo
    world = ln.num_learners
    where = placement(cfg, stage, Cluster.uniform(nodes, gpus_per_node))
    phases = {p.name: p for p in where.phases}
    erpo = phases.get("erpo")
    mixed = cfg.model.dtype in ("auto", "bfloat16", "float16")  # auto is bf16 on CUDA
    seq = cfg.data.max_seq_len
    configured = Setup(ln.zero_stage, ln.offload_optimizer, ln.offload_params, cfg.model.gradient_checkpointing,
                       t.micro_batch_size)
    kw = dict(world_size=world, gpus_per_node=min(gpus_per_node, world), max_seq_len=seq, mixed_precision=mixed,
              loss_chunk_tokens=cfg.learner.loss_chunk_tokens, adapters=Adapters.from_config(cfg))
    tp = cfg.rollout.tensor_parallel
    rollout = rollout_bytes(model_shape, rows=cfg.rollout.batch_size, tokens_per_row=seq, tensor_parallel=tp)
    copies = len(erpo.actors) - 1 if erpo is not None and erpo.colocated else 0
    plan = Plan(model_shape, source, world, gpus_per_node, nodes, gpu_mem_gb * GIB, seq, mixed, configured, [], None,
                rollout, [], where, copies, adapters=kw["adapters"])
    plan.rows.append((configured, estimate(model_shape, configured, **kw)))
    # micro-batches that keep global_batch_size a multiple of micro_batch_size x learners
    sizes = [m for m in range(t.micro_batch_size, 0, -1) if t.global_batch_size % (m * world) == 0]
    plan.recommended = _recommend(plan, model_shape, configured, sizes, kw)

    out = plan.lines
    for ph in where.phases:
        out.append("placement " + ph.describe() + (f": DOES NOT FIT — {ph.problem}" if ph.problem else ": fits"))
    if not where.fits:
        plan.problems += where.problems()
        out.append("  " + advice(where))
    if plan.recommended is not None and erpo is not None:
        # an ERPO micro-batch of k pairs packs 2k sequences (prefix+chosen, prefix+rejected)
        base = plan.recommended[0]
        ok = [k for k in range(e.optim.micro_batch_size, 0, -1) if e.optim.global_batch_size % (k * world) == 0 and plan.fits(
            estimate(model_shape, Setup(base.zero_stage, base.offload_optimizer, base.offload_params,
                                        base.gradient_checkpointing, 2 * k), **kw))]
        if ok and ok[0] == e.optim.micro_batch_size:
            out.append(f"ERPO learners: erpo.optim.micro_batch_size={e.optim.micro_batch_size} pairs fits with the recommended setup")
        elif ok:
            out.append(f"ERPO learners: erpo.optim.micro_batch_size={e.optim.micro_batch_size} pairs does not fit; "
                       f"erpo.optim.micro_batch_size={ok[0]} does")
        else:
            out.append("ERPO learners: not even one pair per micro-batch fits; shorten data.max_seq_len")
            plan.problems.append("ERPO learners: not even one pair per micro-batch fits")
    _rollout_lines(plan, cfg, phases)
    load = 2.0 * model_shape.num_params()  # the 16-bit weights
    per_node = min(gpus_per_node, world)
    if ln.zero_stage == 3:  # safer_dist/train/partitioned_load.py
        out.append(f"note: load: ZeRO-3 learners build the model partitioned and each reads only its own 1/{world} of "
                   f"the weights from the checkpoint ({load / world / GIB:.1f} GiB in 16-bit): no GPU and no learner "
                   "process ever holds the whole model")
    else:
        out.append(f"note: load: each of the {per_node} learners of a node reads the full weights into host RAM "
                   f"(~{load * per_node / GIB:.1f} GiB per node in 16-bit), then moves them to its GPU"
                   + (f"; they ({load / GIB:.1f} GiB) do not fit on one GPU: learner.zero_stage=3 loads them "
                      "partitioned" if load > plan.usable_bytes else ""))
    return plan


def _rollout_lines(plan: Plan, cfg: Config, phases: dict) -> None:
    """What `safer eval`/`erpo`/`run` hold on a rollout worker's GPU, alone or colocated."""
    r, seq, g = plan.rollout, plan.max_seq_len, lambda b: f"{b / GIB:.1f}"  # noqa: E731
    ev = phases.get("eval")
    per_gpu = len(ev.actors) if ev is not None and ev.colocated else 1
    one = (f"weights {g(r['weights'])} + KV cache {g(r['kv_cache'])} ({cfg.rollout.batch_size} rows x {seq} tokens) "
           f"+ scoring logits {g(r['logits'])} = {g(r['total'])} GiB")
    if ev is not None or "erpo" in phases:
        fits = plan.fits(per_gpu * r["total"])
        copies = f"; {per_gpu} rollout groups share each GPU (judge model counted as the policy's size)" if per_gpu > 1 else ""
        tp = cfg.rollout.tensor_parallel
        what = ("bf16 copy, no tensor parallelism" if tp == 1 else
                f"bf16 copy sharded over {tp} GPUs of a node by tensor parallelism; per GPU")
        plan.lines.append(
            f"rollout worker ({what}): {one}{copies}: "
            + ("fits" if fits else f"DOES NOT FIT — `safer eval`/`erpo`/`run` cannot place this model on {tp} GPU(s); "
               "raise rollout.tensor_parallel (shards it over that many GPUs of a node) or use `safer sft`")
        )
        if not fits:
            plan.problems.append(f"a rollout worker does not fit on {tp} GPU(s) (rollout.tensor_parallel={tp})")
    if not plan.colocated_copies or plan.recommended is None:
        return
    setup, est = plan.recommended
    k = plan.colocated_copies
    plan.lines.append(
        f"colocated ERPO (learner and {k} rollout worker(s) time-share each GPU, {setup.label()}): training "
        f"{g(est.total)} learner + {g(k * r['weights'])} rollout weights = {g(plan.training_peak(est))} GiB; sampling "
        f"{g(est.model_states + est.buffers)} learner states + {g(k * r['total'])} rollout weights, KV cache and "
        f"scoring logits = {g(plan.sampling_peak(est))} GiB: fits"
        + (" (the learners' optimizer states live in host memory: learner.offload_optimizer=true)"
           if setup.offload_optimizer else "")
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plan(plan: Plan, config_path: str) -> str:
    s = plan.shape
    g = lambda b: f"{b / GIB:8.1f}"  # noqa: E731
    precision = "bf16 mixed precision (fp32 master weights, AdamW)" if plan.mixed_precision else "fp32, AdamW"
    if plan.adapters:
        a = plan.adapters
        precision += (f"; LoRA rank {a.rank} ({a.target_modules}): {_count(a.trainable(s))} trained, the base frozen"
                      + (" in 4-bit NF4" if a.quantized_4bit else ""))
    lines = [
        f"safer plan: {config_path}",
        f"model     {plan.shape_source}: {_count(s.num_params())} parameters (largest layer "
        f"{_count(s.largest_layer_params())}), hidden {s.hidden_size}, {s.num_layers} layers, "
        f"{s.num_heads}/{s.num_kv_heads} heads, vocab {s.vocab_size}; {precision}",
        f"cluster   {plan.nodes} node(s) x {plan.gpus_per_node} GPUs, {plan.world_size} learners (one GPU each); "
        f"{plan.gpu_mem_bytes / GIB:.0f} GiB per GPU, {plan.usable_bytes / GIB:.1f} usable",
        f"batch     packed micro-batch = micro_batch_size x data.max_seq_len {plan.max_seq_len} tokens (worst case)",
        "",
        f"per GPU, GiB {'':46s}  params    grads   optim  gathered  states  buffers  activ.  logits    total",
    ]
    for i, (setup, est) in enumerate(plan.rows):
        tag = "config" if i == 0 else ("recommended" if plan.recommended and setup == plan.recommended[0] else "")
        fits = "fits" if plan.fits(est) else "DOES NOT FIT"
        lines.append(
            f"{tag:<12s} {setup.label():<46s}{g(est.params)}{g(est.grads)}{g(est.optimizer)}{g(est.gathered)}  "
            f"{g(est.model_states)}{g(est.buffers)}{g(est.activations)}{g(est.logits)} {g(est.total)}  {fits}"
        )
        if est.cpu_per_node:
            lines.append(f"{'':12s} {'':46s}offloaded to host RAM: {est.cpu_per_node / GIB:.1f} GiB per node")
    if any(est.step_only for _, est in plan.rows):
        lines.append("total: the peak of the backward (activations, logits) or of the optimizer step (ZeRO-1/2's fp32 "
                     "gradients, part of grads), whichever is larger")
    lines.append("")
    if plan.recommended is None:
        shared = (f" with {plan.colocated_copies} colocated rollout worker(s) on each learner's GPU (or use "
                  "rollout.placement=separate)") if plan.colocated_copies else ""
        lines.append("recommendation: nothing fits, even ZeRO-3 with parameter and optimizer offload at micro-batch 1"
                     f"{shared}: use more GPUs, a shorter data.max_seq_len, or GPUs with more memory")
    else:
        setup, est = plan.recommended
        same = setup == plan.configured
        lines.append(f"recommendation: {setup.label()} -> {est.total / GIB:.1f} GiB per GPU"
                     + (" (the config as it is)" if same else ""))
        if not same:
            lines.append(f"  overrides: {setup.overrides()}")
    lines += plan.lines
    if plan.problems:
        lines.append("DOES NOT FIT: " + "; ".join(plan.problems))
    return "\n".join(lines)
