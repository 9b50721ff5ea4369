// One-call eager entry points of the classification-head ops (proto_loss, matching_loss,
// prototypes) for the CPU: the fused kernel, the loss reduction and the accuracy in one Python ->
// C++ call, with the gradient as a C++ autograd node (torch::autograd::Function). They exist for small shapes
// (one episode: B=1, Q=25..100, N=5..20, D=64), where the kernels themselves take a few
// microseconds and the fixed costs of the registered-op path (torch.library custom-op dispatch,
// a Python autograd node, ATen calls for the reduction and the accuracy: 40-80 us) made the op
// slower than the plain PyTorch code it replaces. Bound with pybind11 (fastmeta._C.*_fused),
// not through the dispatcher: the Python side calls them only in eager mode on CPU tensors
// (never while torch.compile traces or a functorch transform is active) and keeps the
// registered ops for everything else.
//
// Gradients: the kernels' backward (differentiable once). Under create_graph=True (double
// backward, e.g. second-order MAML through the head) the backward instead recomputes the loss
// with plain differentiable ATen ops (the op's reference formula) and differentiates that with
// create_graph, so the result is twice differentiable as the composite/reference paths are.
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <tuple>

#include "ops.h"

namespace fastmeta {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };
constexpr int64_t kCosine = 1;  // metric codes as fastmeta.ops.PROTO_METRICS (0: sqeuclidean)

// (reduced loss, accuracy) from the kernels' per-row losses and predictions, in `dtype`.
std::tuple<at::Tensor, at::Tensor> reduce_rows(const at::Tensor& rows, const at::Tensor& pred,
                                               const at::Tensor& labels, int64_t reduction,
                                               at::ScalarType dtype) {
  const int64_t n = rows.numel();
  const int64_t* pr = pred.const_data_ptr<int64_t>();
  const int64_t* y = labels.const_data_ptr<int64_t>();  // contiguous (checked by the kernel)
  if (reduction == kNone) {
    at::Tensor correct = at::empty(rows.sizes(), rows.options().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES(dtype, "reduce_rows", [&] {
      scalar_t* c = correct.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) c[i] = pr[i] == y[i] ? scalar_t(1) : scalar_t(0);
    });
    return {rows.scalar_type() == dtype ? rows : rows.to(dtype), correct};
  }
  double total = 0;
  int64_t hits = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "reduce_rows", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) total += static_cast<double>(r[i]);
  });
  for (int64_t i = 0; i < n; ++i) hits += pr[i] == y[i];
  const double denom = n > 0 ? static_cast<double>(n) : 1.0;
  const double loss = reduction == kMean ? total / denom : total;
  at::TensorOptions opt = rows.options().dtype(dtype);
  return {at::scalar_tensor(loss, opt), at::scalar_tensor(static_cast<double>(hits) / denom, opt)};
}

// The per-row loss gradient [B, Q] (compute dtype) of a reduced or per-row loss.
at::Tensor row_grad(const at::Tensor& grad, int64_t reduction, int64_t B, int64_t Q,
                    at::ScalarType ct) {
  at::TensorOptions opt = grad.options().dtype(ct);
  if (reduction == kNone) return grad.detach().to(ct).contiguous();
  double g = grad.item<double>();
  if (reduction == kMean) g /= static_cast<double>(B * Q);
  return at::full({B, Q}, g, opt);
}

const char* reduction_name(int64_t r) { return r == kMean ? "mean" : r == kSum ? "sum" : "none"; }

// Plain differentiable ATen: the reference formulas (fastmeta/ops/_proto_loss.py,
// _matching.py), for the create_graph=True backward only.
at::Tensor normalize(const at::Tensor& x, double eps) {
  return x / x.norm(2, {-1}, /*keepdim=*/true).clamp_min(eps);
}

at::Tensor proto_logits_diff(const at::Tensor& q, const at::Tensor& p, int64_t metric,
                             double scale, double eps) {
  if (metric == kCosine) return at::bmm(normalize(q, eps), normalize(p, eps).transpose(1, 2)) * scale;
  // -scale * ||q - p||^2 without each row's own ||q||^2 (log-softmax ignores a row constant)
  at::Tensor pp = (p * p).sum(-1).unsqueeze(1);
  return at::baddbmm(pp, q, p.transpose(1, 2), -scale, 2.0 * scale);
}

at::Tensor matching_logp_diff(const at::Tensor& q, const at::Tensor& s, const at::Tensor& sy,
                              int64_t n_way, double scale, double eps) {
  at::Tensor logits = at::bmm(normalize(q, eps), normalize(s, eps).transpose(1, 2)) * scale;
  const int64_t B = logits.size(0), Q = logits.size(1), S = logits.size(2);
  at::Tensor idx = sy.unsqueeze(1).expand({B, Q, S});
  at::Tensor cmax = at::full({B, Q, n_way}, -INFINITY, logits.options())
                        .scatter_reduce(-1, idx, logits.detach(), "amax", true);
  cmax = at::where(at::isfinite(cmax), cmax, at::zeros_like(cmax));
  at::Tensor sums = at::zeros({B, Q, n_way}, logits.options())
                        .scatter_add(-1, idx, at::exp(logits - cmax.gather(-1, idx)));
  at::Tensor lse_class = cmax + at::log(sums);
  return lse_class - at::logsumexp(lse_class, {-1}, /*keepdim=*/true);
}

// Gradients of sum(grad * rows) (rows: per-row losses [B, Q]) w.r.t. a and b, with a graph;
// undefined for an input that does not require grad.
variable_list double_backward(const at::Tensor& rows, const Variable& a, const Variable& b,
                              const at::Tensor& grad, int64_t reduction, size_t n_out) {
  variable_list out(n_out);
  variable_list inputs;
  if (a.defined() && a.requires_grad()) inputs.push_back(a);
  if (b.defined() && b.requires_grad()) inputs.push_back(b);
  if (inputs.empty()) return out;
  at::Tensor g = reduction == kNone ? grad : grad.expand(rows.sizes());
  if (reduction == kMean) g = g / static_cast<double>(rows.numel());
  variable_list d = torch::autograd::grad({rows}, inputs, {g}, /*retain_graph=*/true,
                                          /*create_graph=*/true, /*allow_unused=*/true);
  size_t k = 0;
  if (a.defined() && a.requires_grad()) out[0] = d[k++];
  if (b.defined() && b.requires_grad()) out[1] = d[k++];
  return out;
}

// ---- proto_loss -----------------------------------------------------------------------------

struct ProtoLoss : public torch::autograd::Function<ProtoLoss> {
  static variable_list forward(AutogradContext* ctx, const Variable& query,
                               const Variable& protos, const Variable& labels, int64_t metric,
                               double scale, double eps, int64_t reduction) {
    auto [rows, lse, pred] = proto_loss_fwd(query, protos, labels, metric, scale, eps);
    auto [loss, acc] = reduce_rows(rows, pred, labels, reduction, query.scalar_type());
    ctx->save_for_backward({query, protos, labels, lse});
    ctx->saved_data["metric"] = metric;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({acc});
    return {loss, acc};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Variable &q = saved[0], &p = saved[1], &y = saved[2], &lse = saved[3];
    const int64_t metric = ctx->saved_data["metric"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    variable_list out(7);
    if (!grads[0].defined()) return out;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable recomputation
      at::Tensor logits = proto_logits_diff(q, p, metric, scale, eps);
      at::Tensor rows = at::cross_entropy_loss(logits.flatten(0, 1), y.flatten(), {},
                                               at::Reduction::None)
                            .view(y.sizes());
      return double_backward(rows, q, p, grads[0], reduction, out.size());
    }
    at::Tensor gl = row_grad(grads[0], reduction, y.size(0), y.size(1), lse.scalar_type());
    auto [gq, gp] = proto_loss_bwd(gl, q, p, y, lse, metric, scale, eps);
    out[0] = gq;
    out[1] = gp;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> proto_loss_fused(const at::Tensor& query,
                                                    const at::Tensor& protos,
                                                    const at::Tensor& labels, int64_t metric,
                                                    double scale, double eps, int64_t reduction) {
  TORCH_CHECK(reduction >= kMean && reduction <= kNone,
              "fastmeta_cpp::proto_loss_fused: reduction must be 0, 1 or 2, got ", reduction);
  variable_list out =
      ProtoLoss::apply(query, protos, labels.contiguous(), metric, scale, eps, reduction);
  return {out[0], out[1]};
}

// ---- matching_loss --------------------------------------------------------------------------

// Every class of every episode needs a support example (else its log-probability is -inf).
void check_classes_present(const at::Tensor& sy, int64_t n_way) {
  const at::Tensor y = sy.contiguous();
  const int64_t B = y.size(0), S = y.size(1);
  const int64_t* p = y.const_data_ptr<int64_t>();
  std::vector<uint8_t> seen(static_cast<size_t>(n_way));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    int64_t found = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t c = p[b * S + s];
      if (c >= 0 && c < n_way && !seen[c]) {
        seen[c] = 1;
        ++found;
      }
    }
    TORCH_CHECK(found == n_way, "fastmeta_cpp::matching_loss_fused: a class of episode ", b,
                " has no support example");
  }
}

struct MatchingLoss : public torch::autograd::Function<MatchingLoss> {
  static variable_list forward(AutogradContext* ctx, const Variable& query,
                               const Variable& support, const Variable& support_labels,
                               const Variable& query_labels, int64_t n_way, double scale,
                               double eps, int64_t reduction) {
    auto [rows, lse, pred] =
        matching_loss_fwd(query, support, support_labels, query_labels, n_way, scale, eps);
    check_classes_present(support_labels, n_way);  // after the kernel's range check
    auto [loss, acc] = reduce_rows(rows, pred, query_labels, reduction, query.scalar_type());
    ctx->save_for_backward({query, support, support_labels, query_labels, rows, lse});
    ctx->saved_data["n_way"] = n_way;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({acc});
    return {loss, acc};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Variable &q = saved[0], &s = saved[1], &sy = saved[2], &qy = saved[3];
    const Variable &rows = saved[4], &lse = saved[5];
    const int64_t n_way = ctx->saved_data["n_way"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    variable_list out(8);
    if (!grads[0].defined()) return out;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable recomputation
      at::Tensor logp = matching_logp_diff(q, s, sy, n_way, scale, eps);
      at::Tensor r = at::nll_loss(logp.flatten(0, 1), qy.flatten(), {}, at::Reduction::None)
                         .view(qy.sizes());
      return double_backward(r, q, s, grads[0], reduction, out.size());
    }
    at::Tensor gl = row_grad(grads[0], reduction, qy.size(0), qy.size(1), lse.scalar_type());
    auto [gq, gs] = matching_loss_bwd(gl, q, s, sy, qy, rows.detach(), lse, n_way, scale, eps);
    out[0] = gq;
    out[1] = gs;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> matching_loss_fused(const at::Tensor& query,
                                                       const at::Tensor& support,
                                                       const at::Tensor& support_labels,
                                                       const at::Tensor& query_labels,
                                                       int64_t n_way, double scale, double eps,
                                                       int64_t reduction) {
  TORCH_CHECK(reduction >= kMean && reduction <= kNone,
              "fastmeta_cpp::matching_loss_fused: reduction must be 0, 1 or 2, got ", reduction);
  variable_list out = MatchingLoss::apply(query, support, support_labels.contiguous(),
                                          query_labels.contiguous(), n_way, scale, eps, reduction);
  return {out[0], out[1]};
}

// ---- prototypes -----------------------------------------------------------------------------

struct Prototypes : public torch::autograd::Function<Prototypes> {
  static variable_list forward(AutogradContext* ctx, const Variable& support,
                               const Variable& labels, int64_t n_way) {
    auto [protos, counts] = prototypes_fwd(support, labels, n_way);
    const int64_t* c = counts.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < counts.numel(); ++i) {
      TORCH_CHECK(c[i] > 0, "fastmeta_cpp::prototypes_fused: class ", i % n_way, " of episode ",
                  i / n_way, " has no support example");
    }
    ctx->save_for_backward({labels, counts});
    return {protos};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Variable &y = saved[0], &counts = saved[1];
    variable_list out(3);
    if (!grads[0].defined()) return out;
    if (at::GradMode::is_enabled()) {  // create_graph=True: the linear map in differentiable ATen
      // d protos[b,n] / d support[b,s] = [y[b,s] == n] / counts[b,n]: gather the gradient rows
      at::Tensor g = grads[0] / counts.unsqueeze(-1).to(grads[0].scalar_type());
      out[0] = g.gather(1, y.unsqueeze(-1).expand({y.size(0), y.size(1), g.size(2)}));
      return out;
    }
    out[0] = prototypes_bwd(grads[0].contiguous(), y, counts);
    return out;
  }
};

at::Tensor prototypes_fused(const at::Tensor& support, const at::Tensor& labels, int64_t n_way) {
  return Prototypes::apply(support, labels.contiguous(), n_way)[0];
}

// ---- accuracy -------------------------------------------------------------------------------

// correct[r] = (first index of the row's maximum == labels[r]) for logits [R, C] (rows of a
// contiguous [..., C] tensor), as logits.max(-1).indices == labels (a NaN is the maximum; the
// first of equal maxima wins). ATen's max over a short last dimension walks it as a strided
// reduction: 137 us at [32, 100, 20] on one thread, against ~5 us here.
template <typename T>
void correct_rows(const T* x, const int64_t* y, T* out, int64_t R, int64_t C) {
  at::parallel_for(0, R, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * C;
      const int64_t label = y[r];
      // the row's maximum and whether it holds a NaN, branch-free (vectorised)
      T m = row[0];
      int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t j = 0; j < C; ++j) {
        m = row[j] > m ? row[j] : m;
        nan |= row[j] != row[j];
      }
      bool ok;
      if (nan) {  // the first NaN is the maximum
        int64_t first = 0;
        while (!std::isnan(row[first])) ++first;
        ok = first == label;
      } else if (label < 0 || label >= C || !(row[label] == m)) {
        ok = false;
      } else {  // the label holds the maximum: correct unless an earlier class ties it
        int earlier = 0;
#pragma omp simd reduction(| : earlier)
        for (int64_t j = 0; j < label; ++j) earlier |= row[j] == m;
        ok = !earlier;
      }
      out[r] = ok ? T(1) : T(0);
    }
  });
}

at::Tensor argmax_correct(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu() && logits.layout() == at::kStrided,
              "fastmeta_cpp::argmax_correct: CPU strided tensors only");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "fastmeta_cpp::argmax_correct: float32/float64 logits, got ", logits.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fastmeta_cpp::argmax_correct: int64 labels, got ",
              labels.scalar_type());
  TORCH_CHECK(logits.dim() == labels.dim() + 1 && logits.size(-1) > 0 &&
                  logits.sizes().slice(0, labels.dim()) == labels.sizes(),
              "fastmeta_cpp::argmax_correct: logits ", logits.sizes(), " must be labels' shape ",
              labels.sizes(), " plus a non-empty class dimension");
  at::NoGradGuard no_grad;
  const at::Tensor x = logits.detach().contiguous(), y = labels.contiguous();
  at::Tensor out = at::empty(labels.sizes(), x.options());
  const int64_t C = x.size(-1), R = y.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "argmax_correct", [&] {
    correct_rows<scalar_t>(x.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(),
                           out.mutable_data_ptr<scalar_t>(), R, C);
  });
  return out;
}

}  // namespace
}  // namespace cpu

void bind_heads(pybind11::module_& m) {
  m.def("argmax_correct", &cpu::argmax_correct,
        "(logits [..., C].max(-1).indices == labels) as logits' dtype, no grad. CPU, float32/float64.");
  m.def("proto_loss_fused", &cpu::proto_loss_fused,
        "proto_loss (loss, acc) in one call: query, protos, labels, metric (0 sqeuclidean, "
        "1 cosine), scale, eps, reduction (0 mean, 1 sum, 2 none). CPU, float32/float64.");
  m.def("matching_loss_fused", &cpu::matching_loss_fused,
        "matching_loss (loss, acc) in one call: query, support, support_labels, query_labels, "
        "n_way, scale, eps, reduction (0 mean, 1 sum, 2 none). CPU, float32/float64.");
  m.def("prototypes_fused", &cpu::prototypes_fused,
        "prototypes in one call: support, labels, n_way (every class present). CPU, "
        "float32/float64.");
}

}  // namespace fastmeta
