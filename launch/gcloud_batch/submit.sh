#!/bin/bash
# Trains on GPU VMs with a gcloud Batch job: one task per VM, each one JAX
# process. Packs this checkout into WORKDIR/batch/, fills job.json and submits
# it. Every task installs the code (task.sh install), waits at a barrier for
# the others, then runs the main command with --coordinator_address,
# --num_processes and --process_id taken from the job's hosts file (task.sh run).
#
#   launch/gcloud_batch/submit.sh --workdir=gs://BUCKET/RUN [options] [-- --config.a.b=value ...]
#   launch/gcloud_batch/submit.sh --workdir=gs://BUCKET/RUN --logs    copy the tasks' logs into logs/
#
# Options [defaults]:
#   --workdir=gs://...    the run's folder; all hosts write it, so gs:// (required)
#   --config=FILE         [configs/multitask_coco.py]
#   --mode=MODE           [train_and_eval] (train, eval, data, plan)
#   --project=ID          [gcloud's configured project]
#   --location=REGION     [us-central1]
#   --job=NAME            [unified-seq-<UTC date and time>]
#   --hosts=N             VMs, one JAX process each [2]
#   --machine-type=TYPE   [a2-highgpu-1g] (1 A100); any type with GPUs built in (A2, A3, G2)
#   --port=PORT           coordinator port on the first host [8476]
#   --max-run=SECONDS     limit on a task's run time [86400]
#   --dry-run             print the filled job spec and every command instead of running them
# Everything after -- goes to the main command, e.g. --config.data.coco_dir=gs://BUCKET/coco.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/../common.sh"

ROOT="$(cd "$HERE/../.." && pwd)"
WORKDIR="" CONFIG=configs/multitask_coco.py MODE=train_and_eval PROJECT="" LOCATION=us-central1
JOB="unified-seq-$(date -u +%Y%m%d-%H%M%S)" HOSTS=2 MACHINE_TYPE=a2-highgpu-1g PORT=8476
MAX_RUN=86400 FETCH_LOGS=0
OVERRIDES=()
while (($#)); do
  case "$1" in
    --workdir=*) WORKDIR=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --mode=*) MODE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --location=*) LOCATION=${1#*=} ;;
    --job=*) JOB=${1#*=} ;;
    --hosts=*) HOSTS=${1#*=} ;;
    --machine-type=*) MACHINE_TYPE=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --max-run=*) MAX_RUN=${1#*=} ;;
    --logs) FETCH_LOGS=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    --) shift && OVERRIDES=("$@") && break ;;
    *) die "unknown option $1 (flags for the main command go after --)" ;;
  esac
  shift
done
[[ $WORKDIR == gs://* ]] || die "--workdir=gs://BUCKET/RUN is required: every host writes the run there"
[[ $HOSTS =~ ^[1-9][0-9]*$ ]] || die "--hosts=$HOSTS: give a positive number of VMs"
STAGE="${WORKDIR%/}/batch"

if ((FETCH_LOGS)); then
  LOGS="$ROOT/logs/$(basename "$WORKDIR")"
  run mkdir -p "$LOGS"
  run gcloud storage cp "$STAGE/logs/*" "$LOGS/"
  exit 0
fi

SCRATCH="${TMPDIR:-/tmp}/$JOB"
mkdir -p "$SCRATCH"

# 1. The code, where every task's VM mounts it (the job's GCS volume).
pack_checkout "$ROOT" "$SCRATCH/code.tar.gz"
run gcloud storage cp "$SCRATCH/code.tar.gz" "$STAGE/code.tar.gz"

# 2. The job spec: job.json with this run's values.
MAIN_FLAGS=(--config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
python3 - "$HERE/job.json" "$SCRATCH/job.json" \
  HOSTS="$HOSTS" MACHINE_TYPE="$MACHINE_TYPE" MAX_RUN_SECONDS="$MAX_RUN" \
  STAGE="${STAGE#gs://}" TASK_ARGS="$(show --port="$PORT" "${MAIN_FLAGS[@]}")" <<'EOF'
import json
import re
import sys

template, out, *pairs = sys.argv[1:]
values = dict(pair.split("=", 1) for pair in pairs)


def fill(node):
    """Replaces {{NAME}} in every string; a string that is one number becomes a number."""
    if isinstance(node, dict):
        return {key: fill(value) for key, value in node.items()}
    if isinstance(node, list):
        return [fill(value) for value in node]
    if isinstance(node, str):
        text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m[1]], node)
        return int(text) if node.startswith("{{") and text.isdigit() else text
    return node


with open(template) as f:
    spec = fill(json.load(f))
with open(out, "w") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")
EOF
if ((DRY_RUN)); then
  echo "# job spec $SCRATCH/job.json:"
  cat "$SCRATCH/job.json"
fi

# 3. Submit.
WHERE=(--location="$LOCATION")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")
run gcloud batch jobs submit "$JOB" "${WHERE[@]}" --config="$SCRATCH/job.json"

cat <<EOF
# state:   gcloud batch jobs describe $JOB $(show "${WHERE[@]}")
# output:  Cloud Logging (the job's Logs tab in the console), live
# logs:    $(show "$0" --workdir="$WORKDIR" --logs)   (each task's log, into logs/)
EOF
