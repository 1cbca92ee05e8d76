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
#   create   create the slice, or reuse it when one of that name is READY (or still coming
#            up); a PREEMPTED or TERMINATED one is deleted and created again, any other state
#            (STOPPED, UNHEALTHY, DELETING, ...) stops with a message
#   setup    copy this working tree to ~/coca_jax on every worker (--worker=all) and
#            `pip install -e .[tpu]` it into ~/coca_venv (Python 3.11, installed if missing);
#            a worker whose trainer is running keeps its installed code
#   train    start `python -m coca_jax.train --config=CONFIG --workdir=WORKDIR OVERRIDES` on
#            every worker under a nohup'd wrapper: each worker logs to ~/coca_train.log, the
#            trainer's pid goes to ~/coca_train.pid and its exit status to ~/coca_train.rc.
#            All workers run the same command: JAX and libtpu find the other hosts themselves.
#            A trainer already running is left running (`stop` first to restart it).
#   logs     follow worker LOG_WORKER's log (default 0; `all` interleaves every worker) until
#            its trainer exits, then exit with the trainer's exit status
#   stop     SIGTERM the trainer on every worker (it checkpoints at the next step and exits 0)
#            and wait until it has exited, at most STOP_TIMEOUT seconds (default 900)
#   status   the slice's state (READY, PREEMPTED, ...)
#   delete   delete the slice (the gs:// workdir is kept)
#   all      create, setup, train, logs. Exit status: 0 the run finished or was stopped with
#            `stop`; 75 (EX_TEMPFAIL) worth retrying: the trainer was preempted, the ssh
#            connection or log stream was lost, `create` failed (no capacity), or the slice
#            was preempted during setup or train; any other status is a failure that
#            retrying will not fix (trainer error, setup failure on a live slice, a
#            `create` that gcloud refused for another reason: type, zone, quota, access)
#
# Options (each also read from the environment variable in brackets)
#   --project=P            [PROJECT, else gcloud's configured project]
#   --zone=Z               [ZONE, default us-central2-b]
#   --accelerator_type=T   [ACCELERATOR_TYPE, default v4-32]
#   --runtime_version=V    [RUNTIME_VERSION, default from the accelerator type: v5litepod-* (v5e)
#                           v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e,
#                           others (v4) tpu-ubuntu2204-base]
#   --name=N               [TPU_NAME, default coca-$USER]
#   --workdir=gs://...     [WORKDIR; required by train: every worker must see it, so use a bucket]
#   --config=FILE[:ARGS]   [CONFIG, default configs/base.py], e.g. configs/large.py:bf16
#   --spot                 [SPOT=1] create a Spot slice (cheaper; may be preempted at any time)
#   --preemptible          [PREEMPTIBLE=1] the older preemptible kind (at most 24 h)
#   --dry-run              [DRY_RUN=1] print each command instead of running it
#   -h, --help             this text
# Arguments of the form --config.KEY=VALUE, and everything after `--`, go to the trainer.
# STOP_TIMEOUT (seconds, default 900) bounds how long `stop` waits for the checkpoint.
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
#   A loop retries while `all` exits 75 (preempted, capacity short, connection lost) and
#   ends when the run finishes, is stopped, or fails for a reason retrying will not fix:
#     until launch/tpu_vm.sh --spot all [same overrides]; [ $? -ne 75 ]; do sleep 60; done
#   Keep the overrides identical across restarts. `delete` the slice when the loop ends.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"  # empty: chosen from ACCELERATOR_TYPE after the options
TPU_NAME="${TPU_NAME:-coca-${USER:-user}}"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/base.py}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
DRY_RUN="${DRY_RUN:-0}"
LOG_WORKER="${LOG_WORKER:-0}"
STOP_TIMEOUT="${STOP_TIMEOUT:-900}"

# `all`'s exit status when another try may succeed (sysexits.h EX_TEMPFAIL).
EX_TEMPFAIL=75
# gcloud's errors of a create that another try may get past: the zone out of capacity
# (RESOURCE_EXHAUSTED, code 8; Spot above all) or the service briefly unavailable
# (UNAVAILABLE, code 14). A quota refusal is RESOURCE_EXHAUSTED too, but another try
# gets the same quota: QUOTA_ERRORS wins.
CAPACITY_ERRORS='no more capacity|RESOURCE_EXHAUSTED|"code": 8|"code": 14|UNAVAILABLE|[Ii]nsufficient capacity|[Ss]tockout|try again later'
QUOTA_ERRORS='[Qq]uota'

# Paths on each worker; the ~ expands there, in the worker's shell.
# shellcheck disable=SC2088
REMOTE_DIR='~/coca_jax'
# shellcheck disable=SC2088
REMOTE_VENV='~/coca_venv'
# shellcheck disable=SC2088
REMOTE_LOG='~/coca_train.log'
# shellcheck disable=SC2088
REMOTE_PID='~/coca_train.pid'
# The trainer's exit status, written by its wrapper when it exits.
# shellcheck disable=SC2088
REMOTE_RC='~/coca_train.rc'
# Left by `stop`, cleared by `train`: the trainer's exit after SIGTERM was the user's, not a
# preemption, so `all` must not ask for a retry.
# shellcheck disable=SC2088
REMOTE_STOPPED='~/coca_train.stopped'
# The line coca_jax.train logs when SIGTERM made it checkpoint and leave early.
PREEMPTED_LINE='preempted: checkpoint at step'

# Remote shell test: a trainer of this slice is alive on the worker (it may be the one a
# preemption-retry loop of `all` started earlier). The pid alone is not trusted: after a
# reboot a stale pid file can name some other process.
TRAINING="[ -f $REMOTE_PID ] && grep -qaF coca_jax.train /proc/\$(cat $REMOTE_PID)/cmdline 2>/dev/null"

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
[[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a number of seconds (got '$STOP_TIMEOUT')"

# Each TPU generation boots its own software image: the v4 one on a v5e/v5p/v6e slice
# comes up without a working libtpu.
if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-* | v5e | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

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
    PREEMPTED | TERMINATED)
      echo "TPU VM $TPU_NAME is $STATE: deleting it to create it again" >&2
      cmd_delete
      ;;
    *)
      # STOPPED, UNHEALTHY, DELETING, ...: deleting (or waiting) is the user's call, it may
      # be a slice kept on purpose.
      die "TPU VM $TPU_NAME is $STATE; create replaces only a PREEMPTED or TERMINATED slice: start it (gcloud compute tpus tpu-vm start $TPU_NAME), wait for it, or delete it (launch/tpu_vm.sh delete), then run this again"
      ;;
  esac
  local flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ "$SPOT" == 1 ]] && flags+=(--spot)
  [[ "$PREEMPTIBLE" == 1 ]] && flags+=(--preemptible)
  tpu create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "${flags[@]}"
}

ARCHIVE_DIR=""  # setup's temporary archive folder, removed on exit
remove_archive() {
  [[ -z "$ARCHIVE_DIR" ]] || rm -rf "$ARCHIVE_DIR"
}
trap remove_archive EXIT

cmd_setup() {
  # A folder of this launch's own (mktemp): two launches at once (two slices) each ship
  # their own working tree, not whichever archive was written last.
  local archive
  if [[ "$DRY_RUN" == 1 ]]; then
    archive="${TMPDIR:-/tmp}/coca_jax_src.XXXXXX/coca_jax_src.tar.gz"
  else
    ARCHIVE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/coca_jax_src.XXXXXX")"
    archive="$ARCHIVE_DIR/coca_jax_src.tar.gz"
  fi
  # The working tree as git sees it (tracked and untracked-but-not-ignored files, less
  # tracked ones deleted here), so the workers run exactly what is checked out here,
  # uncommitted edits included.
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ (cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | (existing files only) | tar --null -T - -czf $(quote "$archive"))"
  else
    # `|| continue`, not `[[ -e ]] && printf`: a missing last path would end the loop, and
    # the pipeline, with status 1 and stop the script without a word (set -e, pipefail).
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' path; do
        [[ -e "$path" ]] || continue
        printf '%s\0' "$path"
      done \
      | tar --null -T - -czf "$archive")
  fi
  tpu scp "$archive" "$TPU_NAME:~/coca_jax_src.tar.gz" --worker=all "${GCLOUD_FLAGS[@]}"
  if [[ -n "$ARCHIVE_DIR" ]]; then
    rm -rf "$ARCHIVE_DIR"
    ARCHIVE_DIR=""
  fi
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
  local trainer wrapper train
  trainer="$REMOTE_VENV/bin/python $(quote_all -m coca_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")"
  # The wrapper (bash -c, the trainer's command line its "$@") keeps the trainer's exit
  # status, which `logs` reports once the trainer is gone. The pid file names the trainer
  # itself, not the wrapper, so that `stop`'s SIGTERM reaches the process that checkpoints.
  wrapper="\"\$@\" & echo \$! >$REMOTE_PID; wait \$!; echo \$? >$REMOTE_RC"
  # nohup + </dev/null: the trainer outlives the ssh session; SIGTERM (preemption or
  # `stop`) makes it checkpoint and exit 0. A trainer still running is left alone, and
  # that is success: `all` run again (a retry loop whose log stream dropped) goes on to
  # the logs of the run in progress. Starting one clears the last run's status and stop
  # marker; the wait for the pid file lets `logs` and `stop` find the trainer at once.
  train="if $TRAINING; then echo \"\$(hostname): already training (pid \$(cat $REMOTE_PID)), left running; run stop first to start it with other settings\"; exit 0; fi; "
  train+="cd $REMOTE_DIR || exit 1; "
  train+="rm -f $REMOTE_PID $REMOTE_RC $REMOTE_STOPPED; "
  train+="nohup bash -c $(quote "$wrapper") coca_train $trainer >$REMOTE_LOG 2>&1 </dev/null & "
  train+="i=0; while [ ! -s $REMOTE_PID ]; do i=\$((i + 1)); if [ \$i -gt 100 ]; then echo \"\$(hostname): no trainer pid after 10 s; see $REMOTE_LOG\" >&2; exit 1; fi; sleep 0.1; done; "
  train+="echo \"\$(hostname): started pid \$(cat $REMOTE_PID), log $REMOTE_LOG\""
  on_all_workers "$train"
}

# Remote command of `logs`: follow the log until the trainer exits, then exit with its
# status. With `outcome` (for `all`), a preemption (exit 0 after the preempted line, no
# `stop` marker) exits 75 instead, and a trainer's own 75 or 255 becomes 1, so that 75
# only ever means "retry" and 255 "ssh failed".
logs_command() {
  local mode="$1" follow
  follow="if $TRAINING; then tail --pid=\$(cat $REMOTE_PID) -n +1 -F $REMOTE_LOG; "
  follow+="elif [ -f $REMOTE_LOG ]; then cat $REMOTE_LOG; "
  follow+="else echo \"\$(hostname): no trainer was started here (no $REMOTE_LOG); run train\" >&2; exit 1; fi; "
  # The wrapper writes the status just after the trainer exits; tail notices the exit
  # within a second, and may be first.
  follow+="i=0; while [ ! -s $REMOTE_RC ] && [ \$i -lt 10 ]; do sleep 1; i=\$((i + 1)); done; "
  follow+="if [ ! -s $REMOTE_RC ]; then echo \"\$(hostname): the trainer is not running and left no exit status in $REMOTE_RC\" >&2; exit 1; fi; "
  follow+="rc=\$(cat $REMOTE_RC); echo \"\$(hostname): the trainer exited with status \$rc\" >&2; "
  if [[ "$mode" == outcome ]]; then
    follow+="case \$rc in $EX_TEMPFAIL | 255) rc=1 ;; esac; "
    follow+="if [ \"\$rc\" = 0 ] && [ ! -f $REMOTE_STOPPED ] && grep -qF $(quote "$PREEMPTED_LINE") $REMOTE_LOG; then "
    follow+="echo \"\$(hostname): the trainer was preempted (checkpoint written): run all again to resume\" >&2; exit $EX_TEMPFAIL; fi; "
  fi
  follow+="exit \$rc"
  printf '%s' "$follow"
}

cmd_logs() {
  tpu ssh "$TPU_NAME" --worker="$LOG_WORKER" "${GCLOUD_FLAGS[@]}" --command="$(logs_command "${1:-status}")"
}

cmd_stop() {
  # The marker goes first, so that a log stream that sees the trainer exit (`all` in another
  # terminal) finds it. Waiting for the exit (the checkpoint is written by then) lets
  # `stop && train` start the new trainer instead of finding the old one still alive.
  local stop
  stop="touch $REMOTE_STOPPED; "
  stop+="if $TRAINING; then pid=\$(cat $REMOTE_PID); kill -TERM \$pid && echo \"\$(hostname): SIGTERM sent to pid \$pid; waiting for its checkpoint\"; "
  stop+="i=0; while kill -0 \$pid 2>/dev/null; do "
  stop+="if [ \$i -ge $STOP_TIMEOUT ]; then echo \"\$(hostname): the trainer (pid \$pid) is still running after $STOP_TIMEOUT s (STOP_TIMEOUT); it may still be writing its checkpoint: run stop again, or kill -KILL \$pid\" >&2; exit 1; fi; "
  stop+="sleep 1; i=\$((i + 1)); done; echo \"\$(hostname): the trainer has exited\"; fi; "
  stop+="rm -f $REMOTE_PID"
  on_all_workers "$stop"
}

cmd_status() {
  tpu describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format='value(state,acceleratorType,schedulingConfig)'
}

cmd_delete() {
  tpu delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
}

# Sets OUTCOME, `all`'s exit status for a step (setup, train, logs) that ended with
# `status`: 75 (worth retrying) when the connection or the slice went away under it, i.e.
# ssh's own 255, or any failure while the slice is no longer READY (preempted mid-step);
# otherwise `status` itself.
judge() {
  local status="$1" step="$2"
  OUTCOME="$status"
  case "$status" in
    0 | "$EX_TEMPFAIL") ;;
    255)
      echo "$LAUNCH_NAME: lost the ssh connection to $TPU_NAME during $step: exit $EX_TEMPFAIL, worth retrying (training goes on if the slice is up; \`all\` again follows it)" >&2
      OUTCOME="$EX_TEMPFAIL"
      ;;
    *)
      # gcloud's own failures (1) look like the step's: a slice no longer READY means the
      # connection went with it (preemption), not a failure of the step.
      read_slice_state
      if [[ "$STATE" != READY ]]; then
        echo "$LAUNCH_NAME: $step ended with status $status and TPU VM $TPU_NAME is ${STATE:-gone}: exit $EX_TEMPFAIL, worth retrying" >&2
        OUTCOME="$EX_TEMPFAIL"
      fi
      ;;
  esac
}

# Runs one step of `all` (a function) and sets OUTCOME (`judge`). The step runs in a
# subshell with errexit on: called as `step || ...`, bash would ignore set -e inside it
# and go on after a failed command.
run_step() {
  local status=0
  set +e
  (
    set -e
    trap remove_archive EXIT  # a subshell does not inherit the trap
    "$@"
  )
  status=$?
  set -e
  judge "$status" "${1#cmd_}"
}

# `all`: create, setup, train, logs, with an exit status a retry loop can act on (see -h).
cmd_all() {
  # Check what train needs before spending money on a slice.
  [[ "$WORKDIR" == gs://* ]] || die "WORKDIR must be a gs:// path (got '${WORKDIR}'); set --workdir=gs://BUCKET/RUN"
  # A create that failed for capacity is worth retrying; any other failure (a wrong
  # accelerator type, zone or runtime, quota, permissions, credentials) would fail every
  # time: exit 1. A slice in a state create will not touch stops it with `die` (status 2).
  # create's stderr goes on to the terminal and into a file (a pipeline: its status is
  # create's under pipefail; a die in it, status 2, ends the subshell).
  local errors status=0
  errors="$(mktemp "${TMPDIR:-/tmp}/coca_tpu_create.XXXXXX")"
  { cmd_create 2>&1 1>&3 3>&- | tee "$errors" >&2; } 3>&1 || status=$?
  local capacity=0
  if ((status != 0)) && grep -qE "$CAPACITY_ERRORS" "$errors" && ! grep -qE "$QUOTA_ERRORS" "$errors"; then
    capacity=1
  fi
  rm -f "$errors"
  if ((capacity)); then
    echo "$LAUNCH_NAME: could not create TPU VM $TPU_NAME: no capacity: exit $EX_TEMPFAIL, worth retrying" >&2
    exit "$EX_TEMPFAIL"
  fi
  if ((status != 0)); then
    ((status == 2)) && exit 2  # create stopped at a slice it will not touch (its message above)
    echo "$LAUNCH_NAME: could not create TPU VM $TPU_NAME, and not for capacity (gcloud's error above): exit 1, not retried" >&2
    exit 1
  fi
  local step
  for step in cmd_setup cmd_train; do
    run_step "$step"
    ((OUTCOME == 0)) || exit "$OUTCOME"
  done
  run_step cmd_logs outcome
  exit "$OUTCOME"
}

case "$SUBCOMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  delete) cmd_delete ;;
  all) cmd_all ;;
  *) die "unknown subcommand '$SUBCOMMAND'; use create|setup|train|logs|stop|status|delete|all" ;;
esac
