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
#include "ops.h"


#include <algorithm>
#include <utility>
#include <vector>

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

}  // namespace

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

namespace {

// ---- the learning-rate gradient: d lr = -alpha * sum over the broadcast dims of g * go ---------
//
// With lr read as lr[(i / div) % mod]: d_lr[j] = -alpha * sum_q sum_r (g * go)[(q * mod + j) * div
// + r] (q < numel / (mod * div), r < div). One pass over g and go, no [T, *shape] temporary (the
// torch expression (g * go).sum_to_size(lr.shape) writes one).
// sum_k a[k] * b[k] carried in double (float32: products and sum exact to double precision, so
// only the final rounding to float32 remains)
template <typename T>
FASTMETA_SIMD_CLONES double dot_wide(const T* __restrict a, const T* __restrict b, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return s;
}

template <typename T>
void lr_grad_span(const T* g, const T* go, int64_t numel, int64_t div, int64_t mod, T alpha, T* out) {
  const int64_t Q = numel / (div * mod);
  if (mod == 1) {  // one rate for the whole tensor: a dot product, fixed blocks summed in order
    const int64_t blocks = ceil_div(numel, kChunk);
    std::vector<double> part(blocks, 0.0);
    auto body = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * kChunk, e = std::min(numel, s + kChunk);
        part[b] = dot_wide<T>(g + s, go + s, e - s);
      }
    };
    if (numel < kParallelMin) body(0, blocks);
    else at::parallel_for(0, blocks, 1, body);
    double acc = 0;
    for (double v : part) acc += v;
    out[0] = static_cast<T>(-static_cast<double>(alpha) * acc);
    return;
  }
  // parallel over ranges of j, each about kChunk elements of g
  const int64_t per_j = Q * div;
  const int64_t jlen = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, per_j));
  const int64_t items = ceil_div(mod, jlen);
  // Products and sums over q (the tasks, typically) in double: float32 results then carry only
  // their final rounding, less than PyTorch's own (g * go).sum(0).
  const double na = -static_cast<double>(alpha);
  auto body = [&](int64_t w0, int64_t w1) {
    std::vector<double> acc(div == 1 ? static_cast<size_t>(jlen) : 0);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t j0 = w * jlen, j1 = std::min(mod, j0 + jlen);
      if (div == 1) {  // accumulate rows of length j1 - j0, vectorised along j
        double* __restrict o = acc.data();
        std::fill(o, o + (j1 - j0), 0.0);
        for (int64_t q = 0; q < Q; ++q) {
          const T* __restrict a = g + q * mod + j0;
          const T* __restrict b = go + q * mod + j0;
#pragma omp simd
          for (int64_t k = 0; k < j1 - j0; ++k)
            o[k] += static_cast<double>(a[k]) * static_cast<double>(b[k]);
        }
        for (int64_t k = 0; k < j1 - j0; ++k) out[j0 + k] = static_cast<T>(na * o[k]);
      } else {
        for (int64_t j = j0; j < j1; ++j) {
          double a = 0;
          for (int64_t q = 0; q < Q; ++q) {
            const int64_t s = (q * mod + j) * div;
            a += dot_wide<T>(g + s, go + s, div);
          }
          out[j] = static_cast<T>(na * a);
        }
      }
    }
  };
  if (numel < kParallelMin) body(0, items);
  else at::parallel_for(0, items, 1, body);
}

}  // namespace

std::vector<at::Tensor> inner_update_lr_grad_cpu(at::TensorList grads, at::TensorList grad_outs,
                                                 at::TensorList lrs, double alpha) {
  constexpr const char* op = "inner_update_lr_grad";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  inner_update_plan::check_inputs(grad_outs, grads, lrs, alpha, op);
  TORCH_CHECK(lrs.size() == grads.size(), "fastmeta_cpp::", op, ": got ", lrs.size(), " lrs for ",
              grads.size(), " grads");
  const auto st = grads[0].scalar_type();
  TORCH_CHECK(grads[0].device().is_cpu(), "fastmeta_cpp::", op, ": CPU kernel got tensors on ",
              grads[0].device());
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "fastmeta_cpp::", op,
              ": the CPU kernel serves float32/float64, got ", st);
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::IntArrayRef shape = grads[i].sizes();
    TORCH_CHECK(grad_outs[i].sizes() == shape, "fastmeta_cpp::", op, ": grad_outs[", i,
                "] has shape ", grad_outs[i].sizes(), ", grads[", i, "] ", shape);
    at::Tensor out = at::empty(lrs[i].sizes(), grads[i].options());
    const int64_t numel = grads[i].numel();
    if (numel == 0) {
      outs.push_back(out.zero_());
      continue;
    }
    const inner_update_plan::Operand plan = inner_update_plan::plan_operand(out, shape);
    if (plan.keep.defined()) {  // a broadcast the div/mod formula cannot express: plain ATen
      outs.push_back(at::mul(grads[i], grad_outs[i]).sum_to_size(lrs[i].sizes()).mul_(-alpha));
      continue;
    }
    const at::Tensor g = grads[i].contiguous(), go = grad_outs[i].contiguous();
    AT_DISPATCH_FLOATING_TYPES(st, "fastmeta_inner_update_lr_grad_cpu", [&] {
      lr_grad_span<scalar_t>(g.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), numel,
                             plan.div, plan.mod, static_cast<scalar_t>(alpha),
                             out.mutable_data_ptr<scalar_t>());
    });
    outs.push_back(out);
  }
  return outs;
}

}  // namespace cpu
}  // namespace fastmeta
