#!/usr/bin/env bash
# safer — sbatch template. Rendered by plain substitution of these double-brace placeholders:
#
#   stage              the safer command the job runs (run, sft, erpo)
#   submit_dir         the directory the job runs in (sbatch --chdir)
#   script_path        where the rendered script is written
#   job_name           job name
#   nodes              number of nodes (one Ray node each)
#   gpus_per_node      GPUs per node                      (optional: pass "" for none)
#   cpus_per_task      CPUs per node (one task per node)
#   mem                memory per node, e.g. 12G; 0: all of each node's (optional)
#   mem_note           where the mem value comes from     (optional)
#   partition          partition                          (optional)
#   account            account                            (optional)
#   exclusive          "exclusive" to get whole nodes     (optional)
#   time               time limit, e.g. 04:00:00              (optional)
#   time_note          without a time limit: an estimate of SFT's duration (optional)
#   grace_s            seconds before the time limit at which the driver gets SIGUSR1
#   output             log path (in the run dir; appended to across requeues)
#   run_dir            run directory (absolute)
#   repo_dir           checkout containing slurm/ray-cluster.sh (absolute)
#   venv_dir           virtualenv or conda env with safer and ray (absolute)
#   command            driver command line, already shell-quoted (shlex.join)
#   modules            $LOADEDMODULES of the submitting shell, shell-quoted ('' for none)
#   env_exports        `export NAME=value` lines (shell-quoted) of its NCCL_*/CUDA_*/HF_* variables
#   env_note           one line naming them, for the header
#
# Rules for the renderer: a `#SBATCH` or `##` line whose placeholder renders to "" is deleted
# (that is how the optional lines work; give gpus_per_node "" for none); paths must be
# absolute and free of whitespace and quotes; every other value is inserted as is.
# The rendered script is for the user: other full-line comments (these maintainer notes) are
# left out; `## ` lines are kept, as `# ` (the header a user reads).
#
# Preemption contract: on SIGUSR1 (sent by SLURM grace_s seconds before the time limit, or by
# `scancel --signal=USR1 --batch`) and on SIGTERM the driver gets the same signal; it should
# checkpoint and exit 75 (EX_TEMPFAIL, "preempted"), and this script then requeues the job,
# which resumes from the newest complete checkpoint. Any other exit status ends the job.
## safer {{stage}} job, written by `safer slurm submit` (docs/slurm.md).
## Resubmit as is:       sbatch --chdir={{submit_dir}} {{script_path}}
## Checkpoint now, requeue and resume:  scancel --signal=USR1 --batch <job id>
## --mem: {{mem_note}}
## --time: {{time_note}}
## Environment at submit, loaded and exported again below: {{env_note}}
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task={{cpus_per_task}}
#SBATCH --mem={{mem}}
#SBATCH --gpus-per-node={{gpus_per_node}}
#SBATCH --partition={{partition}}
#SBATCH --account={{account}}
#SBATCH --{{exclusive}}
#SBATCH --time={{time}}
#SBATCH --signal=B:USR1@{{grace_s}}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={{output}}
set -uo pipefail

readonly EX_PREEMPTED=75
export SAFER_RUN_DIR="{{run_dir}}"
export SAFER_VENV="{{venv_dir}}"
# A virtualenv has bin/activate; a conda env needs only its bin/ first on PATH.
if [[ -f $SAFER_VENV/bin/activate ]]; then
    # shellcheck disable=SC1091
    source "$SAFER_VENV/bin/activate"
else
    export PATH="$SAFER_VENV/bin:$PATH"
fi

# The submitting shell's modules and variables, so that resubmitting this script from a fresh
# shell (or a requeue) runs with the same collectives, CUDA and Hugging Face settings.
readonly SAFER_MODULES={{modules}}
{{env_exports}}
if [[ -n $SAFER_MODULES ]]; then
    if ! type module >/dev/null 2>&1; then
        for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
            # shellcheck disable=SC1090
            [[ -f $init ]] && source "$init" && break
        done
    fi
    if ! type module >/dev/null 2>&1; then
        echo "safer: submitted with modules $SAFER_MODULES, and this node has no 'module' command" >&2
        exit 1
    fi
    set +u   # module scripts read unset variables
    # shellcheck disable=SC2086  # one module per word
    module load ${SAFER_MODULES//:/ } || { echo "safer: module load ${SAFER_MODULES//:/ } failed" >&2; exit 1; }
    set -u
fi

echo "safer: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date -Is)"
echo "safer: modules: ${LOADEDMODULES:-none}"
env | grep -E '^(NCCL|CUDA|HF)_' | grep -vE '^[^=]*(TOKEN|SECRET|PASSWORD|KEY)' | sort | sed 's/^/safer: env: /' || true

# The batch shell is the only process SLURM signals with B:USR1; pass it on. bash runs a
# trap only between commands, so the work runs in the background and we `wait`.
child=
forward() { [[ -n $child ]] && kill -"$1" "$child" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# shellcheck disable=SC1083  # the braces are placeholders, replaced when rendered
"{{repo_dir}}/slurm/ray-cluster.sh" {{command}} &
child=$!
while :; do
    rc=0
    wait "$child" || rc=$?
    ((rc > 128)) || break
    kill -0 "$child" 2>/dev/null && continue   # a trapped signal interrupted `wait`
    rc2=0
    wait "$child" || rc2=$?                     # 127: rc was already the real status
    ((rc2 != 127)) && rc=$rc2
    break
done

if ((rc == EX_PREEMPTED)); then
    echo "safer: driver was preempted (exit $rc); requeueing job $SLURM_JOB_ID"
    # The job goes back to PENDING and SLURM ends this script.
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "safer: scontrol requeue failed" >&2
fi
echo "safer: driver exited with $rc"
exit "$rc"
