#!/usr/bin/env bash
# Install the MAML benchmark's peers (higher, TorchOpt, learn2learn) into the virtualenv without
# letting any of them pull another torch or a numpy >= 2.4. Optional: only bench/bench_maml.py
# uses them; neither `make test` nor .ci/run needs them.
#
#   bash tools/install_peers.sh [VENV]        # default .venv; or: make peers
#
# Every pip call gets a constraints file pinning the torch already installed and numpy<2.4.
#  - higher 0.2.1: pure Python.
#  - torchopt 0.7.3: its wheel's optional C++ op (torchopt._C) is built for an older torch and
#    does not load here; torchopt then uses its pure-Python ops, which are the default
#    (use_accelerated_op=False) and are what the benchmark times.
#  - learn2learn 0.2.0: only an sdist for Python 3.11, whose Cython-generated .c files are too old
#    for CPython 3.11. We regenerate them with a current Cython and build with
#    --no-deps --no-build-isolation (its install_requires pull torchvision, gym, qpth -> cvxpy ->
#    numpy 1.x, gsutil: none of them is needed for learn2learn.algorithms.MAML). Without
#    torchvision `import learn2learn` fails (its __init__ imports the vision datasets), and PyPI's
#    torchvision wheel is linked against the CUDA torch (its _C needs libc10_cuda.so), so
#    bench_maml.py loads learn2learn.algorithms.maml (and learn2learn.utils) with the package
#    __init__ bypassed: the timed code is learn2learn's own MAML/clone_module/update_module.
set -euo pipefail
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || { echo "install_peers: $VENV/bin/python not found (run make install first)" >&2; exit 1; }
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS="$VENV/constraints-peers.txt"
printf 'torch==%s\nnumpy<2.4\n' "$TORCH" > "$CONSTRAINTS"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }

have() { "$PY" - "$1" "$2" <<'EOF'
import importlib.metadata as md, sys
try:
    sys.exit(0 if md.version(sys.argv[1]) == sys.argv[2] else 1)
except md.PackageNotFoundError:
    sys.exit(1)
EOF
}

have higher 0.2.1 || pip_install "higher==0.2.1"
have torchopt 0.7.3 || pip_install "torchopt==0.7.3"

if ! have learn2learn 0.2.0; then
  pip_install "cython>=3"
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "learn2learn==0.2.0" -d "$WORK"
  tar -xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
  SRC="$WORK/learn2learn-0.2.0"
  rm -rf "$SRC/.eggs" "$SRC"/learn2learn/data/*.c
  (cd "$SRC" && "$PY" -m cython -3 learn2learn/data/meta_dataset.pyx \
      learn2learn/data/task_dataset.pyx learn2learn/data/transforms.pyx)
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation "$SRC"
fi

"$PY" - <<'EOF'
import torch, higher, torchopt, importlib.metadata as md
print(f"install_peers: torch {torch.__version__}, higher {md.version('higher')}, "
      f"torchopt {torchopt.__version__}, learn2learn {md.version('learn2learn')}")
EOF
