#!/usr/bin/env bash
# One-call check of fastmeta on a lent GPU machine (torch + CUDA + triton preinstalled, no
# internet): environment, build, GPU tests, proto benchmark. Every step runs under `timeout`
# and may fail without stopping the others; the script always exits 0 and ends with a summary
# (also in OUTDIR/summary.txt). Worst case about 7.3 minutes: env 10 s, build 150 s (+30 s
# pure-Python fallback if it fails), import 10 s, tests 90 s, bench 150 s (it starts no new
# case after 5/8 of that, fp32 first, compile baseline at fp32 only).
# Step 5, inner_update's CUDA tests (T_IU_TESTS, 60 s) and bench_inner_update (T_IU_BENCH,
# 90 s), adds at most 2.5 minutes.
#
#   bash bench/device_check.sh [OUTDIR]        # default: $OUT, else bench/results/device
#
# Environment: PYTHON (default python3, else python); FASTMETA_GIT_SHA (recorded in the
# benchmark rows when the tree has no .git); BENCH_ARGS (extra bench_proto.py arguments);
# T_BUILD / T_TESTS / T_BENCH (step time limits in seconds).
set -u

cd "$(dirname "$0")/.." || exit 0
ROOT=$(pwd)
OUTDIR=${1:-${OUT:-bench/results/device}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
T_BUILD=${T_BUILD:-150}
T_TESTS=${T_TESTS:-90}
T_BENCH=${T_BENCH:-150}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
# Import from this tree even if the editable install fails.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)

SUMMARY=()
note() { SUMMARY+=("$1"); echo "[device_check] $1"; }

# run_step NAME LIMIT LOGFILE CMD...: the step's status goes to the summary
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t=$(date +%s) rc
    echo "[device_check] == $name (limit ${limit}s, log $log)"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t ))
    if [ $rc -eq 0 ]; then
        note "$name: PASS (${dt}s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "$name: TIMEOUT after ${limit}s (rc $rc, log $(basename "$log"))"
    else
        note "$name: FAIL rc=$rc (${dt}s, log $(basename "$log"))"
    fi
    return $rc
}

# -- 1. environment ---------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -a)"
    echo "git sha: ${FASTMETA_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    echo "python: $PY"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi || true
    else
        echo "nvidia-smi: not found"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
    timeout 60 "$PY" - <<'EOF' || echo "python version probe failed"
import sys
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", torch.cuda.get_device_name(0), "sm", p.multi_processor_count,
              "L2", getattr(p, "L2_cache_size", "?"), "mem", p.total_memory)
except Exception as e:
    print("torch: import failed:", e)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: import failed:", e)
try:
    import numpy
    print("numpy", numpy.__version__)
except Exception as e:
    print("numpy: import failed:", e)
EOF
} 2>&1 | tee "$OUTDIR/env.txt"
if grep -q "available True" "$OUTDIR/env.txt"; then
    note "environment: CUDA available"
else
    note "environment: CUDA NOT available (tests/bench below will say why)"
fi

# -- 2. build ---------------------------------------------------------------------------------
if run_step "build (pip install -e ., C++/CUDA extension)" "$T_BUILD" "$OUTDIR/build.log" \
        "$PY" -m pip install --no-build-isolation --no-deps -e . ; then
    :
else
    note "build: retrying without the compiled extension (FASTMETA_BUILD_EXT=0)"
    run_step "build (pure Python fallback)" 30 "$OUTDIR/build_fallback.log" \
        env FASTMETA_BUILD_EXT=0 "$PY" -m pip install --no-build-isolation --no-deps -e . || \
        note "build: no install; importing from the source tree via PYTHONPATH"
fi
timeout 120 "$PY" -c "import fastmeta; fastmeta.backends()" >"$OUTDIR/backends.txt" 2>&1 \
    && note "import fastmeta: ok ($(grep -m1 'C++ extension' "$OUTDIR/backends.txt" | sed 's/^ *//'))" \
    || note "import fastmeta: FAILED (see backends.txt)"
cat "$OUTDIR/backends.txt"

# -- 3. tests on the GPU ----------------------------------------------------------------------
if [ -d tests ]; then
    run_step "tests (FASTMETA_TEST_DEVICE=cuda pytest tests -x -q)" "$T_TESTS" "$OUTDIR/tests.log" \
        env FASTMETA_TEST_DEVICE=cuda "$PY" -m pytest tests -x -q -p no:cacheprovider
    tail -n 15 "$OUTDIR/tests.log"
else
    note "tests: SKIPPED (no tests/ folder)"
fi

# -- 4. benchmark -----------------------------------------------------------------------------
if [ -f bench/bench_proto.py ]; then
    mkdir -p "$OUTDIR/rows"
    # --time-limit stops starting new cases early enough for the tables to be printed.
    run_step "bench_proto (--device cuda)" "$T_BENCH" "$OUTDIR/bench_proto.txt" \
        "$PY" bench/bench_proto.py --device cuda --time-limit $(( T_BENCH * 5 / 8 )) \
        --compile-dtypes float32 --results-dir "$OUTDIR/rows" ${BENCH_ARGS:-}
    # keep the rows flat in OUTDIR (the device tool returns files at most two folders down)
    for f in "$OUTDIR"/rows/*.jsonl; do
        [ -e "$f" ] || continue
        cp "$f" "$OUTDIR/" && mkdir -p bench/results && cat "$f" >>"bench/results/$(basename "$f")"
    done
    rm -rf "$OUTDIR/rows"
    ls "$OUTDIR"/*.jsonl >/dev/null 2>&1 && note "bench rows: $(ls "$OUTDIR"/*.jsonl | xargs -n1 basename | tr '\n' ' ')" \
        || note "bench rows: none written"
    grep -v '^\.\.\. ' "$OUTDIR/bench_proto.txt" | tail -n 80   # tables, without progress lines
else
    note "bench_proto: SKIPPED (bench/bench_proto.py missing)"
fi

# -- 5. inner_update (CUDA multi-tensor kernel): its own tests and benchmark --------------------
# Separate from step 3 so a failure elsewhere in the suite (-x) does not hide it.
if [ -f tests/ops/test_inner_update.py ]; then
    run_step "inner_update tests (cuda)" "${T_IU_TESTS:-60}" "$OUTDIR/tests_inner_update.log" \
        env FASTMETA_TEST_DEVICE=cuda "$PY" -m pytest tests/ops/test_inner_update.py -q -p no:cacheprovider
    tail -n 5 "$OUTDIR/tests_inner_update.log"
fi
if [ -f bench/bench_inner_update.py ]; then
    mkdir -p "$OUTDIR/rows_iu"
    run_step "bench_inner_update (--device cuda)" "${T_IU_BENCH:-90}" "$OUTDIR/bench_inner_update.txt" \
        "$PY" bench/bench_inner_update.py --device cuda --time-limit $(( ${T_IU_BENCH:-90} * 5 / 8 )) \
        --results-dir "$OUTDIR/rows_iu"
    for f in "$OUTDIR"/rows_iu/*.jsonl; do
        [ -e "$f" ] || continue
        cp "$f" "$OUTDIR/" && mkdir -p bench/results && cat "$f" >>"bench/results/$(basename "$f")"
    done
    rm -rf "$OUTDIR/rows_iu"
    grep -v '^\.\.\. ' "$OUTDIR/bench_inner_update.txt" | tail -n 60
fi

# -- 5. MAML meta-step benchmark (fastmeta vs naive loop / torch.func vmap; + CUDA graph row) ---
# Adds up to T_BENCH_MAML (default 150 s) to the worst case above. Peers (higher, TorchOpt,
# learn2learn) are not installed on the lent machine (no internet): their rows say so.
# Conv4 k=5 first (the headline; each row is a fresh process, ~10 s of start-up on a GPU).
T_BENCH_MAML=${T_BENCH_MAML:-150}
BENCH_MAML_ARGS=${BENCH_MAML_ARGS:---configs conv4-k5,sinusoid-k5,conv4-k10}
if [ -f bench/bench_maml.py ]; then
    mkdir -p "$OUTDIR/rows_maml"
    run_step "bench_maml (--device cuda)" "$T_BENCH_MAML" "$OUTDIR/bench_maml.txt" \
        "$PY" bench/bench_maml.py --device cuda --time-limit $(( T_BENCH_MAML * 5 / 8 )) \
        --child-timeout $(( T_BENCH_MAML / 3 )) --results-dir "$OUTDIR/rows_maml" \
        ${BENCH_MAML_ARGS:-}
    for f in "$OUTDIR"/rows_maml/*.jsonl; do
        [ -e "$f" ] || continue
        cp "$f" "$OUTDIR/" && mkdir -p bench/results && cat "$f" >>"bench/results/$(basename "$f")"
    done
    rm -rf "$OUTDIR/rows_maml"
    grep -v '^\.\.\. ' "$OUTDIR/bench_maml.txt" | tail -n 80
else
    note "bench_maml: SKIPPED (bench/bench_maml.py missing)"
fi

# -- summary ----------------------------------------------------------------------------------
{
    echo
    echo "== device_check summary ($(( $(date +%s) - T0 ))s, outputs in $OUTDIR) =="
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
} | tee "$OUTDIR/summary.txt"
exit 0
