// prototypes_fwd / prototypes_bwd: class means of the support set and their gradient.
#include "ops.h"

#include "common.h"

namespace fastmeta {
namespace cpu {

namespace {

// One episode's prototypes over columns [d0, d0 + len): zero, add each support row to its
// class, divide by the counts. One ISA-dispatched call per work item (the loops inline here;
// per-row axpy calls through the target_clones resolver cost ~1 us at 20-way 5-shot).
template <typename T>
FASTMETA_SIMD_CLONES void episode_protos(const T* __restrict xb, const int64_t* yb, const int64_t* cb,
                                         T* __restrict P, int64_t S, int64_t N, int64_t D, int64_t len) {
  for (int64_t n = 0; n < N; ++n) {
    T* row = P + n * D;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) row[i] = T(0);
  }
  for (int64_t s = 0; s < S; ++s) {
    const T* x = xb + s * D;
    T* row = P + yb[s] * D;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) row[i] += x[i];
  }
  for (int64_t n = 0; n < N; ++n) {
    // literal sum / count (a class without support gives 0/0 = nan, as the math says)
    const T c = static_cast<T>(cb[n]);
    T* row = P + n * D;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) row[i] = row[i] / c;
  }
}

// protos[b] = sum of support rows per class / count. Work items: (episode, chunk of D) so a
// single episode still uses every thread.
template <typename T>
void prototypes_fwd_kernel(const T* xp, const int64_t* yp, const int64_t* cp, T* pp, int64_t B,
                           int64_t S, int64_t N, int64_t D) {
  const int64_t nt = at::get_num_threads();
  const int64_t dchunks =
      B >= nt ? 1 : std::max<int64_t>(1, std::min(ceil_div(2 * nt, B), D / 256));
  const int64_t dlen = ceil_div(D, dchunks);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S * dlen));
  at::parallel_for(0, B * dchunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / dchunks;
      const int64_t d0 = (it % dchunks) * dlen;
      const int64_t len = std::min(D, d0 + dlen) - d0;
      if (len <= 0) continue;
      episode_protos<T>(xp + b * S * D + d0, yp + b * S, cp + b * N, pp + b * N * D + d0, S, N, D, len);
    }
  });
}

// grad_support[b,s] = grad_protos[b, labels[b,s]] / counts[b, labels[b,s]]
template <typename T>
void prototypes_bwd_kernel(const T* gp, const int64_t* yp, const int64_t* cp, T* out, int64_t B,
                           int64_t S, int64_t N, int64_t D) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D));
  at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S;
      const int64_t n = yp[r];
      const T c = static_cast<T>(cp[b * N + n]);
      div_to<T>(gp + (b * N + n) * D, c, out + r * D, D);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prototypes_fwd(const at::Tensor& support,
                                                  const at::Tensor& labels, int64_t n_way) {
  constexpr const char* op = "prototypes_fwd";
  // Kernels run below autograd (the Python wrapper owns the gradient formula).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_float_input(support, op, "support", 3);
  TORCH_CHECK(n_way >= 1, "fastmeta_cpp::", op, ": n_way must be >= 1, got ", n_way);
  const int64_t B = support.size(0), S = support.size(1), D = support.size(2), N = n_way;
  check_index_tensor(labels, op, "labels", B, S);
  const at::Tensor y = labels.contiguous();
  check_label_range(y, N, op, "labels");

  const auto in_dtype = support.scalar_type();
  const auto ct = compute_dtype(in_dtype);
  const at::Tensor x = as_compute(support, ct);
  at::Tensor protos = at::empty({B, N, D}, x.options());  // zeroed by the kernel
  at::Tensor counts = at::zeros({B, N}, y.options());

  const int64_t* yp = y.const_data_ptr<int64_t>();
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * S; ++i) cp[(i / S) * N + yp[i]] += 1;

  if (B * D > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, op, [&] {
      prototypes_fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), yp, cp,
                                      protos.mutable_data_ptr<scalar_t>(), B, S, N, D);
    });
  }
  return {to_dtype(protos, in_dtype), counts};
}

at::Tensor prototypes_bwd(const at::Tensor& grad_protos, const at::Tensor& labels,
                          const at::Tensor& counts) {
  constexpr const char* op = "prototypes_bwd";
  // Kernels run below autograd (the Python wrapper owns the gradient formula).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_float_input(grad_protos, op, "grad_protos", 3);
  const int64_t B = grad_protos.size(0), N = grad_protos.size(1), D = grad_protos.size(2);
  TORCH_CHECK(labels.defined() && labels.dim() == 2, "fastmeta_cpp::", op,
              ": labels must be a 2-D [B, S] tensor");
  const int64_t S = labels.size(1);
  check_index_tensor(labels, op, "labels", B, S);
  check_index_tensor(counts, op, "counts", B, N);
  const at::Tensor y = labels.contiguous();
  check_label_range(y, N, op, "labels");
  const at::Tensor cnt = counts.contiguous();

  const auto in_dtype = grad_protos.scalar_type();
  const auto ct = compute_dtype(in_dtype);
  const at::Tensor g = as_compute(grad_protos, ct);
  at::Tensor out = at::empty({B, S, D}, g.options());
  if (B * S * D > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, op, [&] {
      prototypes_bwd_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(),
                                      cnt.const_data_ptr<int64_t>(),
                                      out.mutable_data_ptr<scalar_t>(), B, S, N, D);
    });
  }
  return to_dtype(out, in_dtype);
}

}  // namespace cpu
}  // namespace fastmeta
