// mlp_rop_product: the curvature products of MAML-TRPO's meta-Fisher (fastmeta/rl/curvature.py)
// for a task-batched tanh MLP with biases, one op call per product, fused over row blocks.
//
// The Python path (curvature._tangent / _backward / pg_hvp) makes each product from ~40 ATen
// calls over whole [T, N, 64] tensors: the 16 [N,64]x[64,64] GEMMs of one meta-Fisher product
// are about half its time, the rest is elementwise passes (tanh slopes, the R-operator's
// curvature term, bias sums, accumulating baddbmm) that each stream 10 MB through memory at
// T=20, N=2000. Here every task is walked in blocks of kBlock rows: the block's forward
// tangents, output signal and backward signals stay in L1/L2 between the GEMMs (BLAS sgemm /
// dgemm on the block: MKL's, the one torch links), the elementwise work is done in cache, and
// the weight-gradient GEMMs accumulate over the blocks into the per-task outputs. Tasks run in
// parallel (at::parallel_for).
//
// Inputs (per task t, layers i = 0..L-1, W_i [out_i, in_i] as nn.Linear; all contiguous, one
// float dtype):
//   weights[i] [T, out_i, in_i]; acts[i] [T, N, in_i]: acts[0] = x, acts[i] = tanh output of
//   layer i-1 (the slopes 1 - a^2 are recomputed from it);
//   rowscale [T, N], colscale [T, A]: the output curvature D_n = diag(rowscale_n * colscale);
//   v_w[i], v_b[i] [T, out_i]: the direction; v_out [T, A] (HVP only: the log-std direction).
//   deltas[i] [T, N, out_i] and pres[i] [T, N, in_i] (i >= 1): HVP mode (non-empty): the
//   backward signals dL/dz_i of the loss at the point and dL/da_i (= deltas[i] W_i) for the
//   R-operator's second-order terms. Empty: Gauss-Newton mode (the Gaussian Fisher).
// Output per task: (J^T D J v) (Gauss-Newton) or the mean-network part of H v (HVP):
//   out_w[i] [T, out_i, in_i], out_b[i] [T, out_i], and rsum [T, A] = sum_n r_n * (J_n v)
//   with r = deltas[L-1] (HVP; zeros in Gauss-Newton mode) for the log-std cross term, which
//   the caller adds (curvature.pg_hvp).
//
// HVP recursion per block (Pearlmutter's R-operator; curvature.py states the same equations):
//   Rz_i = a_i vW_i^T + vb_i + Ra_i W_i^T,  Ra_{i+1} = Rz_i * (1 - a_{i+1}^2),  Rmu = Rz_{L-1}
//   Rd_{L-1} = Rmu * D - 2 r * v_out
//   HW_i += Rd_i^T a_i + delta_i^T Ra_i,  Hb_i += sum_n Rd_i
//   Rd_{i-1} = (Rd_i W_i + delta_i vW_i) * (1 - a_i^2) - 2 pre_i * a_i * Ra_i
// Gauss-Newton mode drops the delta/pre/v_out terms.
//
// BLAS: sgemm_/dgemm_ are declared weak. When the process has none (a torch built without a
// Fortran-ABI BLAS), the same block products go through at::mm (slower, same results).
//
// Schema (csrc/register.cpp):
//   fastmeta_cpp::mlp_rop_product(Tensor[] weights, Tensor[] acts, Tensor[] deltas,
//       Tensor[] pres, Tensor rowscale, Tensor colscale, Tensor[] v_w, Tensor[] v_b,
//       Tensor v_out) -> (Tensor[] out_w, Tensor[] out_b, Tensor rsum)

#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ops/from_blob.h>

#include "common.h"
#include "ops.h"

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

namespace fastmeta {
namespace cpu {
namespace {

constexpr const char* kOp = "mlp_rop_product";
constexpr int64_t kBlock = 256;  // rows per block: its few [256, 64] buffers stay in cache

// ---- the elementwise work of a block (vectorised; ISA picked at load time, see common.h)

// z[b, :] = (z[b, :] + vb) * (1 - a[b, :]^2)
template <typename T>
FASTMETA_SIMD_CLONES void bias_slope(T* __restrict z, const T* __restrict vb,
                                     const T* __restrict a, int64_t B, int64_t n) {
  for (int64_t b = 0; b < B; ++b) {
    T* zr = z + b * n;
    const T* ar = a + b * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) zr[j] = (zr[j] + vb[j]) * (T(1) - ar[j] * ar[j]);
  }
}

// g[j] += sum_b d[b, j]
template <typename T>
FASTMETA_SIMD_CLONES void col_sum(const T* __restrict d, T* __restrict g, int64_t B, int64_t n) {
  for (int64_t b = 0; b < B; ++b) {
    const T* dr = d + b * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] += dr[j];
  }
}

// rd = re * (1 - a^2) - 2 pre * a * ra   (ra == nullptr: the first term only)
template <typename T>
FASTMETA_SIMD_CLONES void back_slope(T* __restrict rd, const T* __restrict re,
                                     const T* __restrict a, const T* __restrict pre,
                                     const T* __restrict ra, int64_t n) {
  if (ra == nullptr) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) rd[e] = re[e] * (T(1) - a[e] * a[e]);
  } else {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e)
      rd[e] = re[e] * (T(1) - a[e] * a[e]) - T(2) * pre[e] * a[e] * ra[e];
  }
}

// Column-major BLAS on row-major data. C[m x n] (col-major, ldc) = op(A) op(B) + beta C.
template <typename scalar_t>
void gemm(char ta, char tb, int m, int n, int k, const scalar_t* a, int lda, const scalar_t* b,
          int ldb, scalar_t beta, scalar_t* c, int ldc) {
  const scalar_t one = 1;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
      return;
    }
  }
  // fallback: the same product through ATen (col-major X [r x s], ld = l, is row-major X^T)
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto colmajor = [&](const scalar_t* p, int rows, int cols, int ld, char t) {
    // op(X) as a row-major-backed tensor of shape [rows_op, cols_op] (col-major semantics)
    at::Tensor xt = at::from_blob(const_cast<scalar_t*>(p), {t == 'N' ? cols : rows,
                                  t == 'N' ? rows : cols}, {ld, 1}, opts);
    return t == 'N' ? xt.t() : xt;  // col-major [rows x cols] = transpose of row-major
  };
  at::Tensor A = colmajor(a, m, k, lda, ta);
  at::Tensor B = colmajor(b, k, n, ldb, tb);
  at::Tensor C = at::from_blob(c, {n, m}, {ldc, 1}, opts).t();
  at::Tensor prod = at::mm(A, B);
  if (beta == scalar_t(0)) {
    C.copy_(prod);
  } else {
    C.add_(prod);
  }
}

// Z[B, out] (= or +=) X[B, in] V[out, in]^T
template <typename scalar_t>
void mm_xvt(const scalar_t* x, const scalar_t* v, scalar_t* z, int B, int in, int out,
            scalar_t beta) {
  gemm<scalar_t>('T', 'N', out, B, in, v, in, x, in, beta, z, out);
}

// R[B, in] (= or +=) D[B, out] W[out, in]
template <typename scalar_t>
void mm_dw(const scalar_t* d, const scalar_t* w, scalar_t* r, int B, int in, int out,
           scalar_t beta) {
  gemm<scalar_t>('N', 'N', in, B, out, w, in, d, out, beta, r, in);
}

// G[out, in] += D[B, out]^T X[B, in]
template <typename scalar_t>
void mm_dtx(const scalar_t* d, const scalar_t* x, scalar_t* g, int B, int in, int out) {
  gemm<scalar_t>('N', 'T', in, out, B, x, in, d, out, scalar_t(1), g, in);
}

template <typename scalar_t>
void run(const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& acts,
         const std::vector<at::Tensor>& deltas, const std::vector<at::Tensor>& pres,
         const at::Tensor& rowscale, const at::Tensor& colscale, const std::vector<at::Tensor>& vw,
         const std::vector<at::Tensor>& vb, const at::Tensor& v_out, std::vector<at::Tensor>& ow,
         std::vector<at::Tensor>& ob, at::Tensor& rsum, int64_t T, int64_t N) {
  const int64_t L = static_cast<int64_t>(W.size());
  const bool hvp = !deltas.empty();
  std::vector<int64_t> din(L), dout(L);
  for (int64_t i = 0; i < L; ++i) {
    dout[i] = W[i].size(1);
    din[i] = W[i].size(2);
  }
  const int64_t A = dout[L - 1];
  int64_t wmax = 0;
  for (int64_t i = 0; i < L; ++i) wmax = std::max({wmax, din[i], dout[i]});

  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    // scratch: Ra_i for i = 1..L-1, the layer output z, the backward signal and its successor
    std::vector<std::vector<scalar_t>> ra(L);
    for (int64_t i = 1; i < L; ++i) ra[i].resize(kBlock * din[i]);
    std::vector<scalar_t> z(kBlock * wmax), rd(kBlock * wmax), re(kBlock * wmax);
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* rs = rowscale.data_ptr<scalar_t>() + t * N;
      const scalar_t* cs = colscale.data_ptr<scalar_t>() + t * A;
      const scalar_t* vo = hvp ? v_out.data_ptr<scalar_t>() + t * A : nullptr;
      scalar_t* rsm = rsum.data_ptr<scalar_t>() + t * A;
      auto wt = [&](int64_t i) { return W[i].data_ptr<scalar_t>() + t * dout[i] * din[i]; };
      auto vwt = [&](int64_t i) { return vw[i].data_ptr<scalar_t>() + t * dout[i] * din[i]; };
      auto act = [&](int64_t i, int64_t n0) {
        return acts[i].data_ptr<scalar_t>() + (t * N + n0) * din[i];
      };
      for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
        const int B = static_cast<int>(std::min(kBlock, N - n0));
        // ---- forward tangents
        for (int64_t i = 0; i < L; ++i) {
          const int in = static_cast<int>(din[i]), out = static_cast<int>(dout[i]);
          scalar_t* zi = (i < L - 1) ? ra[i + 1].data() : z.data();
          mm_xvt<scalar_t>(act(i, n0), vwt(i), zi, B, in, out, scalar_t(0));
          if (i > 0) mm_xvt<scalar_t>(ra[i].data(), wt(i), zi, B, in, out, scalar_t(1));
          const scalar_t* vbi = vb[i].data_ptr<scalar_t>() + t * out;
          if (i < L - 1) {
            bias_slope<scalar_t>(zi, vbi, act(i + 1, n0), B, out);
          } else {
            for (int b = 0; b < B; ++b)
              for (int j = 0; j < out; ++j) zi[b * out + j] += vbi[j];
          }
        }
        // ---- the output signal Rd_{L-1} [B, A]
        const scalar_t* r = hvp ? deltas[L - 1].data_ptr<scalar_t>() + (t * N + n0) * A : nullptr;
        for (int b = 0; b < B; ++b) {
          const scalar_t q = rs[n0 + b];
          for (int64_t j = 0; j < A; ++j) {
            const scalar_t rm = z[b * A + j];
            scalar_t val = rm * q * cs[j];
            if (hvp) {
              const scalar_t rr = r[b * A + j];
              val -= scalar_t(2) * rr * vo[j];
              rsm[j] += rr * rm;
            }
            rd[b * A + j] = val;
          }
        }
        // ---- backward
        for (int64_t i = L - 1; i >= 0; --i) {
          const int in = static_cast<int>(din[i]), out = static_cast<int>(dout[i]);
          scalar_t* gw = ow[i].data_ptr<scalar_t>() + t * out * in;
          scalar_t* gb = ob[i].data_ptr<scalar_t>() + t * out;
          const scalar_t* dl = hvp ? deltas[i].data_ptr<scalar_t>() + (t * N + n0) * out : nullptr;
          mm_dtx<scalar_t>(rd.data(), act(i, n0), gw, B, in, out);
          if (hvp && i > 0) mm_dtx<scalar_t>(dl, ra[i].data(), gw, B, in, out);
          col_sum<scalar_t>(rd.data(), gb, B, out);
          if (i == 0) break;
          mm_dw<scalar_t>(rd.data(), wt(i), re.data(), B, in, out, scalar_t(0));
          if (hvp) mm_dw<scalar_t>(dl, vwt(i), re.data(), B, in, out, scalar_t(1));
          const scalar_t* pr = hvp ? pres[i].data_ptr<scalar_t>() + (t * N + n0) * in : nullptr;
          back_slope<scalar_t>(rd.data(), re.data(), act(i, n0), pr, hvp ? ra[i].data() : nullptr,
                               static_cast<int64_t>(B) * in);
        }
      }
    }
  });
}

at::Tensor dense(const at::Tensor& t, const char* name, at::ScalarType st,
                 at::IntArrayRef shape) {
  check_float_input(t, kOp, name, static_cast<int64_t>(shape.size()));
  TORCH_CHECK(t.scalar_type() == st, "fastmeta_cpp::", kOp, ": ", name, " must be ", st,
              " like weights[0], got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fastmeta_cpp::", kOp, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
  return t.detach().contiguous();
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> mlp_rop_product(
    at::TensorList weights, at::TensorList acts, at::TensorList deltas, at::TensorList pres,
    const at::Tensor& rowscale, const at::Tensor& colscale, at::TensorList v_w,
    at::TensorList v_b, const at::Tensor& v_out) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, "fastmeta_cpp::", kOp, ": weights must hold at least one layer");
  check_float_input(weights[0], kOp, "weights[0]", 3);
  const at::ScalarType st = weights[0].scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "fastmeta_cpp::", kOp,
              ": float32 or float64 only, got ", st);
  TORCH_CHECK(static_cast<int64_t>(acts.size()) == L && static_cast<int64_t>(v_w.size()) == L &&
                  static_cast<int64_t>(v_b.size()) == L,
              "fastmeta_cpp::", kOp, ": acts, v_w and v_b must hold one tensor per layer (", L,
              "), got ", acts.size(), ", ", v_w.size(), ", ", v_b.size());
  const bool hvp = !deltas.empty();
  TORCH_CHECK(!hvp || (static_cast<int64_t>(deltas.size()) == L &&
                       static_cast<int64_t>(pres.size()) == L),
              "fastmeta_cpp::", kOp, ": deltas and pres must be empty (Gauss-Newton) or hold ",
              L, " tensors (HVP; pres[0] is unused), got ", deltas.size(), ", ", pres.size());
  const int64_t T = weights[0].size(0);
  check_float_input(acts[0], kOp, "acts[0]", 3);
  const int64_t N = acts[0].size(1);
  std::vector<at::Tensor> W, X, D, P, VW, VB, OW, OB;
  int64_t width = acts[0].size(2);
  for (int64_t i = 0; i < L; ++i) {
    check_float_input(weights[i], kOp, "weights[i]", 3);
    const int64_t out = weights[i].size(1);
    W.push_back(dense(weights[i], "weights[i]", st, {T, out, width}));
    X.push_back(dense(acts[i], "acts[i]", st, {T, N, width}));
    VW.push_back(dense(v_w[i], "v_w[i]", st, {T, out, width}));
    VB.push_back(dense(v_b[i], "v_b[i]", st, {T, out}));
    if (hvp) {
      D.push_back(dense(deltas[i], "deltas[i]", st, {T, N, out}));
      P.push_back(i ? dense(pres[i], "pres[i]", st, {T, N, width}) : at::Tensor());
    }
    OW.push_back(at::zeros({T, out, width}, W[i].options()));
    OB.push_back(at::zeros({T, out}, W[i].options()));
    width = out;
  }
  const int64_t A = width;
  at::Tensor rs = dense(rowscale, "rowscale", st, {T, N});
  at::Tensor cs = dense(colscale, "colscale", st, {T, A});
  at::Tensor vo = hvp ? dense(v_out, "v_out", st, {T, A}) : at::Tensor();
  at::Tensor rsum = at::zeros({T, A}, W[0].options());
  TORCH_CHECK(N <= (int64_t{1} << 30) && width < (int64_t{1} << 20), "fastmeta_cpp::", kOp,
              ": sizes too large");
  if (st == at::kFloat) {
    run<float>(W, X, D, P, rs, cs, VW, VB, vo, OW, OB, rsum, T, N);
  } else {
    run<double>(W, X, D, P, rs, cs, VW, VB, vo, OW, OB, rsum, T, N);
  }
  return {OW, OB, rsum};
}

}  // namespace cpu
}  // namespace fastmeta
