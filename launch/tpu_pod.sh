#!/bin/bash
# Trains on a Cloud TPU VM slice (a pod slice has several workers, one VM
# each): creates the slice or reuses one of the same name, puts this checkout
# (or a clone of --repo) on every worker, installs it, and runs the main
# command on all workers at once. JAX finds the other workers by itself on a
# TPU slice, so the command carries no multi-host flags. Every line a worker
# prints comes back prefixed with its host name and is kept in logs/.
#
#   launch/tpu_pod.sh --workdir=gs://BUCKET/RUN [options] [-- --config.a.b=value ...]
#
# Options [defaults]:
#   --workdir=gs://...    the run's folder; all workers write it, so gs:// (required)
#   --config=FILE         [configs/multitask_coco.py]
#   --mode=MODE           [train_and_eval] (train, eval, data, plan)
#   --project=ID          [gcloud's configured project]
#   --zone=ZONE           [us-central2-b]
#   --tpu=NAME            [unified-seq]
#   --accelerator=TYPE    [v4-32] (4 workers); e.g. v5litepod-16, v6e-16
#   --version=RUNTIME     [tpu-ubuntu2204-base]; v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e
#   --spot                create the slice as Spot capacity
#   --repo=URL            clone URL on the workers instead of copying this checkout
#   --ref=BRANCH          branch or tag of --repo [its default branch]
#   --delete              delete the slice when the run ends
#   --dry-run             print every command instead of running it
# Everything after -- goes to the main command, e.g. --config.data.coco_dir=gs://BUCKET/coco.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="" CONFIG=configs/multitask_coco.py MODE=train_and_eval PROJECT=""
ZONE=us-central2-b TPU=unified-seq ACCELERATOR=v4-32 VERSION=tpu-ubuntu2204-base
SPOT="" REPO="" REF="" DELETE=0
OVERRIDES=()
while (($#)); do
  case "$1" in
    --workdir=*) WORKDIR=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --mode=*) MODE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --tpu=*) TPU=${1#*=} ;;
    --accelerator=*) ACCELERATOR=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --spot) SPOT=--spot ;;
    --repo=*) REPO=${1#*=} ;;
    --ref=*) REF=${1#*=} ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    --) shift && OVERRIDES=("$@") && break ;;
    *) die "unknown option $1 (flags for the main command go after --)" ;;
  esac
  shift
done
[[ $WORKDIR == gs://* ]] || die "--workdir=gs://BUCKET/RUN is required: every worker writes the run there"

WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU" "${WHERE[@]}" --worker=all --command="$1"
}

# 1. The slice: reuse one of this name (a second run resumes its workdir), else create it.
if ((DRY_RUN)); then
  echo "# when 'gcloud compute tpus tpu-vm describe $TPU' finds no slice of that name:"
fi
if ((DRY_RUN)) || ! gcloud compute tpus tpu-vm describe "$TPU" "${WHERE[@]}" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$TPU" "${WHERE[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION" $SPOT
fi

# 2. The code on every worker, in ~/unified_seq.
if [[ -n $REPO ]]; then
  on_all_workers "rm -rf ~/unified_seq && git clone --depth=1 ${REF:+--branch=$(show "$REF") }$(show "$REPO") ~/unified_seq"
else
  TARBALL="${TMPDIR:-/tmp}/unified_seq-$TPU.tar.gz"
  pack_checkout "$ROOT" "$TARBALL"
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:unified_seq.tar.gz" "${WHERE[@]}" --worker=all
  on_all_workers "rm -rf ~/unified_seq && mkdir ~/unified_seq && tar -xzf ~/unified_seq.tar.gz -C ~/unified_seq"
fi

# 3. Install; the environment lives outside the checkout so a rerun keeps it.
on_all_workers "bash ~/unified_seq/launch/install.sh tpu ~/unified_seq_venv"

# 4. The main command on all workers; their lines, tagged by host, come back into logs/.
# shellcheck disable=SC2088  # ~ is the worker's home, expanded there
MAIN=('~/unified_seq_venv/bin/python' -m unified_seq.main --config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE")
MAIN+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
LOG="$ROOT/logs/$TPU-$(date -u +%Y%m%d-%H%M%S).log"
status=0
run_logged "$LOG" gcloud compute tpus tpu-vm ssh "$TPU" "${WHERE[@]}" --worker=all \
  --command="set -o pipefail; cd ~/unified_seq && $(show "${MAIN[@]}") 2>&1 | sed -u \"s/^/[\$(hostname)] /\"" ||
  status=$?
((DRY_RUN)) || echo "log: $LOG"

# 5. Optionally give the slice back, whether or not the run succeeded.
if ((DELETE)); then
  run gcloud compute tpus tpu-vm delete "$TPU" "${WHERE[@]}" --quiet
fi
exit $status
