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
//   pres[i] [T, N, in_i] (i >= 1) and r [T, N, A]: HVP mode (pres non-empty): the backward
//   signals of the loss at the point, pres[i] = dL/da_i = delta_i W_i and r = delta_{L-1} =
//   dL/dmu, for the R-operator's second-order terms. The hidden deltas are made in the block
//   from them, delta_{i-1} = pres[i] * (1 - a_i^2), not read (a third less memory traffic).
//   pres empty (r unused): Gauss-Newton mode (the Gaussian Fisher).
// Output per task: (J^T D J v) (Gauss-Newton) or the mean-network part of H v (HVP):
//   out_w[i] [T, out_i, in_i], out_b[i] [T, out_i], and rsum [T, A] = sum_n r_n * (J_n v)
//   (HVP; zeros in Gauss-Newton mode) for the log-std cross term, which
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
//   fastmeta_cpp::mlp_rop_product(Tensor[] weights, Tensor[] acts, Tensor[] pres, Tensor r,
//       Tensor rowscale, Tensor colscale, Tensor[] v_w, Tensor[] v_b,
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

// The backward step between layers i and i-1, per row b of the block (in = layer i's input
// width): with s = 1 - a^2,
//   rd[b, :] = re * s - 2 pre * a * ra      (pre == nullptr: Gauss-Newton, re * s only)
//   dn[b, :] = pre * s                      (HVP: d_{i-1} = dL/dz_{i-1}, the next delta)
//   gb[:]   += rd[b, :]                      (layer i-1's bias output)
template <typename T>
FASTMETA_SIMD_CLONES void back_slope(T* __restrict rd, T* __restrict dn, T* __restrict gb,
                                     const T* __restrict re, const T* __restrict a,
                                     const T* __restrict pre, const T* __restrict ra, int64_t B,
                                     int64_t n) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * n;
    if (pre == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T v = re[o + j] * (T(1) - a[o + j] * a[o + j]);
        rd[o + j] = v;
        gb[j] += v;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T aj = a[o + j], pj = pre[o + j], sj = T(1) - aj * aj;
        const T v = re[o + j] * sj - T(2) * pj * aj * ra[o + j];
        rd[o + j] = v;
        dn[o + j] = pj * sj;
        gb[j] += v;
      }
    }
  }
}

// The output layer's forward tangent when it is narrow (out <= kNarrow, as an action dim):
// z[b, j] = vb[j] + a[b, :] . vW[j, :] + ra[b, :] . W[j, :]  (ra == nullptr: no second term).
// BLAS runs a [256, 64] x [64, 2] product at ~15 GFLOP/s; these dot products are 3x faster.
// Built for AVX2 and the baseline only: with 512-bit vectors GCC's horizontal sums make the
// same loop 2x slower (measured on the AVX-512 Xeon).
constexpr int kNarrow = 8;

template <typename T>
FASTMETA_SIMD_CLONES_256 void narrow_out(
    const T* __restrict a, const T* __restrict vw, const T* __restrict ra, const T* __restrict w,
    const T* __restrict vb, T* __restrict z, int B, int in, int out) {
  for (int b = 0; b < B; ++b) {
    const T* ar = a + static_cast<int64_t>(b) * in;
    const T* rr = ra ? ra + static_cast<int64_t>(b) * in : nullptr;
    for (int j = 0; j < out; ++j) {
      const T* vr = vw + static_cast<int64_t>(j) * in;
      T s = vb[j];
      if (rr) {
        const T* wr = w + static_cast<int64_t>(j) * in;
#pragma omp simd reduction(+ : s)
        for (int k = 0; k < in; ++k) s += ar[k] * vr[k] + rr[k] * wr[k];
      } else {
#pragma omp simd reduction(+ : s)
        for (int k = 0; k < in; ++k) s += ar[k] * vr[k];
      }
      z[static_cast<int64_t>(b) * out + j] = s;
    }
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
         const std::vector<at::Tensor>& pres, const at::Tensor& r_out,
         const at::Tensor& rowscale, const at::Tensor& colscale, const std::vector<at::Tensor>& vw,
         const std::vector<at::Tensor>& vb, const at::Tensor& v_out, std::vector<at::Tensor>& ow,
         std::vector<at::Tensor>& ob, at::Tensor& rsum, int64_t T, int64_t N) {
  const int64_t L = static_cast<int64_t>(W.size());
  const bool hvp = !pres.empty();
  std::vector<int64_t> din(L), dout(L);
  for (int64_t i = 0; i < L; ++i) {
    dout[i] = W[i].size(1);
    din[i] = W[i].size(2);
  }
  const int64_t A = dout[L - 1];
  int64_t wmax = 0;
  for (int64_t i = 0; i < L; ++i) wmax = std::max({wmax, din[i], dout[i]});

  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    const MklOneThread mkl_one;  // each task's block GEMMs on this thread (common.h)
    // scratch: Ra_i for i = 1..L-1, the layer output z, the backward signal rd, its product
    // re with the weights, and the current delta (HVP: d_i for i < L-1, from pres and acts)
    std::vector<std::vector<scalar_t>> ra(L);
    for (int64_t i = 1; i < L; ++i) ra[i].resize(kBlock * din[i]);
    std::vector<scalar_t> z(kBlock * wmax), rd(kBlock * wmax), re(kBlock * wmax);
    std::vector<scalar_t> dcur(hvp ? kBlock * wmax : 0);
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
      auto bias = [&](int64_t i) { return ob[i].data_ptr<scalar_t>() + t * dout[i]; };
      for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
        const int B = static_cast<int>(std::min(kBlock, N - n0));
        // ---- forward tangents
        for (int64_t i = 0; i < L; ++i) {
          const int in = static_cast<int>(din[i]), out = static_cast<int>(dout[i]);
          scalar_t* zi = (i < L - 1) ? ra[i + 1].data() : z.data();
          const scalar_t* vbi = vb[i].data_ptr<scalar_t>() + t * out;
          if (i == L - 1 && out <= kNarrow) {
            narrow_out<scalar_t>(act(i, n0), vwt(i), i > 0 ? ra[i].data() : nullptr, wt(i), vbi,
                                 zi, B, in, out);
            continue;
          }
          mm_xvt<scalar_t>(act(i, n0), vwt(i), zi, B, in, out, scalar_t(0));
          if (i > 0) mm_xvt<scalar_t>(ra[i].data(), wt(i), zi, B, in, out, scalar_t(1));
          if (i < L - 1) {
            bias_slope<scalar_t>(zi, vbi, act(i + 1, n0), B, out);
          } else {
            for (int b = 0; b < B; ++b)
              for (int j = 0; j < out; ++j) zi[b * out + j] += vbi[j];
          }
        }
        // ---- the output signal Rd_{L-1} [B, A] and its bias sum
        const scalar_t* r = hvp ? r_out.data_ptr<scalar_t>() + (t * N + n0) * A : nullptr;
        scalar_t* gbo = bias(L - 1);
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
            gbo[j] += val;
          }
        }
        // ---- backward: layer i's weight output, then the signal of layer i-1
        for (int64_t i = L - 1; i >= 0; --i) {
          const int in = static_cast<int>(din[i]), out = static_cast<int>(dout[i]);
          scalar_t* gw = ow[i].data_ptr<scalar_t>() + t * out * in;
          const scalar_t* dl = !hvp ? nullptr : (i == L - 1 ? r : dcur.data());  // d_i
          mm_dtx<scalar_t>(rd.data(), act(i, n0), gw, B, in, out);
          if (hvp && i > 0) mm_dtx<scalar_t>(dl, ra[i].data(), gw, B, in, out);
          if (i == 0) break;
          mm_dw<scalar_t>(rd.data(), wt(i), re.data(), B, in, out, scalar_t(0));
          if (hvp) mm_dw<scalar_t>(dl, vwt(i), re.data(), B, in, out, scalar_t(1));
          const scalar_t* pr = hvp ? pres[i].data_ptr<scalar_t>() + (t * N + n0) * in : nullptr;
          back_slope<scalar_t>(rd.data(), hvp ? dcur.data() : nullptr, bias(i - 1), re.data(),
                               act(i, n0), pr, hvp ? ra[i].data() : nullptr, B, in);
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
    at::TensorList weights, at::TensorList acts, at::TensorList pres, const at::Tensor& r,
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
  const bool hvp = !pres.empty();
  TORCH_CHECK(!hvp || static_cast<int64_t>(pres.size()) == L, "fastmeta_cpp::", kOp,
              ": pres must be empty (Gauss-Newton) or hold ", L,
              " tensors (HVP; pres[0] is unused), got ", pres.size());
  const int64_t T = weights[0].size(0);
  check_float_input(acts[0], kOp, "acts[0]", 3);
  const int64_t N = acts[0].size(1);
  std::vector<at::Tensor> W, X, P, VW, VB, OW, OB;
  int64_t width = acts[0].size(2);
  for (int64_t i = 0; i < L; ++i) {
    check_float_input(weights[i], kOp, "weights[i]", 3);
    const int64_t out = weights[i].size(1);
    W.push_back(dense(weights[i], "weights[i]", st, {T, out, width}));
    X.push_back(dense(acts[i], "acts[i]", st, {T, N, width}));
    VW.push_back(dense(v_w[i], "v_w[i]", st, {T, out, width}));
    VB.push_back(dense(v_b[i], "v_b[i]", st, {T, out}));
    if (hvp) P.push_back(i ? dense(pres[i], "pres[i]", st, {T, N, width}) : at::Tensor());
    OW.push_back(at::zeros({T, out, width}, W[i].options()));
    OB.push_back(at::zeros({T, out}, W[i].options()));
    width = out;
  }
  const int64_t A = width;
  at::Tensor rs = dense(rowscale, "rowscale", st, {T, N});
  at::Tensor cs = dense(colscale, "colscale", st, {T, A});
  at::Tensor ro = hvp ? dense(r, "r", st, {T, N, A}) : at::Tensor();
  at::Tensor vo = hvp ? dense(v_out, "v_out", st, {T, A}) : at::Tensor();
  at::Tensor rsum = at::zeros({T, A}, W[0].options());
  TORCH_CHECK(N <= (int64_t{1} << 30) && width < (int64_t{1} << 20), "fastmeta_cpp::", kOp,
              ": sizes too large");
  if (st == at::kFloat) {
    run<float>(W, X, P, ro, rs, cs, VW, VB, vo, OW, OB, rsum, T, N);
  } else {
    run<double>(W, X, P, ro, rs, cs, VW, VB, vo, OW, OB, rsum, T, N);
  }
  return {OW, OB, rsum};
}

}  // namespace cpu
}  // namespace fastmeta
