// CPU implementations of the fastmeta kernel contract (see the project's kernel spec).
#pragma once

// Declarations only: the light tensor header (~4 s to parse), not <ATen/ATen.h> (~15 s).
#include <ATen/core/ATen_fwd.h>
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace fastmeta {
namespace cpu {

// prototypes: per-episode class means of the support set.
std::tuple<at::Tensor, at::Tensor> prototypes_fwd(const at::Tensor& support,
                                                  const at::Tensor& labels, int64_t n_way);
at::Tensor prototypes_bwd(const at::Tensor& grad_protos, const at::Tensor& labels,
                          const at::Tensor& counts);

// gaussian_product: product of weighted diagonal Gaussian factors [B, C, D] -> (mu, var) [B, D].
std::tuple<at::Tensor, at::Tensor> gaussian_product_fwd(const at::Tensor& mu,
                                                        const at::Tensor& var,
                                                        const at::Tensor& weights,
                                                        double min_var);
std::tuple<at::Tensor, at::Tensor> gaussian_product_bwd(
    const at::Tensor& grad_mu, const at::Tensor& grad_var, const at::Tensor& mu,
    const at::Tensor& var, const at::Tensor& weights, const at::Tensor& mu_out,
    const at::Tensor& var_out, double min_var);

// metric logits between queries and prototypes (metric 0: -scale*sqdist, 1: scale*cosine).
at::Tensor proto_logits_fwd(const at::Tensor& query, const at::Tensor& protos, int64_t metric,
                            double scale, double eps);
std::tuple<at::Tensor, at::Tensor> proto_logits_bwd(const at::Tensor& grad_logits,
                                                    const at::Tensor& query,
                                                    const at::Tensor& protos, int64_t metric,
                                                    double scale, double eps);

// fused logits + logsumexp + NLL + argmax; returns (loss, lse, pred), all [B, Q].
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_loss_fwd(const at::Tensor& query,
                                                              const at::Tensor& protos,
                                                              const at::Tensor& labels,
                                                              int64_t metric, double scale,
                                                              double eps);
std::tuple<at::Tensor, at::Tensor> proto_loss_bwd(const at::Tensor& grad_loss,
                                                  const at::Tensor& query,
                                                  const at::Tensor& protos,
                                                  const at::Tensor& labels, const at::Tensor& lse,
                                                  int64_t metric, double scale, double eps);

// Matching Networks attention (cosine, softmax over the support set, per-class sum), in log
// space: matching_fwd -> (logp [B,Q,N], lse [B,Q]); matching_loss_fwd -> (loss, lse, pred).
std::tuple<at::Tensor, at::Tensor> matching_fwd(const at::Tensor& query, const at::Tensor& support,
                                                const at::Tensor& support_labels, int64_t n_way,
                                                double scale, double eps);
std::tuple<at::Tensor, at::Tensor> matching_bwd(const at::Tensor& grad_logp,
                                                const at::Tensor& query, const at::Tensor& support,
                                                const at::Tensor& support_labels,
                                                const at::Tensor& logp, const at::Tensor& lse,
                                                int64_t n_way, double scale, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> matching_loss_fwd(
    const at::Tensor& query, const at::Tensor& support, const at::Tensor& support_labels,
    const at::Tensor& query_labels, int64_t n_way, double scale, double eps);
std::tuple<at::Tensor, at::Tensor> matching_loss_bwd(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& support,
    const at::Tensor& support_labels, const at::Tensor& query_labels, const at::Tensor& loss,
    const at::Tensor& lse, int64_t n_way, double scale, double eps);

// inner_update: out_i = p_i - alpha * lr_i * g_i for every tensor (one call for all of them), and
// the gradient of the rates (see inner_update.h for the broadcast plan).
std::vector<at::Tensor> inner_update_cpu(at::TensorList params, at::TensorList grads,
                                         at::TensorList lrs, double alpha);
std::vector<at::Tensor> inner_update_lr_grad_cpu(at::TensorList grads, at::TensorList grad_outs,
                                                 at::TensorList lrs, double alpha);

// mlp_hvp: per-task loss, gradient (and Hessian-vector product) of a task-batched MLP.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_grad_fwd(
    at::TensorList weights, at::TensorList biases, const at::Tensor& x, const at::Tensor& y,
    int64_t activation, int64_t loss);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
mlp_grad_hvp_fwd(at::TensorList weights, at::TensorList biases, const at::Tensor& x,
                 const at::Tensor& y, at::TensorList v_w, at::TensorList v_b, int64_t activation,
                 int64_t loss);

// meta_fvp: one curvature product (Gauss-Newton or loss HVP) of a task-batched tanh MLP from
// cached activations, fused over row blocks (MAML-TRPO's meta-Fisher, fastmeta/rl/curvature.py).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> mlp_rop_product(
    at::TensorList weights, at::TensorList acts, at::TensorList pres, const at::Tensor& r,
    const at::Tensor& rowscale, const at::Tensor& colscale, at::TensorList v_w,
    at::TensorList v_b, const at::Tensor& v_out);

}  // namespace cpu
}  // namespace fastmeta
