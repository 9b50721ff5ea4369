// inner_update CUDA kernel interface: plain C++ (no torch headers), shared by
// inner_update.cu (the kernel) and inner_update_launch.cpp (ATen glue, op registration).
#pragma once

#include <cstdint>

namespace fastmeta {
namespace cuda {

// An input read as ptr[(i / div) % mod] at flat output index i (see cpu/inner_update.h).
// ptr == nullptr: absent (a parameter reads 0, a learning rate reads 1).
struct IUOperand {
  const void* ptr;
  int64_t div;
  int64_t mod;
};

// out[i] = p[i] - alpha * l[i] * g[i] for i < numel; out and g contiguous.
struct IUTensor {
  void* out;
  IUOperand p, g, l;
  int64_t numel;
};

enum IUDtype : int { kIUFloat32 = 0, kIUFloat64 = 1, kIUFloat16 = 2, kIUBFloat16 = 3 };

// Updates all n tensors with as few launches as the kernel-argument table allows (one for up
// to 24 tensors and 320 chunks of 64K elements) on `stream` (a cudaStream_t). Returns nullptr,
// or the CUDA error string of a failed launch.
const char* inner_update_launch(const IUTensor* tensors, int n, int dtype, double alpha,
                                void* stream);

}  // namespace cuda
}  // namespace fastmeta
