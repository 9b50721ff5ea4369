#!/usr/bin/env bash
# One-call check of fastmeta on a lent GPU machine (torch + CUDA + triton preinstalled, no
# internet), sized for one 600-second device call: every step runs under `timeout`, may fail
# without stopping the others, and the summary (OUTDIR/summary.txt) is rewritten after every
# step, so a call that runs out of time still returns everything done so far. Worst case
# 480 s (see --dry-run); the script always exits 0.
#
#   bash bench/device_check.sh [--dry-run] [OUTDIR]     # default: $OUT, else bench/results/device
#
# Steps (limit in seconds; T_<NAME> overrides one):
#   env 10       prerequisites: GPU, driver, nvcc, python/torch/triton/numpy, cmake, ninja
#   build 150    pip install -e . (C++/CUDA extension), and IN PARALLEL the AOT compile of
#                every Triton kernel for this GPU's arch (tools/aot_check.py) into the Triton
#                cache the later steps use, so they start warm
#   fallback 30  only if the build failed: pure-Python install (FASTMETA_BUILD_EXT=0)
#   import 15    import fastmeta; the backend table
#   smoke 60     every fused op forward+backward on CUDA vs float64, one JSON line per case
#   tests 90     the CUDA tests (tests/ops + task_hvp/inner_loop, no -x, -rfE --durations=10)
#   proto 45     bench_proto: episode and many-way (fp32)
#   matching 30  bench_matching 5w5s
#   maml 30      bench_maml conv4-k5
#   iu 20        bench_inner_update
# Every benchmark row records tf32_matmul / tf32_cudnn (bench/_common.env_info).
#
# Environment: PYTHON (default python3); FASTMETA_GIT_SHA (recorded in the rows when the tree
# has no .git); AOT_JOBS (default: CPU cores).
set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
cd "$(dirname "$0")/.." || exit 0
ROOT=$(pwd)

STEPS=(env build fallback import smoke tests proto matching maml iu)
declare -A LIMIT=([env]=10 [build]=150 [fallback]=30 [import]=15 [smoke]=60 [tests]=90
                  [proto]=45 [matching]=30 [maml]=30 [iu]=20)
for s in "${STEPS[@]}"; do
    v="T_${s^^}"
    [ -n "${!v:-}" ] && LIMIT[$s]=${!v}
done
TOTAL=0
for s in "${STEPS[@]}"; do TOTAL=$(( TOTAL + LIMIT[$s] )); done

if [ $DRY -eq 1 ]; then
    echo "device_check plan (worst case, each step killed at its limit; build and the AOT"
    echo "compile run side by side inside the build step):"
    for s in "${STEPS[@]}"; do printf '  %-9s %4d s\n' "$s" "${LIMIT[$s]}"; done
    printf '  %-9s %4d s (target <= 480 s of a 600 s device call)\n' total "$TOTAL"
    [ "$TOTAL" -le 480 ] || { echo "over budget"; exit 1; }
    exit 0
fi

OUTDIR=${1:-${OUT:-bench/results/device}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
NPROC=$(nproc 2>/dev/null || echo 4)
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$NPROC}
export FASTMETA_GIT_SHA=${FASTMETA_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# Import from this tree even if the editable install fails.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# One Triton cache for the AOT warm-up and every later step.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
T0=$(date +%s)
SUMMARY=()

write_summary() {
    { echo "== device_check summary ($(( $(date +%s) - T0 )) s so far, outputs in $OUTDIR) =="
      for line in "${SUMMARY[@]}"; do echo "  $line"; done; } > "$OUTDIR/summary.txt"
}
note() { SUMMARY+=("$1"); echo "[device_check] $1"; write_summary; }

# run_step NAME LOGFILE CMD...: time-boxed by LIMIT[NAME]; its status goes to the summary
run_step() {
    local name=$1 log=$2
    shift 2
    local limit=${LIMIT[$name]} t rc dt
    t=$(date +%s)
    echo "[device_check] == $name (limit ${limit}s, log $(basename "$log"))"
    timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t ))
    if [ $rc -eq 0 ]; then
        note "$name: PASS (${dt}s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "$name: TIMEOUT after ${limit}s (log $(basename "$log"))"
    else
        note "$name: FAIL rc=$rc (${dt}s, log $(basename "$log"))"
    fi
    return $rc
}

# keep benchmark rows flat in OUTDIR (the device tool returns files at most two folders
# down) and in bench/results for a commit
collect_rows() {
    local dir=$1 f
    for f in "$dir"/*.jsonl; do
        [ -e "$f" ] || continue
        cat "$f" >>"$OUTDIR/$(basename "$f")"
        mkdir -p bench/results && cat "$f" >>"bench/results/$(basename "$f")"
    done
    rm -rf "$dir"
}

# -- env ---------------------------------------------------------------------------------------
run_step env "$OUTDIR/env.txt" bash -c '
    echo "date: $(date -u +%FT%TZ)"; echo "host: $(uname -a)"; echo "git sha: $FASTMETA_GIT_SHA"
    echo "cpus: $(nproc)"; command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
    for t in cmake ninja c++; do printf "%s: %s\n" "$t" "$(command -v $t || echo not found)"; done
    '"$PY"' - <<EOF
import sys
print("python", sys.version.split()[0])
for mod in ("torch", "triton", "numpy", "pybind11"):
    try:
        m = __import__(mod)
        print(mod, m.__version__)
    except Exception as e:
        print(mod, "import failed:", e)
import torch
print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "sms", p.multi_processor_count, "mem", p.total_memory)
EOF'
cat "$OUTDIR/env.txt"
ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0); print(c[0] * 10 + c[1])" 2>/dev/null)
case "$ARCH" in 80|90) ;; *) note "env: compute capability '${ARCH:-none}' is not one the AOT check knows; compiling for 90"; ARCH=90 ;; esac

# -- build, with the AOT compile of every Triton kernel alongside -------------------------------
timeout --kill-after=5 "${LIMIT[build]}" "$PY" tools/aot_check.py --arch "$ARCH" \
    -j "${AOT_JOBS:-$NPROC}" --report "$OUTDIR/triton_aot.md" >"$OUTDIR/aot.log" 2>&1 &
AOT_PID=$!
if ! run_step build "$OUTDIR/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e . ; then
    run_step fallback "$OUTDIR/build_fallback.log" \
        env FASTMETA_BUILD_EXT=0 "$PY" -m pip install --no-build-isolation --no-deps -e . \
        || note "build: no install; importing from the source tree via PYTHONPATH"
fi
wait $AOT_PID
rc=$?
note "aot compile sm_$ARCH (cache warm-up): $([ $rc -eq 0 ] && echo PASS || echo "rc=$rc") -- $(grep -m1 '^variants:' "$OUTDIR/aot.log" || echo 'no summary (see aot.log)')"

# -- import ------------------------------------------------------------------------------------
run_step import "$OUTDIR/backends.txt" "$PY" -c "import fastmeta; fastmeta.backends()"
cat "$OUTDIR/backends.txt"

# -- smoke: every fused op on CUDA vs float64, one line per case --------------------------------
run_step smoke "$OUTDIR/smoke.log" "$PY" bench/gpu_smoke.py --device cuda --out "$OUTDIR/smoke.jsonl"
note "smoke: $(tail -n 1 "$OUTDIR/smoke.log")"
grep '^FAIL' "$OUTDIR/smoke.log" | head -n 20

# -- CUDA tests --------------------------------------------------------------------------------
run_step tests "$OUTDIR/tests.log" env FASTMETA_TEST_DEVICE=cuda \
    "$PY" -m pytest tests/ops tests/test_task_hvp.py tests/test_inner_loop.py -q -rfE --durations=10 -p no:cacheprovider
tail -n 30 "$OUTDIR/tests.log"

# -- benchmarks, most valuable first -------------------------------------------------------------
mkdir -p "$OUTDIR/rows"
run_step proto "$OUTDIR/bench_proto.txt" "$PY" bench/bench_proto.py --device cuda \
    --shapes episode,many-way --time-limit $(( LIMIT[proto] * 5 / 8 )) --compile-dtypes float32 \
    --results-dir "$OUTDIR/rows"
collect_rows "$OUTDIR/rows"
mkdir -p "$OUTDIR/rows"
run_step matching "$OUTDIR/bench_matching.txt" "$PY" bench/bench_matching.py --device cuda \
    --shapes 5w5s --quick --results-dir "$OUTDIR/rows"
collect_rows "$OUTDIR/rows"
mkdir -p "$OUTDIR/rows"
run_step maml "$OUTDIR/bench_maml.txt" "$PY" bench/bench_maml.py --device cuda --configs conv4-k5 \
    --time-limit $(( LIMIT[maml] * 5 / 8 )) --child-timeout $(( LIMIT[maml] - 5 )) \
    --results-dir "$OUTDIR/rows"
collect_rows "$OUTDIR/rows"
mkdir -p "$OUTDIR/rows"
run_step iu "$OUTDIR/bench_inner_update.txt" "$PY" bench/bench_inner_update.py --device cuda \
    --time-limit $(( LIMIT[iu] * 5 / 8 )) --results-dir "$OUTDIR/rows"
collect_rows "$OUTDIR/rows"
for f in bench_proto bench_matching bench_maml bench_inner_update; do
    grep -v '^\.\.\. ' "$OUTDIR/$f.txt" 2>/dev/null | tail -n 40
done

write_summary
cat "$OUTDIR/summary.txt"
exit 0
