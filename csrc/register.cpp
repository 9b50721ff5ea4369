// Operator registration (torch.ops.fastmeta_cpp.*) and the `fastmeta._C` Python module.
//
// Importing fastmeta._C runs the static TORCH_LIBRARY initialisers below, which registers the
// schemas and their CPU kernels with the dispatcher. Every schema of fastmeta_cpp is declared
// here and nowhere else (cuda/inner_update_launch.cpp adds only its CUDA implementation); the
// kernel units include no torch/library.h (~9 s of parsing each). No Meta/fake kernels are registered here:
// fake (shape) implementations belong to the Python side (torch.library.register_fake).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "cpu/ops.h"

namespace fastmeta {
// pybind11 entry points that bypass the dispatcher (eager CPU fast paths, each with its
// registered-op or ATen formulation as the reference and fallback):
// csrc/cpu/heads_fused.cpp: one-call proto_loss / matching_loss / prototypes.
void bind_heads(pybind11::module_& m);
// csrc/cpu/task_bn.cpp: the fused batch-norm double backward of the task-batched layers.
void bind_task_bn(pybind11::module_& m);
}  // namespace fastmeta

#ifndef FASTMETA_TORCH_VERSION
#define FASTMETA_TORCH_VERSION "unknown"
#endif
#ifndef FASTMETA_VERSION
#define FASTMETA_VERSION "unknown"
#endif

TORCH_LIBRARY(fastmeta_cpp, m) {
  m.def("inner_update(Tensor[] params, Tensor[] grads, Tensor[] lrs, float alpha) -> Tensor[]");
  m.def(
      "inner_update_lr_grad(Tensor[] grads, Tensor[] grad_outs, Tensor[] lrs, float alpha)"
      " -> Tensor[]");
  m.def(
      "mlp_grad_fwd(Tensor[] weights, Tensor[] biases, Tensor x, Tensor y, int activation, "
      "int loss) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "mlp_grad_hvp_fwd(Tensor[] weights, Tensor[] biases, Tensor x, Tensor y, Tensor[] v_w, "
      "Tensor[] v_b, int activation, int loss) -> (Tensor, Tensor[], Tensor[], Tensor[], "
      "Tensor[])");
  m.def(
      "mlp_rop_product(Tensor[] weights, Tensor[] acts, Tensor[] pres, Tensor r, "
      "Tensor rowscale, Tensor colscale, Tensor[] v_w, Tensor[] v_b, Tensor v_out) -> "
      "(Tensor[], Tensor[], Tensor)");
  m.def("prototypes_fwd(Tensor support, Tensor labels, int n_way) -> (Tensor, Tensor)");
  m.def("prototypes_bwd(Tensor grad_protos, Tensor labels, Tensor counts) -> Tensor");
  m.def(
      "gaussian_product_fwd(Tensor mu, Tensor var, Tensor weights, float min_var)"
      " -> (Tensor, Tensor)");
  m.def(
      "gaussian_product_bwd(Tensor grad_mu, Tensor grad_var, Tensor mu, Tensor var, "
      "Tensor weights, Tensor mu_out, Tensor var_out, float min_var) -> (Tensor, Tensor)");
  m.def(
      "proto_logits_fwd(Tensor query, Tensor protos, int metric, float scale, float eps)"
      " -> Tensor");
  m.def(
      "proto_logits_bwd(Tensor grad_logits, Tensor query, Tensor protos, int metric, "
      "float scale, float eps) -> (Tensor, Tensor)");
  m.def(
      "proto_loss_fwd(Tensor query, Tensor protos, Tensor labels, int metric, float scale, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "proto_loss_bwd(Tensor grad_loss, Tensor query, Tensor protos, Tensor labels, Tensor lse, "
      "int metric, float scale, float eps) -> (Tensor, Tensor)");
  m.def(
      "matching_fwd(Tensor query, Tensor support, Tensor support_labels, int n_way, "
      "float scale, float eps) -> (Tensor, Tensor)");
  m.def(
      "matching_bwd(Tensor grad_logp, Tensor query, Tensor support, Tensor support_labels, "
      "Tensor logp, Tensor lse, int n_way, float scale, float eps) -> (Tensor, Tensor)");
  m.def(
      "matching_loss_fwd(Tensor query, Tensor support, Tensor support_labels, "
      "Tensor query_labels, int n_way, float scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "matching_loss_bwd(Tensor grad_loss, Tensor query, Tensor support, Tensor support_labels, "
      "Tensor query_labels, Tensor loss, Tensor lse, int n_way, float scale, float eps)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta_cpp, CPU, m) {
  m.impl("inner_update", &fastmeta::cpu::inner_update_cpu);
  m.impl("inner_update_lr_grad", &fastmeta::cpu::inner_update_lr_grad_cpu);
  m.impl("mlp_grad_fwd", &fastmeta::cpu::mlp_grad_fwd);
  m.impl("mlp_grad_hvp_fwd", &fastmeta::cpu::mlp_grad_hvp_fwd);
  m.impl("mlp_rop_product", &fastmeta::cpu::mlp_rop_product);
  m.impl("prototypes_fwd", &fastmeta::cpu::prototypes_fwd);
  m.impl("prototypes_bwd", &fastmeta::cpu::prototypes_bwd);
  m.impl("gaussian_product_fwd", &fastmeta::cpu::gaussian_product_fwd);
  m.impl("gaussian_product_bwd", &fastmeta::cpu::gaussian_product_bwd);
  m.impl("proto_logits_fwd", &fastmeta::cpu::proto_logits_fwd);
  m.impl("proto_logits_bwd", &fastmeta::cpu::proto_logits_bwd);
  m.impl("proto_loss_fwd", &fastmeta::cpu::proto_loss_fwd);
  m.impl("proto_loss_bwd", &fastmeta::cpu::proto_loss_bwd);
  m.impl("matching_fwd", &fastmeta::cpu::matching_fwd);
  m.impl("matching_bwd", &fastmeta::cpu::matching_bwd);
  m.impl("matching_loss_fwd", &fastmeta::cpu::matching_loss_fwd);
  m.impl("matching_loss_bwd", &fastmeta::cpu::matching_loss_bwd);
}

namespace {

std::string compiler_string() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = FASTMETA_VERSION;
  d["compiler"] = compiler_string();
  d["cxx_standard"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = static_cast<long>(_OPENMP);
#else
  d["openmp"] = false;
  d["openmp_version"] = 0L;
#endif
#ifdef FASTMETA_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["torch_version"] = FASTMETA_TORCH_VERSION;
#ifdef NDEBUG
  d["debug"] = false;
#else
  d["debug"] = true;
#endif
  d["namespace"] = "fastmeta_cpp";
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "fastmeta C++ extension. Importing it registers torch.ops.fastmeta_cpp.* (CPU kernels).";
  mod.def("build_info", &build_info,
          "Dict describing how the extension was built (compiler, OpenMP, CUDA, torch version).");
  fastmeta::bind_heads(mod);
  fastmeta::bind_task_bn(mod);
}
