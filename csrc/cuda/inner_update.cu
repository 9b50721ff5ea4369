// inner_update CUDA kernel: a multi-tensor apply (the scheme of PyTorch's foreach kernels and
// apex's multi_tensor_apply). The host packs a table of tensor descriptors (pointers, sizes,
// broadcast plans) and a block -> (tensor, chunk) map into one kernel-argument struct
// (__grid_constant__, < 4 KB); each block updates one chunk of 64K elements of one tensor, so a
// whole MAML parameter list (Conv4: 18 tensors, 3.6M elements for T = 32) is one launch.
// Contiguous operands and scalar learning rates take 16-byte vector loads/stores when every
// pointer involved is aligned; a per-element rate shared by the tasks ([*shape]), a per-task rate
// or an expanded parameter use the generic index path x[(i / div) % mod].
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/inner_update.h"

namespace fastmeta {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;

// operand modes
constexpr int8_t kAbsent = 0, kScalar = 1, kFull = 2, kSpan = 3;

struct KTensor {
  void* out;
  const void* p;
  const void* g;
  const void* l;
  int64_t pdiv, pmod, ldiv, lmod;
  int64_t numel;
  int8_t pmode, lmode, vec;
};

struct KArgs {
  KTensor t[kMaxTensors];
  unsigned char tensor_of[kMaxBlocks];
  int chunk_of[kMaxBlocks];
};
static_assert(sizeof(KArgs) <= 4000, "kernel argument table must stay under 4 KB");

__device__ __forceinline__ float to_c(float x) { return x; }
__device__ __forceinline__ double to_c(double x) { return x; }
__device__ __forceinline__ float to_c(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_c(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_c(float x);
template <>
__device__ __forceinline__ float from_c<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_c<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_c<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T>
__device__ __forceinline__ T from_c(double x);
template <>
__device__ __forceinline__ double from_c<double>(double x) { return x; }

template <typename T, typename C>
__device__ __forceinline__ C read(const T* x, int8_t mode, int64_t div, int64_t mod, int64_t i,
                                  C absent) {
  switch (mode) {
    case kAbsent: return absent;
    case kScalar: return to_c(x[0]);
    case kFull: return to_c(x[i]);
    default: return to_c(x[(i / div) % mod]);
  }
}

template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads)
    inner_update_kernel(const __grid_constant__ KArgs args, C alpha) {
  const KTensor& t = args.t[args.tensor_of[blockIdx.x]];
  const int64_t start = int64_t(args.chunk_of[blockIdx.x]) * kChunk;
  const int64_t end = start + kChunk < t.numel ? start + kChunk : t.numel;
  T* __restrict__ out = static_cast<T*>(t.out);
  const T* __restrict__ g = static_cast<const T*>(t.g);
  const T* __restrict__ p = static_cast<const T*>(t.p);
  const T* __restrict__ l = static_cast<const T*>(t.l);

  int64_t i0 = start;
  if (t.vec) {
    using V = Vec<T>;
    constexpr int N = V::N;
    const C ps = t.pmode == kScalar ? to_c(p[0]) : C(0);
    const C ls = t.lmode == kScalar ? to_c(l[0]) : C(1);
    const bool pf = t.pmode == kFull, lf = t.lmode == kFull;
    const int64_t nv = (end - start) / N;
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < nv; k += kThreads) {
      const int64_t i = start + k * N;
      const V gv = *reinterpret_cast<const V*>(g + i);
      V pv, lv, ov;
      if (pf) pv = *reinterpret_cast<const V*>(p + i);
      if (lf) lv = *reinterpret_cast<const V*>(l + i);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C pj = pf ? to_c(pv.v[j]) : ps;
        const C lj = lf ? to_c(lv.v[j]) : ls;
        ov.v[j] = from_c<T>(pj - alpha * lj * to_c(gv.v[j]));
      }
      *reinterpret_cast<V*>(out + i) = ov;
    }
    i0 = start + nv * N;
  }
  for (int64_t i = i0 + threadIdx.x; i < end; i += kThreads) {
    const C pv = read<T, C>(p, t.pmode, t.pdiv, t.pmod, i, C(0));
    const C lv = read<T, C>(l, t.lmode, t.ldiv, t.lmod, i, C(1));
    out[i] = from_c<T>(pv - alpha * lv * to_c(g[i]));
  }
}

int8_t mode_of(const IUOperand& op, int64_t numel) {
  if (op.ptr == nullptr) return kAbsent;
  if (op.mod == 1) return kScalar;
  if (op.div == 1 && op.mod == numel) return kFull;
  return kSpan;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T, typename C>
const char* launch_all(const IUTensor* tensors, int n, double alpha, cudaStream_t stream) {
  KArgs args;
  int nt = 0, nb = 0;
  const C a = static_cast<C>(alpha);
  auto launch = [&]() -> const char* {
    inner_update_kernel<T, C><<<nb, kThreads, 0, stream>>>(args, a);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  };
  for (int idx = 0; idx < n; ++idx) {
    const IUTensor& src = tensors[idx];
    if (src.numel == 0) continue;
    KTensor kt;
    kt.out = src.out;
    kt.p = src.p.ptr;
    kt.g = src.g.ptr;
    kt.l = src.l.ptr;
    kt.pdiv = src.p.div;
    kt.pmod = src.p.mod;
    kt.ldiv = src.l.div;
    kt.lmod = src.l.mod;
    kt.numel = src.numel;
    kt.pmode = mode_of(src.p, src.numel);
    kt.lmode = mode_of(src.l, src.numel);
    kt.vec = aligned16(kt.out) && aligned16(kt.g) && kt.pmode != kSpan && kt.lmode != kSpan &&
             (kt.pmode != kFull || aligned16(kt.p)) && (kt.lmode != kFull || aligned16(kt.l));
    args.t[nt] = kt;
    const int64_t chunks = (src.numel + kChunk - 1) / kChunk;
    bool launched_at_end = false;
    for (int64_t c = 0; c < chunks; ++c) {
      args.tensor_of[nb] = static_cast<unsigned char>(nt);
      args.chunk_of[nb] = static_cast<int>(c);
      ++nb;
      const bool last = c + 1 == chunks;
      if (nb == kMaxBlocks || (last && nt + 1 == kMaxTensors)) {
        if (const char* err = launch()) return err;
        nb = 0;
        if (last) {
          launched_at_end = true;
        } else {  // the rest of this tensor continues in slot 0 of the next launch
          args.t[0] = kt;
          nt = 0;
        }
      }
    }
    nt = launched_at_end ? 0 : nt + 1;
  }
  if (nb > 0) return launch();
  return nullptr;
}

}  // namespace

const char* inner_update_launch(const IUTensor* tensors, int n, int dtype, double alpha,
                                void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kIUFloat32: return launch_all<float, float>(tensors, n, alpha, s);
    case kIUFloat64: return launch_all<double, double>(tensors, n, alpha, s);
    case kIUFloat16: return launch_all<__half, float>(tensors, n, alpha, s);
    case kIUBFloat16: return launch_all<__nv_bfloat16, float>(tensors, n, alpha, s);
    default: return "fastmeta inner_update: unsupported dtype code";
  }
}

}  // namespace cuda
}  // namespace fastmeta
