#!/bin/bash
# What each task of the gcloud Batch job runs (one task per VM), in two steps
# with a barrier between them in job.json:
#
#   task.sh install                                   install this checkout, JAX for CUDA 12
#   task.sh run [--port=PORT] [--dry-run] MAIN_FLAGS...   run the main command as one JAX process
#
# Batch lists the job's VMs in $BATCH_HOSTS_FILE (requireHostsFile). A
# process's id is the line of its own VM there and the coordinator is the VM
# of the first line, so the two agree whatever order the tasks start in. The
# output is also appended to logs/task-ID.log of the staging folder (the job's
# GCS volume), which submit.sh --logs copies back.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

CHECKOUT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STAGE=/mnt/disks/unified_seq
VENV=/opt/unified_seq_venv

install_checkout() {
  # uv keeps its interpreters and cache under $HOME, which a job's script may lack.
  HOME=${HOME:-/root} bash "$CHECKOUT/launch/install.sh" cuda12 "$VENV"
}

run_main() {
  local port=8476
  while (($#)); do
    case "$1" in
      --port=*) port=${1#*=} ;;
      --dry-run) DRY_RUN=1 ;;
      *) break ;;
    esac
    shift
  done
  [[ -r ${BATCH_HOSTS_FILE:-} ]] || die "no hosts file: the job needs \"requireHostsFile\": true"

  local hosts=() host rest
  while read -r host rest; do
    [[ -n $host ]] && hosts+=("$host")
  done <"$BATCH_HOSTS_FILE"
  if [[ -n ${BATCH_TASK_COUNT:-} && $BATCH_TASK_COUNT != "${#hosts[@]}" ]]; then
    die "$BATCH_TASK_COUNT tasks but ${#hosts[@]} hosts in $BATCH_HOSTS_FILE: run one task per VM (taskCountPerNode: 1)"
  fi

  # This VM's names and addresses, as the hosts file may list either.
  local mine i id=""
  mine=" $(hostname) $(hostname -s 2>/dev/null || true) $(hostname -f 2>/dev/null || true) $(hostname -I 2>/dev/null || true) "
  for i in "${!hosts[@]}"; do
    if [[ $mine == *" ${hosts[i]} "* ]]; then
      id=$i
      break
    fi
  done
  if [[ -z $id ]]; then
    id=${BATCH_TASK_INDEX:?}
    echo "task.sh: none of [${mine# }] is in $BATCH_HOSTS_FILE; taking BATCH_TASK_INDEX=$id as the process id" >&2
  fi

  local main=("$VENV/bin/python" -m unified_seq.main "$@"
    --coordinator_address="${hosts[0]}:$port" --num_processes="${#hosts[@]}" --process_id="$id")
  if ((DRY_RUN)); then
    show "${main[@]}"
    return
  fi
  mkdir -p "$STAGE/logs"
  echo "== $(date -u) process $id of ${#hosts[@]} on $(hostname)" >>"$STAGE/logs/task-$id.log"
  cd "$CHECKOUT"
  "${main[@]}" 2>&1 | tee -a "$STAGE/logs/task-$id.log"
}

case "${1:-}" in
  install) install_checkout ;;
  run) shift && run_main "$@" ;;
  *) usage && exit 2 ;;
esac
