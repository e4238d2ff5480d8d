#!/usr/bin/env bash
# Build the pinned chexlib environment in a virtualenv (default .venv).
#
# Order matters: TensorFlow first, then Horovod compiled from source against
# that TensorFlow (with Gloo, so no MPI is needed), then everything else under
# the same constraints file. Never `pip install horovod[tensorflow]`: that
# extra pulls a TensorFlow release Horovod 0.28.1 cannot build against
# (horovod issue #4290).
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}  # quiet TensorFlow start-up logs
VENV=${1:-.venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
CONSTRAINTS="$HERE/requirements/constraints.txt"
TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1

die() { echo "setup_env: $*" >&2; exit 1; }

# --- prerequisites: say exactly what is missing -----------------------------
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || die "python3.11 not found. Install Python 3.11 (e.g. 'apt install python3.11 python3.11-venv python3.11-dev', 'pyenv install 3.11', or use environment.yml with conda) or set PYTHON=/path/to/python3.11."
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || die "$PYTHON is not Python 3.11 (TensorFlow $TF_VERSION + Horovod $HOROVOD_VERSION are pinned to it)."
command -v cmake >/dev/null 2>&1 || die "cmake not found; Horovod is compiled from source. Install it ('apt install cmake' or 'pip install cmake')."
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || die "no C++ compiler found; Horovod is compiled from source. Install one ('apt install g++' or 'conda install gxx_linux-64')."

# --- virtualenv + TensorFlow -------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -c "$CONSTRAINTS" pip setuptools wheel

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TF_PKG="tensorflow[and-cuda]==$TF_VERSION"   # a GPU is present: CUDA build
elif [ "$(uname -s)-$(uname -m)" = "Darwin-arm64" ]; then
  TF_PKG="tensorflow==$TF_VERSION"             # no tensorflow-cpu wheel for Apple silicon
else
  TF_PKG="tensorflow-cpu==$TF_VERSION"
fi
if ! "$VENV/bin/python" -c "import tensorflow as tf, sys; sys.exit(tf.__version__ != '$TF_VERSION')" 2>/dev/null; then
  echo "setup_env: installing $TF_PKG"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" "$TF_PKG"
fi

# --- Horovod from source, with TensorFlow and Gloo ---------------------------
"${PIP[@]}" install -q -c "$CONSTRAINTS" cloudpickle psutil pyyaml packaging cffi
if ! "$VENV/bin/python" -c "import horovod.tensorflow" 2>/dev/null; then
  echo "setup_env: compiling horovod==$HOROVOD_VERSION against TensorFlow (a few minutes)"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=${HOROVOD_WITHOUT_MPI:-1} \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    "${PIP[@]}" install -q --no-build-isolation --no-deps --no-cache-dir "horovod==$HOROVOD_VERSION"
fi

# --- the rest, pinned --------------------------------------------------------
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e "$HERE[dev]"

# --- checks ------------------------------------------------------------------
BUILD=$("$VENV/bin/horovodrun" --check-build)
echo "$BUILD" | grep -q '\[X\] TensorFlow' || die "horovodrun --check-build does not list TensorFlow:\n$BUILD"
echo "$BUILD" | grep -q '\[X\] Gloo' || die "horovodrun --check-build does not list Gloo:\n$BUILD"

# A Jupyter kernel named chexlib, so JupyterLab and papermill use this env.
"$VENV/bin/python" -m ipykernel install --sys-prefix --name chexlib --display-name "Python (chexlib)" >/dev/null
# mkdocs-jupyter (the book) brings jupytext, whose JupyterLab extension opens every .py
# and .md file as a notebook; this project's notebooks are .ipynb, so it is turned off.
if ! "$VENV/bin/jupyter" labextension disable --level=sys_prefix jupyterlab-jupytext >/dev/null 2>&1; then
  echo "setup_env: note: could not disable jupytext's JupyterLab extension (.py files may open as notebooks)"
fi
echo "setup_env: ready ($VENV): TensorFlow $TF_VERSION, Horovod $HOROVOD_VERSION (TensorFlow + Gloo)"
