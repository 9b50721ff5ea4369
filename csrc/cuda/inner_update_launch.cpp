// inner_update on CUDA tensors: ATen glue around the multi-tensor kernel of inner_update.cu
// (plan and checks shared with the CPU kernel, cpu/inner_update.h), registered as the CUDA
// kernel of torch.ops.fastmeta_cpp.inner_update. Compiled only in CUDA builds (CMakeLists.txt
// adds csrc/cuda/*.cpp together with the .cu files).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cpu/inner_update.h"
#include "cuda/inner_update.h"

namespace fastmeta {
namespace cuda {
namespace {

IUOperand operand(const inner_update_plan::Operand& op) { return {op.ptr, op.div, op.mod}; }

std::vector<at::Tensor> inner_update_cuda(at::TensorList params, at::TensorList grads,
                                          at::TensorList lrs, double alpha) {
  constexpr const char* op = "inner_update";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the Python wrapper owns autograd
  inner_update_plan::check_inputs(params, grads, lrs, alpha, op);
  TORCH_CHECK(grads[0].is_cuda(), "fastmeta_cpp::", op, ": CUDA kernel got tensors on ",
              grads[0].device());
  int dtype = 0;
  switch (grads[0].scalar_type()) {
    case at::kFloat: dtype = kIUFloat32; break;
    case at::kDouble: dtype = kIUFloat64; break;
    case at::kHalf: dtype = kIUFloat16; break;
    case at::kBFloat16: dtype = kIUBFloat16; break;
    default:
      TORCH_CHECK(false, "fastmeta_cpp::", op, ": unsupported dtype ", grads[0].scalar_type());
  }
  const c10::cuda::CUDAGuard device_guard(grads[0].device());
  inner_update_plan::Plan plan = inner_update_plan::make_plan(params, grads, lrs);
  const size_t n = grads.size();
  std::vector<IUTensor> table(n);
  for (size_t i = 0; i < n; ++i) {
    table[i].out = plan.outs[i].data_ptr();
    table[i].p = operand(plan.p[i]);
    table[i].g = operand(plan.g[i]);
    table[i].l = operand(plan.l[i]);
    table[i].numel = plan.numel[i];
  }
  // Copies made by the plan (plan.*.keep) are freed on return while the kernel may still run:
  // safe, the caching allocator reuses them only for later work on this stream.
  const char* err = inner_update_launch(table.data(), static_cast<int>(n), dtype, alpha,
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "fastmeta_cpp::", op, ": CUDA launch failed: ", err);
  return plan.outs;
}

}  // namespace
}  // namespace cuda
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_cpp, CUDA, m) {
  m.impl("inner_update", &fastmeta::cuda::inner_update_cuda);
}
