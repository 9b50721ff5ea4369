// gaussian_product_fwd / gaussian_product_bwd: product of weighted diagonal Gaussian factors per
// task (PEARL's posterior over the context), and its gradient. One pass over the factors each:
// the forward accumulates precision and precision-weighted mean over C, the backward reads the
// saved outputs instead of recomputing the sums.
#include "ops.h"

#include <vector>

#include "common.h"

namespace fastmeta {
namespace cpu {

namespace {

// PEARL's clamp; a negative variance is invalid and becomes NaN so that the output shows it (the
// Python wrapper then names the factor). NaN itself passes through (comparisons are false).
template <typename T>
inline T clamped(T v, T min_var) {
  return v < T(0) ? std::numeric_limits<T>::quiet_NaN() : (v < min_var ? min_var : v);
}

// One task's block of C factors x n dims (row stride D), factors with weight 0 skipped (padding:
// never read). The loop over C is inside the clone-dispatched function: PEARL's D is 5-32, and a
// call per factor cost more than its arithmetic.
//
// P[d] = sum_c w_c / v_cd and S[d] = sum_c w_c m_cd / v_cd, kept in double (C terms, often with
// cancellation in S: a float running sum over C = 256 was 10x less accurate than torch.sum).
template <typename T>
FASTMETA_SIMD_CLONES void accumulate(const T* __restrict m, const T* __restrict v,
                                     const T* __restrict w, T min_var, int64_t C, int64_t D,
                                     double* __restrict P, double* __restrict S, int64_t n) {
  for (int64_t c = 0; c < C; ++c) {
    const T wc = w[c];
    if (!(wc > T(0))) continue;
    const T* __restrict mc = m + c * D;
    const T* __restrict vc = v + c * D;
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
      const T r = wc / clamped(vc[d], min_var);
      P[d] += r;
      S[d] += r * mc[d];
    }
  }
}

// gm = r * A, gv = r / v * (K - A * m) with r = w / v, where the clamp passed the gradient
// (v >= min_var), else 0; padding gets 0.
template <typename T>
FASTMETA_SIMD_CLONES void factor_grads(const T* __restrict m, const T* __restrict v,
                                       const T* __restrict w, const T* __restrict A,
                                       const T* __restrict K, T min_var, int64_t C, int64_t D,
                                       T* __restrict gm, T* __restrict gv, int64_t n) {
  for (int64_t c = 0; c < C; ++c) {
    const T wc = w[c];
    const int64_t o = c * D;
    if (!(wc > T(0))) {
      std::fill(gm + o, gm + o + n, T(0));
      std::fill(gv + o, gv + o + n, T(0));
      continue;
    }
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
      const T vd = v[o + d];
      const T inv = T(1) / clamped(vd, min_var);  // one division per element
      const T r = wc * inv;
      gm[o + d] = r * A[d];
      gv[o + d] = vd >= min_var ? r * inv * (K[d] - A[d] * m[o + d]) : T(0);
    }
  }
}

// Work items: (task, chunk of D), so one task with a wide D still uses every thread; items are
// grouped into at least 32768 factor values per thread (ATen's own grain): below that a parallel
// region costs more than it saves, and on a loaded machine an OpenMP team waiting for a
// descheduled thread took 20 ms for PEARL's [16, 256, 5] (a grain of 16384 went parallel there).
struct Plan {
  int64_t chunks, dlen, grain;
};

Plan plan(int64_t B, int64_t C, int64_t D) {
  const int64_t nt = at::get_num_threads();
  const int64_t chunks =
      B >= nt ? 1 : std::max<int64_t>(1, std::min(ceil_div(2 * nt, B), D / 256));
  const int64_t dlen = ceil_div(D, chunks);
  return {chunks, dlen, std::max<int64_t>(1, ceil_div(32768, std::max<int64_t>(1, C * dlen)))};
}

template <typename T>
void fwd_kernel(const T* mu, const T* var, const T* w, T min_var, T* mu_out, T* var_out,
                int64_t B, int64_t C, int64_t D) {
  const Plan p = plan(B, C, D);
  at::parallel_for(0, B * p.chunks, p.grain, [&](int64_t begin, int64_t end) {
    std::vector<double> P(p.dlen), S(p.dlen);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / p.chunks;
      const int64_t d0 = (it % p.chunks) * p.dlen;
      const int64_t len = std::min(D, d0 + p.dlen) - d0;
      if (len <= 0) continue;
      std::fill(P.begin(), P.end(), 0.0);
      std::fill(S.begin(), S.end(), 0.0);
      const int64_t off = b * C * D + d0;
      accumulate<T>(mu + off, var + off, w + b * C, min_var, C, D, P.data(), S.data(), len);
      for (int64_t d = 0; d < len; ++d) {
        var_out[b * D + d0 + d] = static_cast<T>(1.0 / P[d]);
        mu_out[b * D + d0 + d] = static_cast<T>(S[d] / P[d]);
      }
    }
  });
}

template <typename T>
void bwd_kernel(const T* g_mu, const T* g_var, const T* mu, const T* var, const T* w, T min_var,
                const T* mu_out, const T* var_out, T* gmu, T* gvar, int64_t B, int64_t C,
                int64_t D) {
  const Plan p = plan(B, C, D);
  at::parallel_for(0, B * p.chunks, p.grain, [&](int64_t begin, int64_t end) {
    std::vector<T> A(p.dlen), K(p.dlen);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / p.chunks;
      const int64_t d0 = (it % p.chunks) * p.dlen;
      const int64_t len = std::min(D, d0 + p.dlen) - d0;
      if (len <= 0) continue;
      // A = dL/dS = g_mu * var_out; K = -dL/dP = var_out * (g_var * var_out + g_mu * mu_out)
      for (int64_t d = 0; d < len; ++d) {
        const int64_t o = b * D + d0 + d;
        A[d] = g_mu[o] * var_out[o];
        K[d] = var_out[o] * (g_var[o] * var_out[o] + g_mu[o] * mu_out[o]);
      }
      const int64_t off = b * C * D + d0;
      factor_grads<T>(mu + off, var + off, w + b * C, A.data(), K.data(), min_var, C, D,
                      gmu + off, gvar + off, len);
    }
  });
}

void check_inputs(const char* op, const at::Tensor& mu, const at::Tensor& var,
                  const at::Tensor& weights, double min_var) {
  check_float_input(mu, op, "mu", 3);
  check_float_input(var, op, "var", 3);
  check_float_input(weights, op, "weights", 2);
  TORCH_CHECK(var.sizes() == mu.sizes(), "fastmeta_cpp::", op, ": var must have mu's shape ",
              mu.sizes(), ", got ", var.sizes());
  TORCH_CHECK(weights.size(0) == mu.size(0) && weights.size(1) == mu.size(1), "fastmeta_cpp::",
              op, ": weights must have shape [B, C] = [", mu.size(0), ", ", mu.size(1), "], got ",
              weights.sizes());
  TORCH_CHECK(std::isfinite(min_var) && min_var > 0, "fastmeta_cpp::", op,
              ": min_var must be finite and > 0, got ", min_var);
}

void check_bd(const char* op, const char* name, const at::Tensor& t, const at::Tensor& mu) {
  check_float_input(t, op, name, 2);
  TORCH_CHECK(t.size(0) == mu.size(0) && t.size(1) == mu.size(2), "fastmeta_cpp::", op, ": ",
              name, " must have shape [B, D] = [", mu.size(0), ", ", mu.size(2), "], got ",
              t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gaussian_product_fwd(const at::Tensor& mu,
                                                        const at::Tensor& var,
                                                        const at::Tensor& weights,
                                                        double min_var) {
  constexpr const char* op = "gaussian_product_fwd";
  // Kernels run below autograd (the Python wrapper owns the gradient formula).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(op, mu, var, weights, min_var);
  const int64_t B = mu.size(0), C = mu.size(1), D = mu.size(2);
  const auto in_dtype = mu.scalar_type();
  const auto ct = compute_dtype(in_dtype);
  const at::Tensor m = as_compute(mu, ct), v = as_compute(var, ct), w = as_compute(weights, ct);
  at::Tensor mu_out = at::empty({B, D}, m.options());
  at::Tensor var_out = at::empty({B, D}, m.options());
  if (B * D > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, op, [&] {
      fwd_kernel<scalar_t>(m.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                           w.const_data_ptr<scalar_t>(), static_cast<scalar_t>(min_var),
                           mu_out.mutable_data_ptr<scalar_t>(),
                           var_out.mutable_data_ptr<scalar_t>(), B, C, D);
    });
  }
  return {to_dtype(mu_out, in_dtype), to_dtype(var_out, in_dtype)};
}

std::tuple<at::Tensor, at::Tensor> gaussian_product_bwd(
    const at::Tensor& grad_mu, const at::Tensor& grad_var, const at::Tensor& mu,
    const at::Tensor& var, const at::Tensor& weights, const at::Tensor& mu_out,
    const at::Tensor& var_out, double min_var) {
  constexpr const char* op = "gaussian_product_bwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(op, mu, var, weights, min_var);
  check_bd(op, "grad_mu", grad_mu, mu);
  check_bd(op, "grad_var", grad_var, mu);
  check_bd(op, "mu_out", mu_out, mu);
  check_bd(op, "var_out", var_out, mu);
  const int64_t B = mu.size(0), C = mu.size(1), D = mu.size(2);
  const auto in_dtype = mu.scalar_type();
  const auto ct = compute_dtype(in_dtype);
  const at::Tensor m = as_compute(mu, ct), v = as_compute(var, ct), w = as_compute(weights, ct);
  const at::Tensor gm = as_compute(grad_mu, ct), gv = as_compute(grad_var, ct);
  const at::Tensor mo = as_compute(mu_out, ct), vo = as_compute(var_out, ct);
  at::Tensor gmu = at::empty({B, C, D}, m.options());
  at::Tensor gvar = at::empty({B, C, D}, m.options());
  if (B * C * D > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, op, [&] {
      bwd_kernel<scalar_t>(gm.const_data_ptr<scalar_t>(), gv.const_data_ptr<scalar_t>(),
                           m.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                           w.const_data_ptr<scalar_t>(), static_cast<scalar_t>(min_var),
                           mo.const_data_ptr<scalar_t>(), vo.const_data_ptr<scalar_t>(),
                           gmu.mutable_data_ptr<scalar_t>(), gvar.mutable_data_ptr<scalar_t>(), B,
                           C, D);
    });
  }
  return {to_dtype(gmu, in_dtype), to_dtype(gvar, in_dtype)};
}

}  // namespace cpu
}  // namespace fastmeta
