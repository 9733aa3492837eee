"""`safer slurm submit` without a cluster: rendering, validation before submitting, the CLI.

The real thing (sbatch on a two-node SLURM cluster) is tested in tests/slurm.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from safer_dist.config import ConfigError
from safer_dist.cluster.slurm import REPO, SubmitOptions, prepare, render_template, submit

TINY = REPO / "configs" / "tiny.yaml"


def _opts(**kw) -> SubmitOptions:
    return SubmitOptions(**{"nodes": 2, "gpus_per_node": 0, "stage": "sft", **kw})


def _sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_render_template_substitutes_and_drops_empty_sbatch_lines():
    template = "#SBATCH --a={{a}}\n#SBATCH --{{b}}\necho {{a}} '{{b}}'\n"
    assert render_template({"a": 1, "b": ""}, template) == "#SBATCH --a=1\necho 1 ''\n"
    assert render_template({"a": 1, "b": "exclusive"}, template) == "#SBATCH --a=1\n#SBATCH --exclusive\necho 1 'exclusive'\n"
    with pytest.raises(ValueError, match="no value for placeholder"):
        render_template({"a": 1}, template)


def test_prepare_renders_the_job(tmp_path):
    job = prepare(TINY, [f"run.output_dir={tmp_path}", "run.name=r1", "train.max_steps=7"],
                  _opts(partition="debug", time="01:00:00", account="proj"), cwd=REPO)
    lines = _sbatch_lines(job.script)
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --account=proj" in lines
    assert "#SBATCH --time=01:00:00" in lines
    # default grace: launch.stop_grace_s (120) + 60
    assert "#SBATCH --signal=B:USR1@180" in lines and "#SBATCH --requeue" in lines
    # no GPUs and not exclusive: those lines are dropped
    assert not any("gpus" in line or "exclusive" in line for line in lines)
    # 2 learners x 1 CPU spread over 2 nodes
    assert "#SBATCH --cpus-per-task=1" in lines
    assert job.run_dir == tmp_path / "r1"
    assert job.script_path == tmp_path / "r1" / "slurm" / "sft.sbatch.sh"
    assert f"#SBATCH --output={tmp_path}/r1/slurm/job-%j.log" in lines
    assert job.command == [
        f"{sys.prefix}/bin/python", "-m", "launcher", "sft", str(TINY),
        f"run.output_dir={tmp_path}", "run.name=r1", "train.max_steps=7", "launch.ray_address=auto",
    ]
    assert shlex.join(job.command) in job.script
    assert f'export SAFER_RUN_DIR="{tmp_path}/r1"' in job.script
    assert f'"{REPO}/slurm/ray-cluster.sh" ' in job.script
    assert "{{" not in job.script
    # prepare writes nothing
    assert not job.run_dir.exists()
    subprocess.run(["bash", "-n"], input=job.script, text=True, check=True)


def test_prepare_gpu_request_and_options(tmp_path):
    job = prepare(TINY, [f"run.output_dir={tmp_path}", "learner.num_learners=14", "train.global_batch_size=112",
                         "train.micro_batch_size=8", "erpo.optim.global_batch_size=112", "rollout.num_workers=2"],
                  _opts(gpus_per_node=8, cpus_per_node=64, exclusive=True, grace_s=300, stage="run",
                        job_name="my-job"), cwd=REPO)
    lines = _sbatch_lines(job.script)
    for want in ("--gpus-per-node=8", "--cpus-per-task=64", "--exclusive", "--signal=B:USR1@300", "--job-name=my-job"):
        assert f"#SBATCH {want}" in lines, (want, lines)
    assert not any("--time" in line or "--partition" in line or "--account" in line for line in lines)
    assert job.command[3] == "run"


def test_relative_paths_are_made_absolute(tmp_path):
    # tiny.yaml's run.output_dir is ../runs: relative to the file's directory, exp/
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "cfg.yaml").write_text(TINY.read_text())
    job = prepare("exp/cfg.yaml", [], _opts(), cwd=tmp_path)
    assert job.command[4] == str(tmp_path / "exp" / "cfg.yaml")
    assert job.run_dir == tmp_path / "runs" / "tiny"


@pytest.mark.parametrize("overrides, opts, match", [
    (["train.max_stepz=3"], {}, "unknown key 'train.max_stepz'"),
    (["learner.num_learners=4", "train.global_batch_size=32"], {"gpus_per_node": 1},
     r"sft: the learner placement group \(learner.num_learners=4, learner.cpus_per_learner=1\) needs "
     r"\{GPU=1, CPU=1\} x 4 \(PACK\); the cluster has GPU=2, CPU=4 on 2 nodes \(GPU=1, CPU=2; GPU=1, CPU=2\) free"),
    (["learner.placement=STRICT_SPREAD", "learner.num_learners=4", "train.global_batch_size=32"],
     {"cpus_per_node": 8}, r"needs \{CPU=1\} x 4 \(STRICT_SPREAD\); the cluster has GPU=0, CPU=16 on 2 nodes"),
    (["learner.num_learners=8", "train.global_batch_size=64"], {"cpus_per_node": 2},
     r"needs \{CPU=1\} x 8 \(PACK\); the cluster has GPU=0, CPU=4 on 2 nodes"),
    (["learner.num_learners=16", "train.global_batch_size=128", "rollout.placement=separate"],
     {"gpus_per_node": 8, "stage": "run"},
     r"erpo: the policy rollout placement group \(policy rollout: rollout.num_workers=2, rollout.cpus_per_worker=1\) "
     r"needs \{GPU=1, CPU=1\} x 2 \(PACK\); the cluster has GPU=0, CPU=2 on 2 nodes .* "
     r"Use rollout.placement=colocate"),
    (["learner.gpus_per_learner=1"], {}, "learner.gpus_per_learner=1 needs GPUs and the cluster has none"),
    # tensor-parallel workers: K GPUs of one node each, never colocated (the placement rule)
    (["learner.num_learners=8", "train.global_batch_size=64", "rollout.tensor_parallel=5"],
     {"gpus_per_node": 8, "stage": "run"},
     r"erpo: the policy rollout worker 1 placement group \(policy rollout: rollout.num_workers=2, "
     r"rollout.cpus_per_worker=1, rollout.tensor_parallel=5\) needs \{GPU=1, CPU=1\} x 5 \(STRICT_PACK\); "
     r"the cluster has GPU=3, .* rollout.tensor_parallel=5 places each rollout worker on that many GPUs of one node"),
    (["learner.num_learners=1", "rollout.num_workers=1", "rollout.tensor_parallel=9"],
     {"gpus_per_node": 8, "stage": "run"}, r"needs \{GPU=1, CPU=1\} x 9 \(STRICT_PACK\)"),
    (["rollout.tensor_parallel=2", "rollout.placement=colocate"], {},
     "rollout.placement=colocate cannot place tensor-parallel rollout workers"),
])
def test_prepare_rejects_before_submitting(tmp_path, overrides, opts, match):
    with pytest.raises(ConfigError, match=match):
        # erpo.optim.micro_batch_size=1: the ERPO batch divides over any of these learner counts
        prepare(TINY, [f"run.output_dir={tmp_path}", "erpo.optim.micro_batch_size=1", *overrides], _opts(**opts), cwd=REPO)
    assert not any(tmp_path.iterdir())


def test_grace_must_exceed_the_drivers_stop_grace(tmp_path):
    with pytest.raises(ValueError, match="must exceed launch.stop_grace_s"):
        prepare(TINY, [f"run.output_dir={tmp_path}", "launch.stop_grace_s=90"], _opts(grace_s=60), cwd=REPO)


def test_submit_writes_the_script_and_calls_sbatch(tmp_path, monkeypatch):
    # A stand-in sbatch that records its arguments (the real one runs in tests/slurm).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    job = prepare(TINY, [f"run.output_dir={tmp_path / 'runs'}"], _opts(), cwd=REPO)
    assert submit(job, cwd=REPO) == 4242
    assert job.script_path.read_text() == job.script
    assert os.access(job.script_path, os.X_OK)
    assert (tmp_path / "args").read_text().split() == ["--parsable", f"--chdir={REPO}", str(job.script_path)]


def test_cli_dry_run_prints_the_script_and_accepts_overrides_after_options(tmp_path, capsys):
    rc = main(["slurm", "submit", str(TINY), f"run.output_dir={tmp_path}", "--nodes", "2", "--gpus-per-node", "0",
               "--stage", "sft", "--dry-run", "train.max_steps=9"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("#!/usr/bin/env bash")
    assert "train.max_steps=9 launch.ray_address=auto" in out
    assert not any(tmp_path.iterdir())


def test_cli_bad_override_exits_2(tmp_path, capsys):
    rc = main(["slurm", "submit", str(TINY), f"run.output_dir={tmp_path}", "train.nope=1",
               "--nodes", "1", "--gpus-per-node", "0", "--dry-run"])
    assert rc == 2
    assert not any(tmp_path.iterdir())


def test_cli_rejects_stray_arguments():
    with pytest.raises(SystemExit):
        main(["slurm", "submit", str(TINY), "--nodes", "1", "--gpus-per-node", "0", "--dry-run", "stray"])
    with pytest.raises(SystemExit):
        main(["sft", str(TINY), "--nodes", "1"])


def test_learner_gloo_interface_is_the_one_holding_the_node_address():
    from safer_dist.train.engine import gloo_interface

    assert gloo_interface("127.0.0.1") is not None
    assert gloo_interface("203.0.113.77") is None  # TEST-NET-3: on no interface here


def test_venv_option_takes_any_env_with_bin_python(tmp_path):
    env = tmp_path / "conda-env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(Path(sys.executable))
    job = prepare(TINY, [f"run.output_dir={tmp_path}"], _opts(venv=str(env)), cwd=REPO)
    assert job.command[0] == f"{env}/bin/python"
    assert f'export SAFER_VENV="{env}"' in job.script
    with pytest.raises(ValueError, match="bin/python not found"):
        prepare(TINY, [f"run.output_dir={tmp_path}"], _opts(venv=str(tmp_path / "none")), cwd=REPO)


# --- what the rendered script asks for, and what it says -------------------------------------------

def test_rendered_script_keeps_a_short_header_and_no_maintainer_notes(tmp_path):
    template = (REPO / "slurm" / "sbatch.template.sh").read_text()
    assert "Rules for the renderer" in template  # the notes are there, for maintainers
    job = prepare(TINY, [f"run.output_dir={tmp_path}", "run.name=r1"], _opts(), cwd=REPO, env={})
    comments = [line for line in job.script.splitlines()[1:] if line.lstrip().startswith("#")
                and not line.startswith("#SBATCH")]
    assert comments == [
        "# safer sft job, written by `safer slurm submit` (docs/slurm.md).",
        f"# Resubmit as is:       sbatch --chdir={REPO} {tmp_path}/r1/slurm/sft.sbatch.sh",
        "# Checkpoint now, requeue and resume:  scancel --signal=USR1 --batch <job id>",
        comments[3],
        "# Environment at submit, loaded and exported again below: modules none; no NCCL_*, CUDA_* or HF_* variables",
    ], comments
    assert comments[3].startswith("# --mem: estimated: Ray + driver 2.0 + 1 learner(s) x "), comments[3]
    assert "\n\n\n" not in job.script
    subprocess.run(["bash", "-n"], input=job.script, text=True, check=True)


def test_render_template_drops_comments_but_keeps_header_lines():
    template = "#!/bin/sh\n# note for maintainers\n## run {{a}}\n## optional {{b}}\n\n# more\n\necho {{a}}  # inline stays\n"
    assert render_template({"a": 1, "b": ""}, template) == "#!/bin/sh\n# run 1\n\necho 1  # inline stays\n"


def _with_tokenizer(d: Path, tiny_model_dir: Path) -> Path:
    """``d`` with the tiny model's tokenizer and chat template (what submit checks besides config.json)."""
    d.mkdir(exist_ok=True)
    for f in tiny_model_dir.iterdir():
        if f.name not in ("config.json", "generation_config.json") and not f.name.endswith(".safetensors"):
            shutil.copy(f, d / f.name)
    return d


def _llama3_8b_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model directory with Llama-3-8B's config.json and a tokenizer (no weights: the estimate
    needs only the shape)."""
    d = _with_tokenizer(tmp_path / "llama3-8b", tiny_model_dir)
    (d / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
    }))
    return d


def _mem_line(script: str) -> str:
    return next(line for line in _sbatch_lines(script) if line.startswith("#SBATCH --mem"))


def test_mem_comes_from_the_host_memory_estimate(tmp_path, tiny_model_dir):
    model = _llama3_8b_dir(tmp_path, tiny_model_dir)
    base = [f"run.output_dir={tmp_path}", f"model.path={model}", "model.init_preset=null", "erpo.optim.micro_batch_size=1"]
    # Llama-3-8B: P = 32 x (2 x 4096 x 4096 + 2 x 4096 x 1024 + 3 x 4096 x 14336 + 2 x 4096)
    #                 + 2 x 128256 x 4096 + 4096 = 8,030,261,248; bf16 weights 2P = 14.957 GiB.
    # 14 learners on 2 nodes x 8 GPUs, PACK, the default 7 CPUs per node (14 CPUs over 2 nodes):
    # each node holds 7. GPU learner: 3 GiB process + 2P = 17.957 GiB -> 2 + 7 x 17.957 = 127.70 GiB -> 128G
    job = prepare(TINY, [*base, "learner.num_learners=14", "train.global_batch_size=112",
                         "erpo.optim.global_batch_size=112"], _opts(gpus_per_node=8), cwd=REPO)
    assert "#SBATCH --cpus-per-task=7" in _sbatch_lines(job.script)
    assert _mem_line(job.script) == "#SBATCH --mem=128G"
    assert "# --mem: estimated: Ray + driver 2.0 + 7 learner(s) x 18.0 = 127.7 GiB per node" in job.script
    # with 8 CPUs per node PACK fills the first node: 2 + 8 x 17.957 = 145.66 GiB -> 146G
    job = prepare(TINY, [*base, "learner.num_learners=14", "train.global_batch_size=112",
                         "erpo.optim.global_batch_size=112"], _opts(gpus_per_node=8, cpus_per_node=8), cwd=REPO)
    assert _mem_line(job.script) == "#SBATCH --mem=146G"
    # + offload_optimizer (ZeRO-2): fp32 grads 4P/14 + master weights and Adam 12P/14 on the host,
    # 16P/14 = 8.547 GiB per learner -> 2 + 8 x (17.957 + 8.547) = 214.04 GiB -> 215G
    job = prepare(TINY, [*base, "learner.num_learners=14", "train.global_batch_size=112",
                         "erpo.optim.global_batch_size=112", "learner.offload_optimizer=true"],
                  _opts(gpus_per_node=8, cpus_per_node=8), cwd=REPO)
    assert _mem_line(job.script) == "#SBATCH --mem=215G"
    # `run` on one node: 6 learners + 2 rollout workers colocated with 2 of them (3 GiB + 2P each,
    # processes of their own): 2 + 8 x 17.957 -> 146G
    job = prepare(TINY, [*base, "learner.num_learners=6", "train.global_batch_size=48",
                         "erpo.optim.global_batch_size=48"], _opts(nodes=1, gpus_per_node=8, stage="run"), cwd=REPO)
    assert _mem_line(job.script) == "#SBATCH --mem=146G"
    assert "6 learner(s) x 18.0 + 2 rollout worker(s) x 18.0" in job.script


def test_mem_flag_exclusive_and_unknown_model(tmp_path):
    out = [f"run.output_dir={tmp_path}"]
    job = prepare(TINY, out, _opts(mem="12G"), cwd=REPO)
    assert _mem_line(job.script) == "#SBATCH --mem=12G" and "# --mem: as given (--mem)" in job.script
    job = prepare(TINY, out, _opts(exclusive=True), cwd=REPO)
    assert _mem_line(job.script) == "#SBATCH --mem=0"
    with pytest.raises(ValueError, match="--mem '12 GB'"):
        prepare(TINY, out, _opts(mem="12 GB"), cwd=REPO)
    # no model at model.path and no init preset to create it: refused before sbatch, --mem or not
    for opts in (_opts(), _opts(mem="8G")):
        with pytest.raises(ConfigError, match=r"model\.path=.*/none does not exist: no Hugging Face model"):
            prepare(TINY, [*out, f"model.path={tmp_path / 'none'}", "model.init_preset=null"], opts, cwd=REPO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model\.path=.*/empty has no config.json"):
        prepare(TINY, [*out, f"model.path={tmp_path / 'empty'}", "model.init_preset=null"], _opts(), cwd=REPO)


def test_shape_option_sizes_the_mem_estimate(tmp_path, capsys, tiny_model_dir):
    """--shape (as `safer plan --shape`) replaces model.path's shape in the --mem estimate: a
    model directory of another shape with --shape llama3-8b asks what the Llama-3-8B one asks."""
    base = [f"run.output_dir={tmp_path}", "model.init_preset=null", "erpo.optim.micro_batch_size=1",
            "learner.num_learners=6", "train.global_batch_size=48", "erpo.optim.global_batch_size=48"]
    opts = dict(nodes=1, gpus_per_node=8, stage="run")
    real = prepare(TINY, [*base, f"model.path={_llama3_8b_dir(tmp_path, tiny_model_dir)}"], _opts(**opts), cwd=REPO)
    other = _with_tokenizer(tmp_path / "other", tiny_model_dir)
    (other / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "intermediate_size": 128, "vocab_size": 100}))
    small = prepare(TINY, [*base, f"model.path={other}"], _opts(**opts), cwd=REPO)
    shaped = prepare(TINY, [*base, f"model.path={other}"], _opts(**opts, shape="llama3-8b"), cwd=REPO)
    assert _mem_line(shaped.script) == _mem_line(real.script) == "#SBATCH --mem=146G" != _mem_line(small.script)
    rc = main(["slurm", "submit", str(TINY), *base, f"model.path={other}", "--nodes", "1", "--gpus-per-node", "8",
               "--shape", "llama3-8b", "--dry-run"])
    assert rc == 0 and "#SBATCH --mem=146G" in capsys.readouterr().out


def test_cli_mem_option(tmp_path, capsys):
    rc = main(["slurm", "submit", str(TINY), f"run.output_dir={tmp_path}", "--nodes", "2", "--gpus-per-node", "0",
               "--mem", "3G", "--dry-run"])
    assert rc == 0
    assert "#SBATCH --mem=3G" in capsys.readouterr().out


def test_ray_steps_ask_for_the_jobs_cpus(tmp_path):
    """ray-cluster.sh's srun steps pass --cpus-per-task (a step does not inherit the job's since
    Slurm 22.05). Stand-in srun/scontrol/squeue record what they are asked; the real ones run in
    tests/slurm. The stand-in srun starts no Ray, so bring-up fails at once: only the arguments count."""
    calls = _ray_cluster_srun_calls(tmp_path)
    assert len(calls) == 2, calls
    head, workers = calls
    assert head.startswith("head ") and "-w n1" in head and "--cpus-per-task=3" in head.split(), head
    assert workers.startswith("worker ") and "--nodes=2" in workers and "--cpus-per-task=3" in workers.split(), workers


def test_ray_steps_ask_for_the_jobs_gpus(tmp_path):
    """With GPUs in the job (SLURM_GPUS_ON_NODE), both Ray steps ask srun for them; without, neither does."""
    for gpus, want in (("4", "--gpus-per-node=4"), ("", None)):
        calls = _ray_cluster_srun_calls(tmp_path / f"g{gpus or 0}", SLURM_GPUS_ON_NODE=gpus)
        assert len(calls) == 2, calls
        for call in calls:
            got = [a for a in call.split() if a.startswith("--gpus")]
            assert got == ([want] if want else []), call


def _ray_cluster_srun_calls(tmp_path: Path, **env_vars) -> list[str]:
    """The srun command lines of ray-cluster.sh on a 3-node allocation, from stand-in srun/scontrol/squeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    stubs = {
        "srun": f'#!/bin/sh\necho "$SAFER_RAY_NODE_ROLE $*" >> {tmp_path}/srun.args\n',
        "scontrol": '#!/bin/sh\nprintf "n1\\nn2\\nn3\\n"\n',
        "squeue": "#!/bin/sh\n",
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="n[1-3]", SLURM_CPUS_PER_TASK="3", SAFER_VENV=sys.prefix,
               SAFER_RUN_DIR=str(tmp_path / "run"), SAFER_RAY_READY_TIMEOUT_S="60", **env_vars)
    for name in ("SLURM_GPUS_PER_NODE", "SAFER_RAY_GPUS_PER_NODE"):
        env.pop(name, None)
    p = subprocess.run([str(REPO / "slurm" / "ray-cluster.sh"), "true"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and "Ray did not come up" in p.stderr, p.stderr
    return sorted((tmp_path / "srun.args").read_text().splitlines())


def test_submit_checks_the_tokenizer_and_chat_template(tmp_path, tiny_model_dir, capsys):
    """As `safer run` does before it starts: a model directory without a tokenizer, or whose
    tokenizer has no chat template, is refused before sbatch (exit 2), naming model.path."""
    import json as _json

    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model / "config.json")
    base = [f"run.output_dir={tmp_path}", f"model.path={model}", "model.init_preset=null"]
    with pytest.raises(ValueError, match="tokenizer"):
        prepare(TINY, base, _opts(), cwd=REPO)
    _with_tokenizer(model, tiny_model_dir)
    prepare(TINY, base, _opts(), cwd=REPO)  # accepted
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = model / "tokenizer_config.json"
    config.write_text(_json.dumps({k: v for k, v in _json.loads(config.read_text()).items() if k != "chat_template"}))
    with pytest.raises(ValueError, match=rf"model\.path={model}: the tokenizer has no chat template"):
        prepare(TINY, base, _opts(), cwd=REPO)
    rc = main(["slurm", "submit", str(TINY), *base, "--nodes", "1", "--gpus-per-node", "0", "--dry-run"])
    assert rc == 2 and "no chat template" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_script_records_and_reexports_the_environment(tmp_path):
    """The submitting shell's modules and NCCL_*/CUDA_*/HF_* variables are named in the header,
    loaded and exported again by the script (run here from an empty environment, with a stand-in
    `module`), and echoed to the job log; credentials and CUDA_VISIBLE_DEVICES are not recorded."""
    env = {"LOADEDMODULES": "gcc/12.2:cuda/12.4", "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "ib0,eth0",
           "HF_HOME": "/scratch/my hf", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret", "CUDA_VISIBLE_DEVICES": "0",
           "CUDA_LAUNCH_BLOCKING": "1", "NCCL_IB_HCA": "mlx5", "OTHER": "x"}
    job = prepare(TINY, [f"run.output_dir={tmp_path}"], _opts(), cwd=REPO, env=env)
    assert ("# Environment at submit, loaded and exported again below: modules gcc/12.2:cuda/12.4; CUDA_LAUNCH_BLOCKING, "
            "HF_HOME, HF_HUB_OFFLINE, NCCL_DEBUG, NCCL_IB_HCA, NCCL_SOCKET_IFNAME (not recorded: HF_TOKEN)") in job.script
    assert "hf_secret" not in job.script and "CUDA_VISIBLE_DEVICES" not in job.script and "OTHER" not in job.script
    subprocess.run(["bash", "-n"], input=job.script, text=True, check=True)
    # the script's preamble, up to its first line of output about the job, in a fresh shell
    lines = job.script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("set -uo pipefail"))
    end = next(i for i, line in enumerate(lines) if line.startswith("env | grep"))
    preamble = "\n".join(lines[start:end + 1]).replace("$SLURM_JOB_ID", "7").replace("$SLURM_JOB_NODELIST", "n1")
    module = 'module() { echo "module $*" >> "$MODULE_LOG"; export LOADEDMODULES=gcc/12.2:cuda/12.4; }'
    p = subprocess.run(["env", "-i", f"PATH={os.environ['PATH']}", f"MODULE_LOG={tmp_path}/module.log", "bash", "-c",
                        f"{module}\n{preamble}\nenv"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "module.log").read_text() == "module load gcc/12.2 cuda/12.4\n"
    out = p.stdout.splitlines()
    assert "safer: modules: gcc/12.2:cuda/12.4" in out
    for k in ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "HF_HOME", "HF_HUB_OFFLINE", "CUDA_LAUNCH_BLOCKING", "NCCL_IB_HCA"):
        assert f"{k}={env[k]}" in out, k  # exported to the job
        assert f"safer: env: {k}={env[k]}" in out, k  # and echoed to its log
    assert not any("HF_TOKEN" in line or "CUDA_VISIBLE_DEVICES" in line for line in out)
    # modules recorded and no `module` command on the node: the job stops, saying why
    p = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "bash", "-c", preamble], capture_output=True, text=True,
                       timeout=60)
    if p.returncode == 0:  # this machine has an environment-modules init script: nothing to refuse
        return
    assert p.returncode == 1 and "submitted with modules gcc/12.2:cuda/12.4, and this node has no 'module'" in p.stderr


def test_time_hint_from_the_sft_flops(tmp_path, tiny_model_dir, demo_data_dir):
    """Without --time, the header estimates SFT on the learners' GPUs: Llama-3-8B (P =
    8,030,261,248), 100 steps x 64 examples x the mean encoded length of the data, 6 FLOPs per
    parameter and token, 8 GPUs at 43% of 989 TFLOPs. With --time, no ERPO-only stage, or no
    GPUs: no hint."""
    from safer_dist.cluster.walltime import mean_example_tokens
    from safer_dist.config import load_config
    from safer_dist.train.models import load_tokenizer

    model = _llama3_8b_dir(tmp_path, tiny_model_dir)
    base = [f"run.output_dir={tmp_path}", f"model.path={model}", "model.init_preset=null",
            f"data.train={demo_data_dir / 'sft.jsonl'}", "learner.num_learners=8", "train.global_batch_size=64",
            "train.micro_batch_size=8", "train.max_steps=100", "erpo.optim.micro_batch_size=1",
            "erpo.optim.global_batch_size=64"]
    job = prepare(TINY, base, _opts(nodes=1, gpus_per_node=8), cwd=REPO)
    mean = mean_example_tokens(load_config(TINY, base), load_tokenizer(model))
    tokens = int(100 * 64 * mean)
    seconds = 6 * 8_030_261_248 * tokens / (8 * 989e12 * 0.43)
    line = next(line for line in job.script.splitlines() if line.startswith("# --time: "))
    assert f"{tokens:,} tokens" in line and f"~{seconds / 60:.0f} min" in line, (line, seconds)
    limit = int(seconds * 1.5) + 600
    assert line.endswith(f"e.g. --time 0-{limit // 3600:02d}:{limit % 3600 // 60:02d}:00"), line
    for opts in (_opts(nodes=1, gpus_per_node=8, time="02:00:00"), _opts(nodes=1, gpus_per_node=8, stage="erpo")):
        assert "# --time: " not in prepare(TINY, base, opts, cwd=REPO).script
