# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run). The sourcing script sets
# LAUNCH_NAME, used to prefix error messages.

die() {
  echo "${LAUNCH_NAME:-launch}: $*" >&2
  exit 2
}

# Quotes one word for the shell, leaving plain words (flags, paths, host:port, gs:// URLs)
# as they are, so that dry runs print commands a person can read and paste.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}
