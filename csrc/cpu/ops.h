// CPU implementations of the fastmeta kernel contract (see the project's kernel spec).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastmeta {
namespace cpu {

// prototypes: per-episode class means of the support set.
std::tuple<at::Tensor, at::Tensor> prototypes_fwd(const at::Tensor& support,
                                                  const at::Tensor& labels, int64_t n_way);
at::Tensor prototypes_bwd(const at::Tensor& grad_protos, const at::Tensor& labels,
                          const at::Tensor& counts);

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

}  // namespace cpu
}  // namespace fastmeta
