"""`safer slurm submit`: render the batch script into the run dir and hand it to ``sbatch``.

::

    safer slurm submit CONFIG [overrides] --nodes N --gpus-per-node G [--cpus-per-node C]
        [--mem M] [--partition P] [--time T] [--account A] [--exclusive] [--grace-s S]
        [--stage run|sft|erpo] [--dry-run]

    submit host                          allocation (first node runs the batch script)
      load_config(CONFIG, overrides)       slurm/sbatch.template.sh, rendered
      check it fits N x (G GPUs, C CPUs)     slurm/ray-cluster.sh: Ray head + workers (srun),
      --mem: host memory per node              each node's Ray on its own ports,
        (cluster/host_memory.py)               poll until every node joined
      mkdir <run>/slurm/
      write <run>/slurm/<stage>.sbatch.sh    <venv>/bin/python -m launcher <stage> CONFIG
      sbatch --parsable ... -> job id            overrides... launch.ray_address=auto
                                             exit 75 (checkpointed on USR1/TERM) -> requeue;
                                             the requeued job resumes (checkpoint.resume=auto)

The config is validated here, before the job waits in a queue. Paths in the script are
absolute; the job runs in the submit directory (``sbatch --chdir``), so relative paths (in the
file: against its directory; in overrides: against the current one) mean the same thing in the
job as here — the directories must be on a filesystem every node sees. The scripts come from
the checkout or, in an installed safer, from its package data (safer_dist/runtime/resources.py).
docs/slurm.md has the whole story.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from safer_dist.cluster.host_memory import host_memory
from safer_dist.cluster.placement import Cluster, Placement, placement
from safer_dist.config import Config, ConfigError, load_config
from safer_dist.runtime.io import atomic_write_text
from safer_dist.runtime.resources import shipped_root

# Holds slurm/ (and configs/): the checkout, or an installed package's data.
REPO = shipped_root()
TEMPLATE = REPO / "slurm" / "sbatch.template.sh"
STAGES = ("run", "sft", "erpo")
_PLACEHOLDER = re.compile(r"{{(\w+)}}")
_SLURM_MEM = re.compile(r"\d+[KMGTkmgt]?")  # sbatch --mem: a size, megabytes without a unit; 0 is the whole node
# Seconds added to launch.stop_grace_s for the default --grace-s: stopping Ray and requeueing
# come after the checkpoint, and SLURM may send the signal up to a minute late.
_GRACE_MARGIN_S = 60


@dataclass
class SubmitOptions:
    """What to ask SLURM for; the CLI's ``slurm submit`` flags."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int | None = None  # None: enough for the Ray actors of the stage
    mem: str | None = None  # sbatch --mem per node; None: the host-memory estimate (0 with exclusive)
    partition: str | None = None
    time: str | None = None  # None: the partition's default limit
    account: str | None = None
    exclusive: bool = False
    grace_s: int | None = None  # None: launch.stop_grace_s + 60
    stage: str = "run"
    job_name: str | None = None  # None: safer-<run.name>
    venv: str | None = None  # None: the environment of this Python (sys.prefix)
    shape: str | None = None  # the --mem estimate's model shape (as `safer plan --shape`); None: model.path's


@dataclass
class Submission:
    """A rendered job: the script, where it goes, and the driver command inside it."""

    script: str
    script_path: Path
    log_path: Path  # with SLURM's %j for the job id
    run_dir: Path
    command: list[str]


def render_template(values: Mapping[str, object], template: str | None = None) -> str:
    """``{{name}}`` -> ``values[name]``. Every placeholder must have a value.

    The rendered script is what a user reads: full-line comments (the template's notes for its
    maintainers) are left out, except the first line (``#!``), ``#SBATCH`` lines and ``## ``
    lines, which are kept as ``# `` (the header). A ``#SBATCH`` or ``##`` line whose
    placeholder renders to "" is dropped (that is how optional lines work). Runs of blank lines
    left behind become one."""
    text = TEMPLATE.read_text() if template is None else template
    missing = sorted({n for n in _PLACEHOLDER.findall(text) if n not in values})
    if missing:
        raise ValueError(f"{TEMPLATE.name}: no value for placeholder(s) {', '.join(missing)}")
    out: list[str] = []
    for i, line in enumerate(text.splitlines()):
        names = _PLACEHOLDER.findall(line)
        header = line == "##" or line.startswith("## ")
        if (line.startswith("#SBATCH") or header) and any(str(values[n]) == "" for n in names):
            continue
        if header:
            line = line[1:]
        elif line.lstrip().startswith("#") and not line.startswith("#SBATCH") and i > 0:
            continue
        if line.strip() == "" and (not out or out[-1].strip() == ""):
            continue
        out.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(out) + "\n"


def default_venv() -> Path:
    """The environment this ``safer`` runs from: a virtualenv or a conda env (both have bin/python)."""
    return Path(sys.prefix)


def driver_command(venv: Path, stage: str, config_path: Path, overrides: list[str]) -> list[str]:
    """The job's driver: the same config and overrides, joining the allocation's Ray cluster."""
    return [str(venv / "bin" / "python"), "-m", "launcher", stage, str(config_path), *overrides,
            "launch.ray_address=auto"]


def stage_placement(cfg: Config, opts: SubmitOptions) -> Placement:
    """Where the stage's Ray actors go on the allocation (safer_dist/cluster/placement.py), with
    the CPUs per node it asks for (:func:`cpus_per_node`)."""
    return placement(cfg, opts.stage, Cluster.uniform(opts.nodes, opts.gpus_per_node, cpus_per_node(cfg, opts)))


def check_fits(cfg: Config, opts: SubmitOptions) -> None:
    """PlacementError when the stage's Ray actors cannot be placed on the allocation (they would
    otherwise wait in the job and then fail): the same rule as `safer plan`."""
    stage_placement(cfg, opts).check()


def cpus_per_node(cfg: Config, opts: SubmitOptions) -> int:
    """--cpus-per-node, or by default the fewest CPUs per node (at least what the stage's actors
    need, spread evenly over the nodes) on which the stage's actors can be placed."""
    if opts.cpus_per_node is not None:
        return opts.cpus_per_node
    need = math.ceil(placement(cfg, opts.stage, Cluster.uniform(opts.nodes, opts.gpus_per_node)).max_cpus())
    for cpus in range(max(1, math.ceil(need / opts.nodes)), need + 1):
        if placement(cfg, opts.stage, Cluster.uniform(opts.nodes, opts.gpus_per_node, cpus)).fits:
            return cpus
    return max(1, math.ceil(need / opts.nodes))  # it does not fit for another reason (GPUs): check_fits names it


def check_model_path(cfg: Config, cwd: Path):
    """ConfigError when model.path holds no Hugging Face model and no init preset would create it;
    ValueError when its tokenizer does not load or has no chat template (the check `safer run`
    makes, :func:`safer_dist.jobs.check_chat_template`): the job would otherwise fail only once
    it leaves the queue. (The path must be on a filesystem the nodes share; this host sees it as
    they will.) Returns the tokenizer, or None where the job creates the model."""
    path = cwd / cfg.model.path
    if not (path / "config.json").is_file():
        if cfg.model.init_preset:
            return None  # the job creates the model, with its tokenizer and template
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ConfigError(f"model.path={path} {what}: no Hugging Face model for the job to load; point model.path at "
                          "a local model directory (models load only from local directories) before submitting")
    from safer_dist.jobs import check_chat_template  # loads transformers: only when there is a model to check

    return check_chat_template(path, f"model.path={path}", cfg.model.trust_remote_code)


def time_note(cfg: Config, opts: SubmitOptions, tokenizer, model_dir: Path) -> str:
    """The header's ``--time`` line when --time is not given: SFT's duration on the learners'
    GPUs at the measured speed (:mod:`safer_dist.cluster.walltime`), where there is an SFT stage,
    GPUs, a model and data to count; else ""."""
    from safer_dist.cluster.gpu_memory import resolve_shape
    from safer_dist.cluster.walltime import sft_time_hint

    if opts.time is not None or opts.stage == "erpo" or opts.gpus_per_node == 0 or tokenizer is None:
        return ""
    if not Path(cfg.data.train).is_file():
        return ""
    shape, _ = resolve_shape(str(model_dir), cfg.model.init_preset, opts.shape)
    gpus = min(cfg.learner.num_learners, opts.nodes * opts.gpus_per_node)
    hint = sft_time_hint(cfg, tokenizer, shape.num_params(), gpus)
    return f"not given (the partition's default limit applies). {hint.note}; e.g. --time {hint.slurm_time()}"


# The submitting shell's variables that decide how the job runs (collectives, CUDA, the Hugging
# Face cache and offline mode). The script re-exports them, so resubmitting it from a fresh shell
# runs the job the same way. CUDA_VISIBLE_DEVICES is SLURM's to set per job; credentials are never
# written into a file.
_RECORDED_ENV = re.compile(r"(NCCL|CUDA|HF)_\w+")
_NOT_RECORDED = {"CUDA_VISIBLE_DEVICES"}
_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|KEY")


def recorded_environment(env: Mapping[str, str]) -> tuple[str, dict[str, str], list[str]]:
    """(loaded modules as ``$LOADEDMODULES`` lists them, the NCCL_*/CUDA_*/HF_* variables the
    script re-exports, the names of those left out as credentials)."""
    names = sorted(k for k in env if _RECORDED_ENV.fullmatch(k) and k not in _NOT_RECORDED)
    secret = [k for k in names if _SECRET.search(k)]
    return env.get("LOADEDMODULES", ""), {k: env[k] for k in names if k not in secret}, secret


def environment_values(env: Mapping[str, str]) -> dict[str, str]:
    """The template's ``modules``, ``env_exports`` and ``env_note`` for the submitting ``env``."""
    modules, exported, secret = recorded_environment(env)
    note = f"modules {modules or 'none'}; " + (", ".join(exported) or "no NCCL_*, CUDA_* or HF_* variables")
    if secret:
        note += f" (not recorded: {', '.join(secret)})"
    return {"modules": shlex.quote(modules), "env_note": note,
            "env_exports": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in exported.items())}


def job_memory(cfg: Config, opts: SubmitOptions, model_dir: Path) -> tuple[str, str]:
    """(``--mem`` value, where it comes from): --mem as given; 0 (all of each node's memory) with
    --exclusive; else the host-memory estimate for the fullest node."""
    if opts.mem is not None:
        if not _SLURM_MEM.fullmatch(opts.mem):
            raise ValueError(f"--mem {opts.mem!r}: a size like 64G, 500M or 0 (all of each node's memory)")
        return opts.mem, "as given (--mem)"
    if opts.exclusive:
        return "0", "all of each node's memory (--exclusive)"
    try:
        mem = host_memory(cfg, nodes=opts.nodes, gpus_per_node=opts.gpus_per_node,
                          cpus_per_node=cpus_per_node(cfg, opts), stage=opts.stage, model_dir=model_dir,
                          shape=opts.shape)
    except ValueError as e:
        raise ConfigError(f"cannot estimate the job's host memory ({e}); pass --mem, e.g. --mem 64G") from None
    return mem.slurm_mem(), f"estimated: {mem.describe()}"


def prepare(config_path: str | Path, overrides: list[str], opts: SubmitOptions, *, cwd: Path | None = None,
            env: Mapping[str, str] | None = None) -> Submission:
    """Validate the config and the request and render the script, which records ``env`` (the
    submitting shell's, :func:`recorded_environment`; default ``os.environ``). Writes nothing."""
    if opts.stage not in STAGES:
        raise ValueError(f"--stage must be one of {', '.join(STAGES)} (got {opts.stage!r})")
    if opts.nodes < 1:
        raise ValueError("--nodes must be >= 1")
    if opts.gpus_per_node < 0:
        raise ValueError("--gpus-per-node must be >= 0")
    if opts.cpus_per_node is not None and opts.cpus_per_node < 1:
        raise ValueError("--cpus-per-node must be >= 1")
    cwd = (cwd or Path.cwd()).resolve()
    config_path = (cwd / config_path).resolve()
    cfg = load_config(config_path, [*overrides, "launch.ray_address=auto"])
    tokenizer = check_model_path(cfg, cwd)
    check_fits(cfg, opts)
    stop_grace_s = math.ceil(cfg.launch.stop_grace_s)
    grace_s = opts.grace_s if opts.grace_s is not None else stop_grace_s + _GRACE_MARGIN_S
    if grace_s <= stop_grace_s:
        raise ValueError(
            f"--grace-s {grace_s} must exceed launch.stop_grace_s ({cfg.launch.stop_grace_s:g}): the signal comes "
            "grace_s before the time limit, and the driver may take stop_grace_s to checkpoint"
        )
    venv = Path(opts.venv).resolve() if opts.venv else default_venv()
    if not (venv / "bin" / "python").exists():
        raise ValueError(f"{venv}/bin/python not found: --venv must be a virtualenv or conda env with safer installed")
    run_dir = (cwd / cfg.run.dir).resolve()
    slurm_dir = run_dir / "slurm"
    script_path = slurm_dir / f"{opts.stage}.sbatch.sh"
    log_path = slurm_dir / "job-%j.log"
    for what, p in (("run dir", run_dir), ("checkout", REPO), ("environment", venv)):
        if re.search(r"[\s'\"\\$`]", str(p)):
            raise ValueError(f"the {what} path {str(p)!r} has whitespace, quotes or '$'; the batch script needs a plain path")
    mem, mem_note = job_memory(cfg, opts, cwd / cfg.model.path)
    command = driver_command(venv, opts.stage, config_path, list(overrides))
    values = {
        "stage": opts.stage,
        "submit_dir": cwd,
        "script_path": script_path,
        "job_name": opts.job_name or f"safer-{cfg.run.name}",
        "nodes": opts.nodes,
        "gpus_per_node": opts.gpus_per_node or "",
        "cpus_per_task": cpus_per_node(cfg, opts),
        "mem": mem,
        "mem_note": mem_note,
        "partition": opts.partition or "",
        "account": opts.account or "",
        "exclusive": "exclusive" if opts.exclusive else "",
        "time": opts.time or "",
        "time_note": time_note(cfg, opts, tokenizer, cwd / cfg.model.path),
        "grace_s": grace_s,
        "output": log_path,
        "run_dir": run_dir,
        "repo_dir": REPO,
        "venv_dir": venv,
        "command": shlex.join(command),
        **environment_values(os.environ if env is None else env),
    }
    return Submission(render_template(values), script_path, log_path, run_dir, command)


def submit(sub: Submission, *, cwd: Path | None = None) -> int:
    """Create the run dir, write the script, ``sbatch`` it; return the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError("sbatch not found on PATH: submit from a SLURM login node (or use --dry-run)")
    atomic_write_text(sub.script_path, sub.script)
    sub.script_path.chmod(0o755)  # before sbatch, the script's only reader
    cwd = (cwd or Path.cwd()).resolve()
    proc = subprocess.run(
        [sbatch, "--parsable", f"--chdir={cwd}", str(sub.script_path)],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise ValueError(f"sbatch {sub.script_path} failed ({proc.returncode}): {proc.stderr.strip()}")
    # --parsable prints "<job id>" or "<job id>;<cluster>".
    return int(proc.stdout.strip().split(";")[0])
