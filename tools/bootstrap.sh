#!/usr/bin/env bash
# Create or reuse the virtualenv and install fastmeta into it, never downloading a CUDA torch.
#  - fresh CPU machine: venv + the pinned CPU torch (TORCH_VERSION) from pip
#  - GPU image (torch preinstalled, no internet): venv with --system-site-packages reusing
#    that torch; nothing already importable is installed again.
# Usage: tools/bootstrap.sh VENV_DIR
set -euo pipefail
VENV=${1:-.venv}
SYS_PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$SYS_PYTHON" -c "import torch" 2>/dev/null; then
    echo "bootstrap: reusing the system torch ($("$SYS_PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$SYS_PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$SYS_PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==$TORCH_VERSION (CPU build)"
  pip_install "torch==$TORCH_VERSION"
fi
# Pin whatever torch is now present so no package can pull another one.
CONSTRAINTS="$VENV/constraints.txt"
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$CONSTRAINTS"

missing=()
need() { "$PY" -c "import $1" 2>/dev/null || missing+=("$2"); }
need numpy "numpy<2.4"
need pytest "pytest>=8"
need pytest_benchmark "pytest-benchmark"
need expecttest "expecttest"
need pybind11 "pybind11"
need ninja "ninja"
need matplotlib "matplotlib"
need tqdm "tqdm"
need PIL "pillow"
if [ "$(uname -s)" = Linux ]; then
  need triton "triton==3.6.0"
  # Triton 3.6's interpreter breaks on numpy 2.4
  "$PY" -c "import numpy, sys; v = tuple(map(int, numpy.__version__.split('.')[:2])); sys.exit(v >= (2, 4))" 2>/dev/null \
    || missing+=("numpy<2.4")
fi
if ! command -v cmake >/dev/null && ! "$PY" -c "import cmake" 2>/dev/null; then missing+=("cmake<4"); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  pip_install -c "$CONSTRAINTS" "${missing[@]}"
fi

echo "bootstrap: building and installing fastmeta (editable)"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
  > "$VENV/fastmeta-build.log" 2>&1 || { cat "$VENV/fastmeta-build.log"; exit 1; }
"$PY" -c "from fastmeta import _ext; print('bootstrap: C++ extension', 'built' if _ext.available() else 'unavailable: ' + _ext.reason(), _ext.build_info() if _ext.available() else '')"
