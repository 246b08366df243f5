#!/usr/bin/env bash
# UNIC training on SLURM nodes: one srun task per node runs torchrun, which starts one worker per GPU; the nodes
# meet in a c10d rendezvous on the first node of the allocation, under the job's id.
#   sbatch --nodes 4 --gpus-per-node 8 scripts/slurm_train.sh --config unic_vitb16_in1k \
#       data.root=/data/imagenet teachers.weights_dir=/data/teachers run.output_dir=/shared/runs/unic_b16
# Arguments go to main_unic.py ([--config F] key=value ...). run.output_dir must be on a file system every node
# sees: rank 0 writes checkpoint.pth there and every rank reads it when the job resumes. Submit from the
# repository or set UNIC_REPO (sbatch runs a copy of this file). Relative paths are the submit folder's.
# DRY_RUN=1 prints the command instead of running it. Overrides: NPROC_PER_NODE, RDZV_HOST, RDZV_PORT,
# MAX_RESTARTS, JOIN_TIMEOUT, TORCH_ELASTIC_SHUTDOWN_TIMEOUT.
#
# Which process gets which signal:
# - preemption, scancel: SLURM sends SIGTERM to every process of the job (this shell, srun, the torchrun agents,
#   their workers), then SIGKILL after the partition's GraceTime (preemption) or KillWait (scancel). The workers
#   finish the step, all save checkpoint.pth at the same step and exit 143; torchrun waits for them up to
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT. A preempted job is requeued by SLURM (--requeue, PreemptMode=REQUEUE) and,
#   under the same SLURM_JOB_ID, resumes from that checkpoint. This shell traps TERM only to keep waiting for
#   srun: an untrapped TERM would end the batch script, and with it the job, before the checkpoint is written.
# - time limit: --signal=B:USR1@300 sends USR1 to this shell alone, 300 s before the limit. The trap sends SIGTERM
#   to the job's steps (scancel --signal only signals: nothing is cancelled), waits for srun, then requeues.
# - a node fails: with --requeue SLURM requeues the whole job; it resumes from the last checkpoint (at most
#   train.save_every steps are trained again). A worker that crashes is restarted by torchrun (MAX_RESTARTS).
#SBATCH --job-name=unic
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

REPO=${UNIC_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
if [[ ! -f "${REPO}/main_unic.py" ]]; then
    echo "error: ${REPO}/main_unic.py not found; submit from the UNIC repository or set UNIC_REPO" >&2
    exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" || -z "${SLURM_JOB_NODELIST:-}" ]]; then
    echo "error: not inside a SLURM job (SLURM_JOB_ID, SLURM_JOB_NODELIST unset); submit with sbatch" >&2
    exit 2
fi
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [[ -z "${RDZV_HOST:-}" ]]; then
    # the whole list is read (a `| head -n 1` would SIGPIPE scontrol on large jobs: exit 141 under pipefail)
    hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST}")
    RDZV_HOST=${hosts%%$'\n'*}
fi
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}  # one per job, below Linux's ephemeral ports
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
NPROC_PER_NODE=${NPROC_PER_NODE##*:}  # SLURM_GPUS_PER_NODE may read "a100:8"
# torchrun's agents otherwise share their rendezvous store with the workers, and a node that rejoins a running
# job (torchrun restarts after a failure) never receives the new master address
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# after SIGTERM the workers finish a step and write the checkpoint before torchrun may kill them
# (read by torchrun since 2026's torch; older torchrun kills them 30 s after SIGTERM: keep checkpoints small
# enough to write in that time, or set train.save_every so that little is lost)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

cmd=(srun --nodes="${NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05)
    cmd+=(--cpus-per-task="${SLURM_CPUS_PER_TASK}")
fi
cmd+=(torchrun --nnodes="${NNODES}" --nproc_per_node="${NPROC_PER_NODE}"
      --rdzv-backend=c10d --rdzv-endpoint="${RDZV_HOST}:${RDZV_PORT}" --rdzv-id="${SLURM_JOB_ID}"
      --rdzv-conf="join_timeout=${JOIN_TIMEOUT:-900}" --max-restarts="${MAX_RESTARTS:-3}"
      "${REPO}/main_unic.py" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE}" \
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT}"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi

requeue=0
# shellcheck disable=SC2329  # the handlers are invoked by trap
on_usr1() {
    echo "slurm_train.sh: time limit near: SIGTERM to the workers (checkpoint), then requeue" >&2
    requeue=1
    scancel --signal=TERM "${SLURM_JOB_ID}"
}
# shellcheck disable=SC2329
on_term() {
    echo "slurm_train.sh: SIGTERM (preemption or scancel): waiting for the workers' checkpoint" >&2
}
trap on_usr1 USR1
trap on_term TERM

echo "slurm_train.sh: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${NNODES} nodes x" \
    "${NPROC_PER_NODE} processes, rendezvous ${RDZV_HOST}:${RDZV_PORT}" >&2
"${cmd[@]}" &
srun_pid=$!
status=0
while true; do  # a trapped signal interrupts wait while srun still runs: wait again
    wait "${srun_pid}" && status=0 || status=$?
    kill -0 "${srun_pid}" 2>/dev/null || break
done
if [[ "${requeue}" == 1 ]]; then
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
