// inner_update CPU kernel: out_i = p_i - alpha * lr_i * g_i for every tensor i of a parameter
// list in one call (the MAML inner step, theta' = theta - lr * grad, for all T tasks at once).
//
// One flat work list of (tensor, chunk of kChunk elements) over all tensors runs under a single
// at::parallel_for, so a model with many small tensors still splits evenly and a tiny model
// (sinusoid MLP: ~44K elements for T = 25) runs inline with no parallel region at all. Operands
// are read through the div/mod plan of inner_update.h: within a chunk the kernel walks runs in
// which p and lr either advance with the output or stay constant, so a scalar lr, a per-element
// Meta-SGD lr [*shape] shared by the tasks, a per-task lr, or p.expand(T, *shape) never get
// materialised as [T, *shape] tensors.
#include "inner_update.h"

#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "common.h"

namespace fastmeta {
namespace cpu {
namespace {

using inner_update_plan::Operand;

constexpr int64_t kChunk = 32768;              // elements per work item
constexpr int64_t kParallelMin = 4 * kChunk;   // fewer elements per thread: not worth a region

// o[k] = p[k or 0] - a * l[k or 0] * g[k]
template <typename T, bool PA, bool LA>
FASTMETA_SIMD_CLONES void update_run(const T* __restrict p, const T* __restrict l,
                                     const T* __restrict g, T a, T* __restrict o, int64_t n) {
  if constexpr (!PA && !LA) {
    const T pv = p[0], s = a * l[0];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] = pv - s * g[k];
  } else if constexpr (!PA) {
    const T pv = p[0];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] = pv - a * l[k] * g[k];
  } else if constexpr (!LA) {
    const T s = a * l[0];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] = p[k] - s * g[k];
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] = p[k] - a * l[k] * g[k];
  }
}

// Where operand `op` reads at flat index i, whether it advances with i, and how far it keeps
// doing so (the run length is cut to that).
template <typename T>
inline const T* locate(const Operand& op, const T* fallback, int64_t i, bool& adv, int64_t& len) {
  if (op.ptr == nullptr) {
    adv = false;
    return fallback;
  }
  const T* base = static_cast<const T*>(op.ptr);
  if (op.mod == 1) {
    adv = false;
    return base;
  }
  const int64_t q = i / op.div;
  const int64_t j = q % op.mod;
  if (op.div == 1) {
    adv = true;
    len = std::min(len, op.mod - j);
  } else {
    adv = false;
    len = std::min(len, (q + 1) * op.div - i);
  }
  return base + j;
}

template <typename T>
void update_chunk(const Operand& P, const Operand& G, const Operand& L, T alpha, T* out,
                  int64_t begin, int64_t end) {
  static const T zero = T(0), one = T(1);
  const T* g = static_cast<const T*>(G.ptr);
  int64_t i = begin;
  while (i < end) {
    int64_t len = end - i;
    bool pa = false, la = false;
    const T* p = locate<T>(P, &zero, i, pa, len);
    const T* l = locate<T>(L, &one, i, la, len);
    if (pa && la)
      update_run<T, true, true>(p, l, g + i, alpha, out + i, len);
    else if (pa)
      update_run<T, true, false>(p, l, g + i, alpha, out + i, len);
    else if (la)
      update_run<T, false, true>(p, l, g + i, alpha, out + i, len);
    else
      update_run<T, false, false>(p, l, g + i, alpha, out + i, len);
    i += len;
  }
}

std::vector<at::Tensor> inner_update_cpu(at::TensorList params, at::TensorList grads,
                                         at::TensorList lrs, double alpha) {
  constexpr const char* op = "inner_update";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the Python wrapper owns autograd
  inner_update_plan::check_inputs(params, grads, lrs, alpha, op);
  const auto st = grads[0].scalar_type();
  TORCH_CHECK(grads[0].device().is_cpu(), "fastmeta_cpp::", op, ": CPU kernel got tensors on ",
              grads[0].device());
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "fastmeta_cpp::", op,
              ": the CPU kernel serves float32/float64, got ", st);
  inner_update_plan::Plan plan = inner_update_plan::make_plan(params, grads, lrs);

  std::vector<std::pair<int32_t, int64_t>> work;  // (tensor, chunk start)
  int64_t total = 0;
  for (size_t t = 0; t < grads.size(); ++t) {
    total += plan.numel[t];
    for (int64_t s = 0; s < plan.numel[t]; s += kChunk) work.emplace_back(int32_t(t), s);
  }
  const int64_t grain = std::max<int64_t>(1, kParallelMin / kChunk);
  AT_DISPATCH_FLOATING_TYPES(st, "fastmeta_inner_update_cpu", [&] {
    const scalar_t a = static_cast<scalar_t>(alpha);
    auto body = [&](int64_t wb, int64_t we) {
      for (int64_t w = wb; w < we; ++w) {
        const auto [t, s] = work[w];
        const int64_t e = std::min(plan.numel[t], s + kChunk);
        update_chunk<scalar_t>(plan.p[t], plan.g[t], plan.l[t], a,
                               plan.outs[t].mutable_data_ptr<scalar_t>(), s, e);
      }
    };
    if (total < kParallelMin)
      body(0, int64_t(work.size()));
    else
      at::parallel_for(0, int64_t(work.size()), grain, body);
  });
  return plan.outs;
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_FRAGMENT(fastmeta_cpp, m) {
  m.def("inner_update(Tensor[] params, Tensor[] grads, Tensor[] lrs, float alpha) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_cpp, CPU, m) {
  m.impl("inner_update", &fastmeta::cpu::inner_update_cpu);
}
