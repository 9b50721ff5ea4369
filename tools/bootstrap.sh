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

# Phase times of this run (tools/demo.sh prints them at the end of `make demo`).
PHASES="$VENV/.bootstrap-phases.tsv"
T_PHASE=$(date +%s)
ROWS=()
phase() {  # phase NAME [NOTE]: the time since the previous phase ended
  local now; now=$(date +%s)
  ROWS+=("$1	$(( now - T_PHASE ))	${2:-}")
  T_PHASE=$now
}

if [ ! -x "$VENV/bin/python" ]; then
  if "$SYS_PYTHON" -c "import torch" 2>/dev/null; then
    echo "bootstrap: reusing the system torch ($("$SYS_PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$SYS_PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$SYS_PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
# --no-compile: pip would byte-compile every module of every wheel (28 of torch's 41 s of
# install here); the modules fastmeta imports are byte-compiled once below instead.
pip_install() { "$PY" -m pip install -q --disable-pip-version-check --no-compile "$@"; }
phase "venv"

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==$TORCH_VERSION (CPU build) and the build tools"
  pip_install "torch==$TORCH_VERSION" pybind11 ninja
fi
phase "torch"
# Pin whatever torch is now present so no package can pull another one.
CONSTRAINTS="$VENV/constraints.txt"
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$CONSTRAINTS"
# and numpy below 2.4 (Triton 3.6's interpreter breaks on 2.4), so no later package lifts it
echo "numpy<2.4" >> "$CONSTRAINTS"

# What the C++ build needs comes first; the build then runs in the background while pip
# installs everything else (its wheels are mostly unpacking, the build is the compiler).
missing=()
need() { "$PY" -c "import $1" 2>/dev/null || missing+=("$2"); }
need pybind11 "pybind11"
need ninja "ninja"
# numpy too: the build imports torch, which imports numpy -- a numpy that pip is unpacking
# beside the build makes that import fail (seen: "libscipy_openblas64_... cannot open").
numpy_ok() {
  "$PY" -c "import numpy, sys; v = tuple(map(int, numpy.__version__.split('.')[:2])); sys.exit(v >= (2, 4))" 2>/dev/null
}
numpy_ok || missing+=("numpy<2.4")
if ! command -v cmake >/dev/null && ! "$PY" -c "import cmake" 2>/dev/null; then missing+=("cmake<4"); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing the build's needs: ${missing[*]}"
  pip_install -c "$CONSTRAINTS" "${missing[@]}"
fi
phase "build tools and numpy" "${#missing[@]} installed"

echo "bootstrap: building and installing fastmeta (editable) in the background"
BUILD_LOG="$VENV/fastmeta-build.log"
T_BUILD=$(date +%s)
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
  > "$BUILD_LOG" 2>&1 &
BUILD_PID=$!

missing=()
need pytest "pytest>=8"
need pytest_benchmark "pytest-benchmark"
need expecttest "expecttest"
need matplotlib "matplotlib"
need tqdm "tqdm"
need PIL "pillow"
if [ "$(uname -s)" = Linux ]; then
  need triton "triton==3.6.0"
fi
# the rl extra: task distributions on MuJoCo (headless, no GL needed)
"$PY" -c "import gymnasium.envs.mujoco, mujoco" 2>/dev/null || missing+=("gymnasium[mujoco]>=1.0")
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  pip_install -c "$CONSTRAINTS" "${missing[@]}" || { kill $BUILD_PID 2>/dev/null; exit 1; }
fi
phase "other packages (beside the build)" "${#missing[@]} installed"
# byte-compile what an import really loads (even where PYTHONDONTWRITEBYTECODE is set)
env -u PYTHONDONTWRITEBYTECODE "$PY" -c "import torch, numpy, tqdm, PIL, matplotlib.pyplot, pytest" \
  2>/dev/null || true
env -u PYTHONDONTWRITEBYTECODE "$PY" -c "import triton, triton.language" 2>/dev/null || true
phase "byte-compile imported modules"

wait $BUILD_PID || { cat "$BUILD_LOG"; exit 1; }
"$PY" -c "from fastmeta import _ext; print('bootstrap: C++ extension', 'built' if _ext.available() else 'unavailable: ' + _ext.reason(), _ext.build_info() if _ext.available() else '')"
# the slowest translation units, from ninja's log of the build
slowest=$(cat build/cmake-*/.ninja_log 2>/dev/null | awk -F'\t' '!/^#/ && $4 ~ /\.o$/ {
    n = split($4, p, "/"); sub(/\.(cpp|cu)\.o$/, "", p[n]); printf "%d %s\n", ($2 - $1) / 1000, p[n] }' \
  | sort -rn | head -n 3 | awk '{printf "%s%s %ds", sep, $2, $1; sep = ", "}')
phase "C++ extension build (the rest of it)" "$(( $(date +%s) - T_BUILD )) s in all${slowest:+; slowest units: $slowest}"
printf '%s\n' "${ROWS[@]}" > "$PHASES"
