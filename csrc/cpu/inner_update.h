// inner_update: the host-side plan shared by the CPU kernel (cpu/inner_update.cpp) and the CUDA
// launcher (cuda/inner_update_launch.cpp).
//
// out_i = p_i - alpha * lr_i * g_i for every tensor i, out_i of g_i's shape. p_i and lr_i may be
// anything broadcastable to that shape. Each operand is read through one index formula,
//     x[i] = base[(i / div) % mod]        (i: flat index into the contiguous output)
// which covers, without materialising anything: a scalar (mod = 1); a contiguous tensor of the
// full shape (div = 1, mod = numel); a per-element Meta-SGD lr [*shape] or an expanded parameter
// p.expand(T, *shape) (div = 1, mod = numel / T); a per-task lr [T, 1, ..., 1] (div = numel / T,
// mod = T). In general: the broadcast operand's non-broadcast dims form one contiguous run of
// the shape with row-major strides. Anything else is copied to a contiguous tensor first.
#pragma once

#include <ATen/core/ATen_fwd.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace fastmeta {
namespace inner_update_plan {

struct Operand {
  const void* ptr = nullptr;  // nullptr: absent (p only: reads as 0)
  int64_t div = 1;
  int64_t mod = 1;
  at::Tensor keep;  // owns a contiguous copy when the operand had to be materialised
  bool full(int64_t numel) const { return div == 1 && mod == numel; }
};

inline bool broadcastable(at::IntArrayRef from, at::IntArrayRef to) {
  if (from.size() > to.size()) return false;
  const size_t off = to.size() - from.size();
  for (size_t d = 0; d < from.size(); ++d)
    if (from[d] != 1 && from[d] != to[off + d]) return false;
  return true;
}

// Reads `x` (broadcastable to `shape`) through the div/mod formula; copies it when its
// strides do not fit.
inline Operand plan_operand(const at::Tensor& x, at::IntArrayRef shape) {
  Operand op;
  const at::Tensor v = x.expand(shape);
  const int64_t nd = static_cast<int64_t>(shape.size());
  int64_t a = -1, b = -1;
  for (int64_t d = 0; d < nd; ++d) {
    if (shape[d] > 1 && v.stride(d) != 0) {
      if (a < 0) a = d;
      b = d;
    }
  }
  if (a < 0) {  // one value for every element (or no element at all)
    op.ptr = v.data_ptr();
    return op;
  }
  bool ok = true;
  int64_t expect = 1;
  for (int64_t d = b; d >= a; --d) {
    if (shape[d] == 1) continue;
    if (v.stride(d) != expect) {
      ok = false;
      break;
    }
    expect *= shape[d];
  }
  if (ok) {
    int64_t div = 1;
    for (int64_t d = b + 1; d < nd; ++d) div *= shape[d];
    op.ptr = v.data_ptr();
    op.div = div;
    op.mod = expect;
    return op;
  }
  op.keep = v.contiguous();
  op.ptr = op.keep.data_ptr();
  op.div = 1;
  op.mod = op.keep.numel();
  return op;
}

// Validation shared by both devices. `dev` is "CPU" or "CUDA" (for the message only).
inline void check_inputs(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                         double alpha, const char* op) {
  const size_t n = grads.size();
  TORCH_CHECK(n >= 1, "fastmeta_cpp::", op, ": grads must hold at least one tensor");
  TORCH_CHECK(params.empty() || params.size() == n, "fastmeta_cpp::", op, ": got ", params.size(),
              " params for ", n, " grads (expected as many, or none)");
  TORCH_CHECK(lrs.empty() || lrs.size() == n, "fastmeta_cpp::", op, ": got ", lrs.size(),
              " lrs for ", n, " grads (expected as many, or none)");
  const auto st = grads[0].scalar_type();
  const auto dev = grads[0].device();
  auto check_one = [&](const at::Tensor& t, const char* what, size_t i, at::IntArrayRef shape) {
    TORCH_CHECK(t.defined(), "fastmeta_cpp::", op, ": ", what, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, "fastmeta_cpp::", op, ": ", what, "[", i,
                "] must be a dense strided tensor");
    TORCH_CHECK(t.scalar_type() == st, "fastmeta_cpp::", op, ": ", what, "[", i, "] has dtype ",
                t.scalar_type(), " but grads[0] has ", st, "; all tensors must share one dtype");
    TORCH_CHECK(t.device() == dev, "fastmeta_cpp::", op, ": ", what, "[", i, "] is on ",
                t.device(), " but grads[0] is on ", dev);
    TORCH_CHECK(broadcastable(t.sizes(), shape), "fastmeta_cpp::", op, ": ", what, "[", i,
                "] of shape ", t.sizes(), " is not broadcastable to grads[", i, "]'s shape ",
                shape);
  };
  for (size_t i = 0; i < n; ++i) {
    check_one(grads[i], "grads", i, grads[i].sizes());
    if (!params.empty()) check_one(params[i], "params", i, grads[i].sizes());
    if (!lrs.empty()) check_one(lrs[i], "lrs", i, grads[i].sizes());
  }
  TORCH_CHECK(std::isfinite(alpha), "fastmeta_cpp::", op, ": alpha must be finite, got ", alpha);
}

struct Plan {
  std::vector<at::Tensor> outs;
  std::vector<Operand> p, g, l;
  std::vector<int64_t> numel;
};

// Outputs allocated (contiguous, grads' shape and dtype) and every operand planned. The grads
// are always read "full" (copied when they are not contiguous).
inline Plan make_plan(at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  Plan plan;
  const size_t n = grads.size();
  plan.outs.reserve(n);
  plan.p.resize(n);
  plan.g.resize(n);
  plan.l.resize(n);
  plan.numel.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::IntArrayRef shape = grads[i].sizes();
    plan.outs.push_back(at::empty(shape, grads[i].options().memory_format(at::MemoryFormat::Contiguous)));
    plan.numel[i] = grads[i].numel();
    if (plan.numel[i] == 0) continue;
    Operand g = plan_operand(grads[i], shape);
    if (!g.full(plan.numel[i])) {
      g.keep = grads[i].contiguous();
      g.ptr = g.keep.data_ptr();
      g.div = 1;
      g.mod = plan.numel[i];
    }
    plan.g[i] = g;
    if (!params.empty()) plan.p[i] = plan_operand(params[i], shape);
    if (!lrs.empty()) plan.l[i] = plan_operand(lrs[i], shape);
  }
  return plan;
}

}  // namespace inner_update_plan
}  // namespace fastmeta
