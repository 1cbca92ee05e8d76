#!/usr/bin/env bash
#SBATCH --job-name=coca_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=coca_jax_%j.log
#SBATCH --signal=TERM@180
#SBATCH --requeue
#
# Train coca_jax on several GPU nodes: one JAX process per node (it drives all the node's
# GPUs) or one per GPU, joined by jax.distributed through process 0's address.
#
#   sbatch [--nodes=N] [--ntasks-per-node=1|GPUS] launch/gpu_multinode.sh [options] [--config.KEY=VALUE ...]
#   launch/gpu_multinode.sh [options] [--config.KEY=VALUE ...]     # on every node, without SLURM
#
# Under SLURM (submit from the repository root; the #SBATCH lines above are defaults that
# sbatch's own flags override) the batch script starts one task per process with srun;
# task i runs
#   python -m coca_jax.train --config=CONFIG --workdir=WORKDIR OVERRIDES \
#       --coordinator_address=FIRST_NODE:PORT --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID
# With more than one task per node each task sees one GPU (the $SLURM_LOCALID-th), or the
# GPUs SLURM bound to it (--gpus-per-task).
#
# Without SLURM run the same command on every node, torchrun-style:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/gpu_multinode.sh --workdir=/shared/run1   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/gpu_multinode.sh --workdir=/shared/run1   # on node1
# NPROC_PER_NODE=8 starts one process per GPU on each node instead of one per node (the
# first 8 GPUs of CUDA_VISIBLE_DEVICES when it is set: it must list at least that many).
# NODE_RANK and MASTER_ADDR are required when NNODES > 1. One process in all (NNODES=1,
# NPROC_PER_NODE=1) runs without jax.distributed: no coordinator, no port. NNODES inside a
# SLURM job (SLURM_JOB_ID set) is an error: say which of the two should place the processes.
#
# Options (each also read from the environment variable in brackets)
#   --workdir=DIR       [WORKDIR, required] a directory every node sees (shared filesystem or gs://)
#   --config=FILE[:ARGS] [CONFIG, default configs/base.py]
#   --port=P            [COORDINATOR_PORT, else MASTER_PORT, default 12345] process 0's port
#   --python=EXE        [PYTHON, default python] the interpreter with coca_jax and jax[cuda12]
#                       installed: pip install -e . "jax[cuda12]==0.10.2"
#   --dry-run           [DRY_RUN=1] print the command of every process instead of running it
#   -h, --help          this text
# Arguments of the form --config.KEY=VALUE, and everything after `--`, go to the trainer.
#
# Preemption and resume: SIGTERM makes the trainer write a checkpoint at the next step and
# exit 0 (#SBATCH --signal sends it 180 s before the time limit); `sbatch` again, or a
# requeue, with the same WORKDIR resumes from the latest complete checkpoint.

set -euo pipefail

WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/base.py}"
PORT="${COORDINATOR_PORT:-${MASTER_PORT:-12345}}"
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"

# sbatch runs a copy of this file from its spool directory: find the repository from the
# submit directory then.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -d "$REPO_ROOT/coca_jax" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then
  REPO_ROOT="$SLURM_SUBMIT_DIR"
fi
SCRIPT="$REPO_ROOT/launch/gpu_multinode.sh"

usage() {
  sed -n '/^# Train coca_jax/,/^$/s/^# \{0,1\}//p' "$SCRIPT"
}

# shellcheck disable=SC2034  # read by common.sh
LAUNCH_NAME=launch/gpu_multinode.sh
# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

TASK=0  # internal: set by the srun line below, one per SLURM task
COORDINATOR=""
OVERRIDES=()
PASSTHROUGH=()  # the options as given, for the srun tasks
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --task) TASK=1 ;;
    --coordinator=*) COORDINATOR="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}"; PASSTHROUGH+=("$1") ;;
    --config=*) CONFIG="${1#*=}"; PASSTHROUGH+=("$1") ;;
    --port=*) PORT="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}"; PASSTHROUGH+=("$1") ;;
    --config.*) OVERRIDES+=("$1") ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) die "unknown argument $1 (options take the form --name=value; see -h)" ;;
  esac
  shift
done
[[ -n "$WORKDIR" ]] || die "--workdir (or WORKDIR) is required: a directory that every node sees"

# The trainer's command for one process.
train_command() {
  local coordinator="$1" num_processes="$2" process_id="$3"
  TRAIN=("$PYTHON" -m coca_jax.train --config="$CONFIG" --workdir="$WORKDIR"
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
  # A single process needs no jax.distributed: its coordinator would only claim a port, on
  # which two single-GPU runs on one machine would collide.
  if ((num_processes > 1)); then
    TRAIN+=(--coordinator_address="$coordinator" --num_processes="$num_processes" --process_id="$process_id")
  fi
}

# The GPU a process sees when a node runs several: the local_rank-th of the visible ones.
gpu_of() {
  local local_rank="$1" visible
  IFS=, read -r -a visible <<<"${CUDA_VISIBLE_DEVICES:-}"
  if ((${#visible[@]} > local_rank)); then
    echo "${visible[$local_rank]}"
  else
    echo "$local_rank"
  fi
}

node_hostnames() {
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$SLURM_JOB_NODELIST"
  elif [[ "$SLURM_JOB_NODELIST" != *[* ]]; then
    tr , '\n' <<<"$SLURM_JOB_NODELIST"
  else
    die "scontrol is needed to expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  fi
}

cd "$REPO_ROOT"

if [[ "$TASK" == 1 ]]; then
  # One SLURM task: its rank comes from srun.
  [[ -n "$COORDINATOR" ]] || die "--task needs --coordinator=HOST:PORT"
  ((SLURM_NTASKS % SLURM_NNODES == 0)) \
    || die "SLURM_NTASKS=$SLURM_NTASKS tasks on SLURM_NNODES=$SLURM_NNODES nodes: give every node the same number of tasks (--ntasks-per-node)"
  tasks_per_node=$((SLURM_NTASKS / SLURM_NNODES))
  IFS=, read -r -a visible <<<"${CUDA_VISIBLE_DEVICES:-}"
  # One visible GPU, or --gpus-per-task (SLURM_GPUS_PER_TASK): SLURM bound this task's
  # GPUs already (--gpu-bind), often renumbered from 0, so SLURM_LOCALID would name a GPU
  # of another task, or one the task cannot see.
  if ((tasks_per_node > 1 && ${#visible[@]} != 1)) && [[ -z "${SLURM_GPUS_PER_TASK:-}" ]]; then
    ((${#visible[@]} == 0 || SLURM_LOCALID < ${#visible[@]})) \
      || die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#visible[@]} GPU(s) for $tasks_per_node tasks per node: bind GPUs per task (--gpus-per-task) or list one per task"
    CUDA_VISIBLE_DEVICES="$(gpu_of "$SLURM_LOCALID")"
    export CUDA_VISIBLE_DEVICES
  fi
  train_command "$COORDINATOR" "$SLURM_NTASKS" "$SLURM_PROCID"
  exec "${TRAIN[@]}"
fi

# Inside a SLURM job the srun branch would silently ignore NNODES (and NODE_RANK,
# MASTER_ADDR): the user meant one of the two ways, and only they know which.
if [[ -n "${SLURM_JOB_ID:-}" && -n "${NNODES:-}" ]]; then
  die "both SLURM_JOB_ID=$SLURM_JOB_ID and NNODES=$NNODES are set: under SLURM the job's nodes and tasks place the processes (unset NNODES, NODE_RANK and MASTER_ADDR); for the torchrun-style variables run outside the SLURM job (or unset SLURM_JOB_ID)"
fi

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # The batch script (or an salloc shell): one srun task per process.
  mapfile -t hosts < <(node_hostnames)
  ((${#hosts[@]})) || die "no hosts in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
  num_processes="${SLURM_NTASKS:-${#hosts[@]}}"
  ((num_processes % ${#hosts[@]} == 0)) \
    || die "SLURM_NTASKS=$num_processes tasks on ${#hosts[@]} nodes: give every node the same number of tasks (--ntasks-per-node)"
  tasks_per_node=$((num_processes / ${#hosts[@]}))
  coordinator="${hosts[0]}:$PORT"
  srun=(srun --kill-on-bad-exit=1 --ntasks="$num_processes" --ntasks-per-node="$tasks_per_node"
    bash "$SCRIPT" --task --coordinator="$coordinator" "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}" -- "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote_all "${srun[@]}")"
    for ((process_id = 0; process_id < num_processes; process_id++)); do
      train_command "$coordinator" "$num_processes" "$process_id"
      gpu=""
      ((tasks_per_node > 1)) && gpu="CUDA_VISIBLE_DEVICES=$((process_id % tasks_per_node)) "
      echo "# process $process_id on ${hosts[process_id / tasks_per_node]}: $gpu$(quote_all "${TRAIN[@]}")"
    done
    exit 0
  fi
  exec "${srun[@]}"
fi

# Without SLURM: this node's processes, from torchrun-style variables.
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
if ((NNODES > 1)); then
  # No default: every node left at 0 would claim process ids 0.., and the run would hang.
  [[ -n "${NODE_RANK:-}" ]] || die "NODE_RANK (this node's index, 0 to $((NNODES - 1))) is required when NNODES=$NNODES"
  [[ -n "${MASTER_ADDR:-}" ]] || die "MASTER_ADDR (the address of the node with NODE_RANK=0) is required when NNODES=$NNODES"
fi
NODE_RANK="${NODE_RANK:-0}"
if ((NPROC_PER_NODE > 1)) && [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
  # Too short a list would give the extra processes GPUs outside it (gpu_of falls back to
  # the local rank): GPUs someone else was meant to have.
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  ((${#visible[@]} >= NPROC_PER_NODE)) \
    || die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#visible[@]} GPU(s) for NPROC_PER_NODE=$NPROC_PER_NODE processes: list one GPU per process, or lower NPROC_PER_NODE"
fi
((NODE_RANK >= 0 && NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK is not in [0, NNODES=$NNODES)"
coordinator="${MASTER_ADDR:-localhost}:$PORT"
num_processes=$((NNODES * NPROC_PER_NODE))

pids=()
# Preemption: pass SIGTERM on to the trainers so that they checkpoint, then wait for them.
trap 'if ((${#pids[@]})); then kill -TERM "${pids[@]}" 2>/dev/null || true; fi' TERM INT
for ((local_rank = 0; local_rank < NPROC_PER_NODE; local_rank++)); do
  process_id=$((NODE_RANK * NPROC_PER_NODE + local_rank))
  train_command "$coordinator" "$num_processes" "$process_id"
  env=()
  ((NPROC_PER_NODE > 1)) && env=("CUDA_VISIBLE_DEVICES=$(gpu_of "$local_rank")")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote_all "${env[@]+"${env[@]}"}" "${TRAIN[@]}")"
  else
    env "${env[@]+"${env[@]}"}" "${TRAIN[@]}" &
    pids+=("$!")
  fi
done
status=0
for pid in "${pids[@]+"${pids[@]}"}"; do
  # wait returns early (>128) when a trapped signal arrives; wait again for the exit code.
  while true; do
    code=0
    wait "$pid" || code=$?
    if ((code > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  ((code == 0)) || status="$code"
done
exit "$status"
