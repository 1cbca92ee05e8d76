#!/usr/bin/env bash
# Train coca_jax on a Cloud TPU VM slice: create it, install the package on every worker,
# start training on all workers at once, stream the log, delete the slice.
#
#   launch/tpu_vm.sh [options] create|setup|train|logs|stop|status|delete|all [--config.KEY=VALUE ...]
#
#   export PROJECT=my-project ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 WORKDIR=gs://my-bucket/coca_base
#   launch/tpu_vm.sh all --config.optim.lr=5e-4      # create + setup + train + logs
#   launch/tpu_vm.sh --dry-run all                   # print every command, run none
#   launch/tpu_vm.sh delete
#
# Subcommands
#   create   create the slice, or reuse it when one of that name is READY (a PREEMPTED or
#            TERMINATED one is deleted and created again)
#   setup    copy this working tree to ~/coca_jax on every worker (--worker=all) and
#            `pip install -e .[tpu]` it into ~/coca_venv (Python 3.11, installed if missing);
#            a worker whose trainer is running keeps its installed code
#   train    start `python -m coca_jax.train --config=CONFIG --workdir=WORKDIR OVERRIDES` on
#            every worker with nohup; each worker logs to ~/coca_train.log, pid in ~/coca_train.pid.
#            All workers run the same command: JAX and libtpu find the other hosts themselves.
#            A trainer already running is left running (`stop` first to restart it).
#   logs     follow worker LOG_WORKER's log (default 0; `all` interleaves every worker)
#   stop     SIGTERM the trainer on every worker: it checkpoints at the next step and exits 0
#   status   the slice's state (READY, PREEMPTED, ...)
#   delete   delete the slice (the gs:// workdir is kept)
#   all      create, setup, train, logs
#
# Options (each also read from the environment variable in brackets)
#   --project=P            [PROJECT, else gcloud's configured project]
#   --zone=Z               [ZONE, default us-central2-b]
#   --accelerator_type=T   [ACCELERATOR_TYPE, default v4-32]
#   --runtime_version=V    [RUNTIME_VERSION, default tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite,
#                           v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e]
#   --name=N               [TPU_NAME, default coca-$USER]
#   --workdir=gs://...     [WORKDIR; required by train: every worker must see it, so use a bucket]
#   --config=FILE[:ARGS]   [CONFIG, default configs/base.py], e.g. configs/large.py:bf16
#   --spot                 [SPOT=1] create a Spot slice (cheaper; may be preempted at any time)
#   --preemptible          [PREEMPTIBLE=1] the older preemptible kind (at most 24 h)
#   --dry-run              [DRY_RUN=1] print each command instead of running it
#   -h, --help             this text
# Arguments of the form --config.KEY=VALUE, and everything after `--`, go to the trainer.
#
# Spot / preemptible slices and resuming
#   A Spot or preemptible slice can be reclaimed at any moment. The trainer's processes get
#   SIGTERM first and write a checkpoint at the next step boundary (coca_jax.train); the
#   slice then shows state PREEMPTED and must be deleted and created again. Because every
#   checkpoint lives in the gs:// WORKDIR, nothing is lost with the VM:
#     launch/tpu_vm.sh --spot all [same overrides]      # again, with the same WORKDIR
#   `create` sees the PREEMPTED slice, deletes it and creates a new one; `setup` reinstalls;
#   `train` resumes from the latest complete checkpoint in WORKDIR (a partly written one is
#   never picked up) and the data stream continues from the saved step. Only the steps since
#   the last checkpoint are repeated: lower --config.train.checkpoint_every on Spot slices.
#   A loop such as `until launch/tpu_vm.sh --spot all; do sleep 60; done` keeps retrying
#   while capacity is short. Keep the overrides identical across restarts.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
TPU_NAME="${TPU_NAME:-coca-${USER:-user}}"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/base.py}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
DRY_RUN="${DRY_RUN:-0}"
LOG_WORKER="${LOG_WORKER:-0}"

# Paths on each worker; the ~ expands there, in the worker's shell.
# shellcheck disable=SC2088
REMOTE_DIR='~/coca_jax'
# shellcheck disable=SC2088
REMOTE_VENV='~/coca_venv'
# shellcheck disable=SC2088
REMOTE_LOG='~/coca_train.log'
# shellcheck disable=SC2088
REMOTE_PID='~/coca_train.pid'

# Remote shell test: a trainer of this slice is alive on the worker (it may be the one a
# preemption-retry loop of `all` started earlier).
TRAINING="[ -f $REMOTE_PID ] && kill -0 \$(cat $REMOTE_PID) 2>/dev/null"

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# shellcheck disable=SC2034  # read by common.sh
LAUNCH_NAME=launch/tpu_vm.sh
# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

# Runs a command, or prints it (prefixed with "+ ") under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote_all "$@")"
  else
    "$@"
  fi
}

SUBCOMMAND=""
OVERRIDES=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator_type=* | --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime_version=* | --runtime-version=* | --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --name=*) TPU_NAME="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --config.*) OVERRIDES+=("$1") ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    -*) die "unknown option $1 (options take the form --name=value; see -h)" ;;
    *)
      [[ -z "$SUBCOMMAND" ]] || die "one subcommand at a time (got $SUBCOMMAND and $1)"
      SUBCOMMAND="$1"
      ;;
  esac
  shift
done
[[ -n "$SUBCOMMAND" ]] || { usage >&2; exit 2; }
[[ "$SPOT" == 1 && "$PREEMPTIBLE" == 1 ]] && die "--spot and --preemptible exclude each other"

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")

tpu() {
  run gcloud compute tpus tpu-vm "$@"
}

# Runs a shell command on every worker of the slice.
on_all_workers() {
  tpu ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" --command="$1"
}

# Sets STATE to the slice's state, empty when no slice of that name exists (and under --dry-run).
read_slice_state() {
  STATE=""
  if [[ "$DRY_RUN" == 1 ]]; then
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)'
  else
    STATE="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)' 2>/dev/null || true)"
  fi
}

cmd_create() {
  read_slice_state
  case "$STATE" in
    READY | CREATING | STARTING | RESTARTING | REPAIRING)
      echo "reusing TPU VM $TPU_NAME (state $STATE)" >&2
      return 0
      ;;
    "") ;;
    *)
      echo "TPU VM $TPU_NAME is $STATE: deleting it to create it again" >&2
      cmd_delete
      ;;
  esac
  local flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ "$SPOT" == 1 ]] && flags+=(--spot)
  [[ "$PREEMPTIBLE" == 1 ]] && flags+=(--preemptible)
  tpu create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "${flags[@]}"
}

cmd_setup() {
  local archive="${TMPDIR:-/tmp}/coca_jax_src.tar.gz"
  # The working tree as git sees it (tracked and untracked-but-not-ignored files, less
  # tracked ones deleted here), so the workers run exactly what is checked out here,
  # uncommitted edits included.
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ (cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | (existing files only) | tar --null -T - -czf $(quote "$archive"))"
  else
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' path; do [[ -e "$path" ]] && printf '%s\0' "$path"; done \
      | tar --null -T - -czf "$archive")
  fi
  tpu scp "$archive" "$TPU_NAME:~/coca_jax_src.tar.gz" --worker=all "${GCLOUD_FLAGS[@]}"
  # The package needs Python >= 3.11; the TPU images ship 3.10, so install 3.11 beside it.
  # A worker still training keeps its installed code: replacing the source under a live
  # trainer (which imports modules later, e.g. its evals) would mix two versions.
  local install
  install="if $TRAINING; then echo \"\$(hostname): training (pid \$(cat $REMOTE_PID)): installed code left as is\"; exit 0; fi; "
  install+="set -e; "
  install+="command -v python3.11 >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv; }; "
  install+="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/coca_jax_src.tar.gz -C $REMOTE_DIR; "
  install+="[ -x $REMOTE_VENV/bin/python ] || python3.11 -m venv $REMOTE_VENV; "
  install+="$REMOTE_VENV/bin/pip install -q -U pip; "
  install+="cd $REMOTE_DIR && $REMOTE_VENV/bin/pip install -q -e '.[tpu]'"
  on_all_workers "$install"
}

cmd_train() {
  [[ "$WORKDIR" == gs://* ]] || die "WORKDIR must be a gs:// path that every worker can reach (got '${WORKDIR}'); set --workdir=gs://BUCKET/RUN"
  local train
  train="$REMOTE_VENV/bin/python $(quote_all -m coca_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")"
  # nohup + </dev/null: the trainer outlives the ssh session; SIGTERM (preemption or
  # `stop`) makes it checkpoint and exit 0. A trainer still running is left alone, and
  # that is success: `all` run again (a retry loop whose log stream dropped) goes on to
  # the logs of the run in progress.
  on_all_workers "if $TRAINING; then echo \"\$(hostname): already training (pid \$(cat $REMOTE_PID)), left running; run stop first to start it with other settings\"; exit 0; fi; cd $REMOTE_DIR || exit 1; nohup $train >$REMOTE_LOG 2>&1 </dev/null & echo \$! >$REMOTE_PID; echo \"\$(hostname): started pid \$(cat $REMOTE_PID), log $REMOTE_LOG\""
}

cmd_logs() {
  tpu ssh "$TPU_NAME" --worker="$LOG_WORKER" "${GCLOUD_FLAGS[@]}" --command="tail -n +1 -F $REMOTE_LOG"
}

cmd_stop() {
  on_all_workers "[ -f $REMOTE_PID ] && kill -TERM \$(cat $REMOTE_PID) && echo \"\$(hostname): SIGTERM sent\" || true"
}

cmd_status() {
  tpu describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format='value(state,acceleratorType,schedulingConfig)'
}

cmd_delete() {
  tpu delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
}

case "$SUBCOMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  delete) cmd_delete ;;
  all)
    # Check what train needs before spending money on a slice.
    [[ "$WORKDIR" == gs://* ]] || die "WORKDIR must be a gs:// path (got '${WORKDIR}'); set --workdir=gs://BUCKET/RUN"
    cmd_create
    cmd_setup
    cmd_train
    cmd_logs
    ;;
  *) die "unknown subcommand '$SUBCOMMAND'; use create|setup|train|logs|stop|status|delete|all" ;;
esac
