// Shared helpers for the fastmeta CPU kernels: input validation, dtype handling,
// work partitioning and the small vectorisable inner loops.
#pragma once

// The light headers: the tensor class, the dispatch macros, parallel_for and only the ops the
// kernels call. <ATen/ATen.h> declares every op: it parses in ~15 s here against ~10 s for
// this set (gcc 12, 2 cores), in each of the units.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// MKL's per-thread thread count (weak: null where torch has no MKL). See MklOneThread.
extern "C" int MKL_Set_Num_Threads_Local(int nth) __attribute__((weak));

namespace fastmeta {
namespace cpu {

// MKL on one thread for this scope, restored on exit. For BLAS calls (sgemm_, at::mm) inside
// at::parallel_for: torch.set_num_threads(n) turns MKL's dynamic adjustment off, and MKL then
// starts n threads of its own inside each thread of the region (oversubscribed; measured 8%
// slower for mlp_rop_product at 2 threads). Without MKL it does nothing.
struct MklOneThread {
  int saved = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : -1;
  MklOneThread() = default;
  MklOneThread(const MklOneThread&) = delete;
  MklOneThread& operator=(const MklOneThread&) = delete;
  ~MklOneThread() {
    if (saved >= 0) MKL_Set_Num_Threads_Local(saved);
  }
};

enum Metric : int64_t { kSqEuclidean = 0, kCosine = 1 };

// ----------------------------------------------------------------------------------------------
// Validation (cheap, runs before any parallel region so errors raise instead of crashing).
// ----------------------------------------------------------------------------------------------
inline void check_float_input(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), "fastmeta_cpp::", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "fastmeta_cpp::", op, ": ", name,
              " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(!t.is_sparse() && t.layout() == at::kStrided, "fastmeta_cpp::", op, ": ", name,
              " must be a dense strided tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastmeta_cpp::", op, ": ", name,
              " must be float32/float64 (float16/bfloat16 are computed in float32), got ", st);
  TORCH_CHECK(t.dim() == dim, "fastmeta_cpp::", op, ": ", name, " must be ", dim,
              "-D, got shape ", t.sizes());
}

inline void check_index_tensor(const at::Tensor& t, const char* op, const char* name, int64_t d0,
                               int64_t d1) {
  TORCH_CHECK(t.defined(), "fastmeta_cpp::", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "fastmeta_cpp::", op, ": ", name,
              " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(!t.is_sparse() && t.layout() == at::kStrided, "fastmeta_cpp::", op, ": ", name,
              " must be a dense strided tensor");
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastmeta_cpp::", op, ": ", name,
              " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == d0 && t.size(1) == d1, "fastmeta_cpp::", op, ": ",
              name, " must have shape [", d0, ", ", d1, "], got ", t.sizes());
}

// Every label must lie in [0, n_classes): checked here because the kernels index with it.
inline void check_label_range(const at::Tensor& labels_contig, int64_t n_classes, const char* op,
                              const char* name) {
  const int64_t* y = labels_contig.const_data_ptr<int64_t>();
  const int64_t n = labels_contig.numel();
  int64_t lo = 0, hi = 0;
  if (n > 0) {
    lo = hi = y[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = std::min(lo, y[i]);
      hi = std::max(hi, y[i]);
    }
  }
  TORCH_CHECK(n == 0 || (lo >= 0 && hi < n_classes), "fastmeta_cpp::", op, ": ", name,
              " must be in [0, ", n_classes, "), got values in [", lo, ", ", hi, "]");
}

inline void check_metric(int64_t metric, double scale, double eps, const char* op) {
  TORCH_CHECK(metric == kSqEuclidean || metric == kCosine, "fastmeta_cpp::", op,
              ": metric must be 0 (sqeuclidean) or 1 (cosine), got ", metric);
  TORCH_CHECK(std::isfinite(scale), "fastmeta_cpp::", op, ": scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "fastmeta_cpp::", op,
              ": eps must be finite and >= 0, got ", eps);
}

// Accumulation / compute dtype: float64 for float64 inputs, float32 for everything else.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Contiguous copy (or an alias of the tensor itself) in the compute dtype, detached: ATen calls
// made by the kernels (also from at::parallel_for worker threads, where the caller's
// dispatch-key guards do not apply) never see a tensor that requires grad.
inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
  return t.detach().to(ct).contiguous();
}

inline at::Tensor to_dtype(const at::Tensor& t, at::ScalarType st) {
  return t.scalar_type() == st ? t : t.to(st);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------------------------
// Inner loops over D (unit stride). `#pragma omp simd reduction` lets the compiler vectorise the
// reductions. FASTMETA_SIMD_CLONES builds each of them for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and the baseline ISA, picked once at load time (GCC target_clones / ifunc), so a
// portable wheel still uses the wide units. They have internal linkage (anonymous namespace):
// no ODR mixing of ISA variants between translation units.
// ----------------------------------------------------------------------------------------------
#if defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12) && defined(__x86_64__) && \
    defined(__linux__) && !defined(FASTMETA_NO_SIMD_CLONES)
#define FASTMETA_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTMETA_SIMD_CLONES_ENABLED 1
// AVX2 and the baseline only: for loops that 512-bit vectors make slower (short horizontal sums)
#define FASTMETA_SIMD_CLONES_256 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTMETA_SIMD_CLONES
#define FASTMETA_SIMD_CLONES_256
#define FASTMETA_SIMD_CLONES_ENABLED 0
#endif

namespace {

template <typename T>
FASTMETA_SIMD_CLONES T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
FASTMETA_SIMD_CLONES T sqdist(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const T e = a[i] - b[i];
    s += e * e;
  }
  return s;
}

// y += a * x
template <typename T>
FASTMETA_SIMD_CLONES void axpy(T a, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// y = a * x
template <typename T>
FASTMETA_SIMD_CLONES void scale_to(T a, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
}

// y = y / c
template <typename T>
FASTMETA_SIMD_CLONES void div_inplace(T* __restrict y, T c, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = y[i] / c;
}

// y = x / c
template <typename T>
FASTMETA_SIMD_CLONES void div_to(const T* __restrict x, T c, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] / c;
}

// out[n] = ||q - P[n]||^2 (kDist) or <q, P[n]> for the N rows of P (row stride D).
// Four prototypes per sweep: q is loaded once per four, four independent accumulators.
template <typename T, bool kDist>
FASTMETA_SIMD_CLONES void row_cross(const T* __restrict q, const T* __restrict P, int64_t N,
                                    int64_t D, T* __restrict out) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) {
    const T* __restrict p0 = P + n * D;
    const T* __restrict p1 = p0 + D;
    const T* __restrict p2 = p1 + D;
    const T* __restrict p3 = p2 + D;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      const T x = q[d];
      if constexpr (kDist) {
        const T e0 = x - p0[d], e1 = x - p1[d], e2 = x - p2[d], e3 = x - p3[d];
        s0 += e0 * e0;
        s1 += e1 * e1;
        s2 += e2 * e2;
        s3 += e3 * e3;
      } else {
        s0 += x * p0[d];
        s1 += x * p1[d];
        s2 += x * p2[d];
        s3 += x * p3[d];
      }
    }
    out[n] = s0;
    out[n + 1] = s1;
    out[n + 2] = s2;
    out[n + 3] = s3;
  }
  for (; n < N; ++n) {
    const T* __restrict p0 = P + n * D;
    T s0 = 0;
#pragma omp simd reduction(+ : s0)
    for (int64_t d = 0; d < D; ++d) {
      if constexpr (kDist) {
        const T e0 = q[d] - p0[d];
        s0 += e0 * e0;
      } else {
        s0 += q[d] * p0[d];
      }
    }
    out[n] = s0;
  }
}

// o[d] = -rc * q[d] + sum_n G[n] * P[n, d]
template <typename T>
FASTMETA_SIMD_CLONES void row_grad(const T* __restrict G, T rc, const T* __restrict q,
                                   const T* __restrict P, int64_t N, int64_t D,
                                   T* __restrict o) {
  int64_t n = 0;
  if (N >= 4) {
    const T g0 = G[0], g1 = G[1], g2 = G[2], g3 = G[3];
    const T* __restrict p0 = P;
    const T* __restrict p1 = P + D;
    const T* __restrict p2 = P + 2 * D;
    const T* __restrict p3 = P + 3 * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d)
      o[d] = ((g0 * p0[d] + g1 * p1[d]) + (g2 * p2[d] + g3 * p3[d])) - rc * q[d];
    n = 4;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = -rc * q[d];
  }
  for (; n + 4 <= N; n += 4) {
    const T g0 = G[n], g1 = G[n + 1], g2 = G[n + 2], g3 = G[n + 3];
    if (g0 == T(0) && g1 == T(0) && g2 == T(0) && g3 == T(0)) continue;
    const T* __restrict p0 = P + n * D;
    const T* __restrict p1 = p0 + D;
    const T* __restrict p2 = p1 + D;
    const T* __restrict p3 = p2 + D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] += (g0 * p0[d] + g1 * p1[d]) + (g2 * p2[d] + g3 * p3[d]);
  }
  for (; n < N; ++n) {
    const T g0 = G[n];
    const T* __restrict p0 = P + n * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] += g0 * p0[d];
  }
}

// acc[n, :] += sum_r G[r, n] * X[r, :]  for r < rows (G row stride ldg, X/acc row stride D).
// Blocked over D so the N accumulator segments stay in L1 across the rows.
template <typename T>
FASTMETA_SIMD_CLONES void accum_gtx(const T* __restrict G, int64_t ldg, const T* __restrict X,
                                    int64_t rows, int64_t N, int64_t D, T* __restrict acc) {
  constexpr int64_t kBlock = 512;
  for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
    const int64_t len = std::min(kBlock, D - d0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict x = X + r * D + d0;
      const T* __restrict g = G + r * ldg;
      int64_t n = 0;
      for (; n + 4 <= N; n += 4) {
        const T g0 = g[n], g1 = g[n + 1], g2 = g[n + 2], g3 = g[n + 3];
        if (g0 == T(0) && g1 == T(0) && g2 == T(0) && g3 == T(0)) continue;
        T* __restrict a0 = acc + n * D + d0;
        T* __restrict a1 = a0 + D;
        T* __restrict a2 = a1 + D;
        T* __restrict a3 = a2 + D;
#pragma omp simd
        for (int64_t d = 0; d < len; ++d) {
          const T v = x[d];
          a0[d] += g0 * v;
          a1[d] += g1 * v;
          a2[d] += g2 * v;
          a3[d] += g3 * v;
        }
      }
      for (; n < N; ++n) {
        const T g0 = g[n];
        if (g0 == T(0)) continue;
        T* __restrict a0 = acc + n * D + d0;
#pragma omp simd
        for (int64_t d = 0; d < len; ++d) a0[d] += g0 * x[d];
      }
    }
  }
}

}  // namespace

}  // namespace cpu
}  // namespace fastmeta
