#!/bin/bash
# Installs the checkout this script is in, with the JAX build for one kind of
# accelerator, into a virtual environment. tpu_pod.sh runs it on every TPU
# worker, the gcloud Batch job on every GPU VM.
#
#   launch/install.sh tpu|cuda12|cpu [VENV]      VENV: [CHECKOUT/.venv]
#   launch/install.sh ... --dry-run              print the commands only
#
# jax 0.10 needs Python >= 3.11, newer than the python3 of the TPU VM images
# (Ubuntu 22.04: 3.10) and of some Batch images, so uv provides the
# interpreter: the host's own Python does not matter.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CHECKOUT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ACCELERATOR=""
VENV="$CHECKOUT/.venv"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    tpu | cuda12 | cpu) ACCELERATOR=$arg ;;
    -*) die "unknown option $arg" ;;
    *) VENV=$arg ;;
  esac
done
[[ -n $ACCELERATOR ]] || die "name the accelerator: tpu, cuda12 or cpu"

# The same range as setup.py; the extra brings libtpu or the CUDA 12 libraries.
JAX="jax>=0.10,<0.11"
[[ $ACCELERATOR == cpu ]] || JAX="jax[$ACCELERATOR]>=0.10,<0.11"

if ! command -v uv >/dev/null; then
  UV_HOME="$HOME/.local/bin"
  if ((DRY_RUN)); then
    echo "curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR=$UV_HOME UV_NO_MODIFY_PATH=1 sh"
  else
    curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR="$UV_HOME" UV_NO_MODIFY_PATH=1 sh
  fi
  export PATH="$UV_HOME:$PATH"
fi
# Kept between runs: a second install only adds what changed.
[[ -x $VENV/bin/python ]] || run uv venv --python 3.11 "$VENV"
run uv pip install --python "$VENV/bin/python" -e "$CHECKOUT" "$JAX"
run "$VENV/bin/python" -c 'import jax, unified_seq; print("installed with jax", jax.__version__)'
