#!/usr/bin/env bash
# The demo on this machine: a small CoCa trained on the offline demo mixture (CPU is fine).
#
#   launch/local.sh [--dry-run] [--config.KEY=VALUE ...]
#
# runs, from the repository root,
#   python -m coca_jax.train --config=configs/demo.py --workdir=${WORKDIR:-/tmp/coca_demo} [overrides]
# The first run prepares the demo data; a second run with the same WORKDIR resumes from its
# latest checkpoint (SIGTERM, `kill PID`, checkpoints and stops). Examples:
#   launch/local.sh --config.train.steps=100
#   WORKDIR=/tmp/coca_tiny CONFIG=configs/tiny.py launch/local.sh
#
# Environment: WORKDIR (default /tmp/coca_demo), CONFIG (default configs/demo.py),
# PYTHON (default .venv/bin/python; when there is no .venv, one is made first with
# `python3.11 -m venv .venv && .venv/bin/pip install -e ".[test]"`), DRY_RUN=1 (= --dry-run).
# Options: --dry-run prints the command instead of running it; -h, --help this text.
# Every other argument (--config.KEY=VALUE overrides) goes to the trainer.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${WORKDIR:-/tmp/coca_demo}"
CONFIG="${CONFIG:-configs/demo.py}"
DRY_RUN="${DRY_RUN:-0}"
SETUP=0
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$REPO_ROOT/.venv/bin/python"
  [[ -x "$PYTHON" ]] || SETUP=1
fi

OVERRIDES=()
while (($#)); do
  case "$1" in
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) OVERRIDES+=("$1") ;;
  esac
  shift
done

cd "$REPO_ROOT"
if [[ "$SETUP" == 1 ]]; then
  base_python="$(command -v python3.11 || command -v python3)"
  setup=("$base_python" -m venv .venv)
  install=(.venv/bin/python -m pip install -q -e ".[test]")
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'; printf ' %q' "${setup[@]}"; printf '\n'
    printf '+'; printf ' %q' "${install[@]}"; printf '\n'
  else
    echo "[local.sh] no .venv: creating it and installing coca_jax (a few minutes, once)" >&2
    "${setup[@]}"
    "${install[@]}"
  fi
fi
command=("$PYTHON" -m coca_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '+'
  printf ' %q' "${command[@]}"
  printf '\n'
  exit 0
fi
exec "${command[@]}"
