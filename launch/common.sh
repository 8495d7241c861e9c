# shellcheck shell=bash
# Helpers the launchers source: one way to print or run a command.
# Written for bash 3.2 too, the bash of macOS.

DRY_RUN=${DRY_RUN:-0}

# Prints a command as one line that pastes back into a shell: words that need
# no quoting stay bare, the others are single-quoted.
show() {
  local out="" word flag safe='^[A-Za-z0-9_./:=,@%+~-]+$' option='^(--[A-Za-z0-9_.-]+=)(.*)$'
  for word in "$@"; do
    flag=""
    # --flag='a value' reads better than '--flag=a value'.
    if [[ $word =~ $option ]]; then
      flag=${BASH_REMATCH[1]}
      word=${BASH_REMATCH[2]}
    fi
    if [[ $word =~ $safe ]]; then
      out+=" $flag$word"
    else
      out+=" $flag'${word//\'/\'\\\'\'}'"
    fi
  done
  echo "${out# }"
}

# Runs a command, or with --dry-run only prints it.
run() {
  if ((DRY_RUN)); then show "$@"; else "$@"; fi
}

# Runs a command with its output shown and also kept in LOG.
run_logged() {
  local log=$1
  shift
  if ((DRY_RUN)); then
    echo "$(show "$@") 2>&1 | tee $(show "$log")"
  else
    mkdir -p "$(dirname "$log")"
    "$@" 2>&1 | tee "$log"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Prints the comment block at the top of the calling script (its usage).
usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

# Packs a checkout into a .tar.gz without its git history, virtual
# environments, caches and local logs (they can be large and are not needed).
pack_checkout() {
  local root=$1 tarball=$2
  run tar -czf "$tarball" -C "$root" --exclude=.git --exclude=.venv --exclude=logs \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude='workdir*' .
}
