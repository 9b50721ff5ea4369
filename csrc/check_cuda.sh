#!/usr/bin/env bash
# Compile-only check of the CUDA sources: runs
#   nvcc -std=c++20 -c -arch=sm_90 -o /dev/null <file>
# on every csrc/cuda/*.cu. Needs nvcc, not a GPU and not a CUDA build of torch.
#
#   csrc/check_cuda.sh               check csrc/cuda/*.cu
#   csrc/check_cuda.sh DIR           check DIR/*.cu
#   csrc/check_cuda.sh --self-test   check that this script passes a good and fails a bad .cu
# Env: NVCC (compiler, default: nvcc on PATH or $CUDA_HOME/bin/nvcc), CUDA_CHECK_ARCH (sm_90),
#      NVCC_FLAGS (extra flags).
# Exit: 0 when all compile, when there is no .cu file, or when nvcc is absent (skipped);
#       1 otherwise.
set -u -o pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

find_nvcc() {
  if [ -n "${NVCC:-}" ]; then echo "$NVCC"; return; fi
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then echo "$d/bin/nvcc"; return; fi
  done
}

check_dir() {
  local dir="$1" nvcc arch fail=0 f
  shopt -s nullglob
  local files=("$dir"/*.cu)
  shopt -u nullglob
  if [ "${#files[@]}" -eq 0 ]; then
    echo "check_cuda: no .cu files in $dir"
    return 0
  fi
  nvcc="$(find_nvcc)"
  if [ -z "$nvcc" ] || ! [ -x "$(command -v "$nvcc" 2>/dev/null || echo "$nvcc")" ]; then
    echo "check_cuda: nvcc not found, skipping CUDA compile check"
    return 0
  fi
  arch="${CUDA_CHECK_ARCH:-sm_90}"
  for f in "${files[@]}"; do
    # shellcheck disable=SC2086
    if "$nvcc" -std=c++20 -c -arch="$arch" -I"$here" ${NVCC_FLAGS:-} -o /dev/null "$f"; then
      echo "check_cuda: ok   $f"
    else
      echo "check_cuda: FAIL $f"
      fail=1
    fi
  done
  return "$fail"
}

self_test() {
  if [ -z "$(find_nvcc)" ]; then
    echo "check_cuda: nvcc not found, skipping self-test"
    return 0
  fi
  local tmp rc
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  check_dir "$tmp" | grep -q "no .cu files" \
    || { echo "self-test: empty dir not reported"; return 1; }
  cat >"$tmp/good.cu" <<'CU'
__global__ void fm_selftest_axpy(float a, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += a * x[i];
}
CU
  check_dir "$tmp" >/dev/null || { echo "self-test: valid .cu rejected"; return 1; }
  echo '__global__ void fm_selftest_bad() { this_is_not_cuda; }' >"$tmp/bad.cu"
  check_dir "$tmp" >/dev/null 2>&1
  rc=$?
  [ "$rc" -ne 0 ] || { echo "self-test: invalid .cu accepted"; return 1; }
  echo "check_cuda: self-test passed"
}

case "${1:-}" in
  --self-test) self_test ;;
  -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}" ;;
  "") check_dir "$here/cuda" ;;
  *) check_dir "$1" ;;
esac
