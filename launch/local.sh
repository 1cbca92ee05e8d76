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
#   WORKDIR=/tmp/coca_tiny CONFIG=configs/tiny.py launch/local.sh --config.data.source=synthetic
#
# Environment: WORKDIR (default /tmp/coca_demo), CONFIG (default configs/demo.py),
# PYTHON (default .venv/bin/python; when it cannot import coca_jax, because there is no
# .venv or an earlier install was interrupted, it is made or repaired first with
# `python3.11 -m venv .venv && .venv/bin/pip install -e ".[test]"`, python3 when that is
# 3.11 or newer), DRY_RUN=1 (= --dry-run).
# Options: --dry-run prints the command instead of running it; -h, --help this text.
# Every other argument (--config.KEY=VALUE overrides) goes to the trainer.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${WORKDIR:-/tmp/coca_demo}"
CONFIG="${CONFIG:-configs/demo.py}"
DRY_RUN="${DRY_RUN:-0}"

# shellcheck disable=SC2034  # read by common.sh
LAUNCH_NAME=launch/local.sh
# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

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

# The .venv is (re)made unless it imports coca_jax: a .venv/bin/python alone may be the rest
# of an interrupted or failed install. pip installs coca_jax itself after its dependencies,
# so its import is the last thing a complete install adds. The import runs from /: in the
# repository the source tree is importable without any install.
SETUP=0
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$REPO_ROOT/.venv/bin/python"
  (cd / && "$PYTHON" -c 'import coca_jax') >/dev/null 2>&1 || SETUP=1
fi

cd "$REPO_ROOT"
if [[ "$SETUP" == 1 ]]; then
  # coca_jax needs Python >= 3.11 (pyproject.toml).
  base_python=""
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      base_python="$(command -v "$candidate")"
      break
    fi
  done
  [[ -n "$base_python" ]] || die "Python 3.11 or newer is needed to make .venv, and neither python3.11 nor a python3 >= 3.11 is on PATH: install python3.11 (with its venv module), or set PYTHON to an interpreter with coca_jax installed"
  setup=("$base_python" -m venv .venv)
  install=(.venv/bin/python -m pip install -q -e ".[test]")
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'; printf ' %q' "${setup[@]}"; printf '\n'
    printf '+'; printf ' %q' "${install[@]}"; printf '\n'
  else
    echo "[local.sh] .venv missing or incomplete (no coca_jax in it): making it and installing coca_jax (a few minutes, once)" >&2
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
