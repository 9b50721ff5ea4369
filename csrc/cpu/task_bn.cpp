// Fused double backward of training-mode batch norm for the task-batched layers
// (fastmeta/nn/task_autograd.py, BatchNormTrainBackwardFunction): the backward of the
// batch-norm backward that second-order MAML runs, in two passes over the activations.
//
// With xc = x - mean, r = invstd, rw = r * w (r without affine weight), per channel over its M
// elements: A = mean(g), B = r mean(g xc), m = mean(ggx), Bq = r mean(ggx xc), mgg = mean(ggx g)
// (pass 1: five sums, accumulated in float64), then (pass 2, one write of each output):
//   dS/dg = rw (ggx - m - Bq r xc) + ggw r xc + ggb
//   dS/dx = r rw [r xc (3 B Bq - mgg + A m) - (g - A) Bq - B (ggx - m)] + ggw r (g - A - r xc B)
//   dS/dw = r M (mgg - A m - B Bq)
// The composite formulation in Python (the same closed form with ATen ops: five reductions,
// three product temporaries and five elementwise passes) is the reference in
// tests/test_task_bn_kernel.py and the fallback when this extension is absent.
//
// Layouts: g, x and ggx share one dense layout: [N, C, *] contiguous (channel blocks of
// prod(*) elements) or 4-D channels_last (rows of C channels). Outputs take x's layout.
// Bound with pybind11 (fastmeta._C.bn_train_double_backward): it runs inside an eager autograd
// Function's backward on CPU tensors only.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace fastmeta {
namespace cpu {
namespace {

struct Layout {
  int64_t outer, C, inner;  // element (o, c, i) at (o * C + c) * inner + i
};

Layout layout_of(const at::Tensor& x) {
  const int64_t C = x.size(1);
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return {x.size(0) * x.size(2) * x.size(3), C, 1};
  }
  TORCH_CHECK(x.is_contiguous(), "fastmeta_cpp::bn_train_double_backward: x must be contiguous "
              "or 4-D channels_last, got strides ", x.strides());
  return {x.size(0), C, C == 0 ? 0 : x.numel() / (x.size(0) * C)};
}

void check_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type(),
              "fastmeta_cpp::bn_train_double_backward: ", name,
              " must be a CPU tensor of x's dtype");
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides(),
              "fastmeta_cpp::bn_train_double_backward: ", name, " must have x's shape and strides "
              "(shape ", t.sizes(), " strides ", t.strides(), " vs ", x.sizes(), " ",
              x.strides(), ")");
}

at::Tensor per_channel(const std::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == C && t->device().is_cpu(), "fastmeta_cpp::bn_train_double_backward: ",
              name, " must be a CPU tensor of C = ", C, " elements, got ", t->sizes());
  return t->to(at::kDouble).contiguous();
}

// Pass 1: per-channel sums of g, g xc and (with q = ggx) q, q xc, q g, in float64.
// Rows are summed in blocks in the input type (float: 4-wide vectors), then added in float64.
template <typename T>
void channel_sums(const T* g, const T* x, const T* q, const double* mean, const Layout& L,
                  std::vector<double>& out) {
  const int64_t C = L.C, nsum = q ? 5 : 2;
  out.assign(nsum * C, 0.0);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> part(nt * nsum * C, 0.0);
  std::vector<T> meanT(C);
  for (int64_t c = 0; c < C; ++c) meanT[c] = static_cast<T>(mean[c]);
  if (L.inner == 1) {
    // rows of C channels (channels_last or [N, C]): vectorise across channels
    constexpr int64_t kBlock = 64;
    const int64_t nblocks = (L.outer + kBlock - 1) / kBlock;
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      double* acc = part.data() + at::get_thread_num() * nsum * C;
      std::vector<T> blk(nsum * C);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(blk.begin(), blk.end(), T(0));
        T* sg = blk.data();
        T* sgx = sg + C;
        T* sq = sg + 2 * C;
        T* sqx = sg + 3 * C;
        T* sqg = sg + 4 * C;
        const T* mT = meanT.data();
        const int64_t r1 = std::min(L.outer, (b + 1) * kBlock);
        for (int64_t o = b * kBlock; o < r1; ++o) {
          const T* gr = g + o * C;
          const T* xr = x + o * C;
          if (q) {
            const T* qr = q + o * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const T xc = xr[c] - mT[c];
              sg[c] += gr[c];
              sgx[c] += gr[c] * xc;
              sq[c] += qr[c];
              sqx[c] += qr[c] * xc;
              sqg[c] += qr[c] * gr[c];
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const T xc = xr[c] - mT[c];
              sg[c] += gr[c];
              sgx[c] += gr[c] * xc;
            }
          }
        }
        for (int64_t j = 0; j < nsum * C; ++j) acc[j] += static_cast<double>(blk[j]);
      }
    });
  } else {
    // contiguous [N, C, inner]: one channel block at a time
    const int64_t inner = L.inner;
    at::parallel_for(0, L.outer * C, 1, [&](int64_t j0, int64_t j1) {
      double* acc = part.data() + at::get_thread_num() * nsum * C;
      constexpr int64_t kBlock = 256;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t c = j % C;
        const T mc = meanT[c];
        const T* gr = g + j * inner;
        const T* xr = x + j * inner;
        const T* qr = q ? q + j * inner : nullptr;
        for (int64_t i0 = 0; i0 < inner; i0 += kBlock) {
          const int64_t i1 = std::min(inner, i0 + kBlock);
          T a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0;
          if (qr) {
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
            for (int64_t i = i0; i < i1; ++i) {
              const T xc = xr[i] - mc;
              a0 += gr[i];
              a1 += gr[i] * xc;
              a2 += qr[i];
              a3 += qr[i] * xc;
              a4 += qr[i] * gr[i];
            }
          } else {
#pragma omp simd reduction(+ : a0, a1)
            for (int64_t i = i0; i < i1; ++i) {
              const T xc = xr[i] - mc;
              a0 += gr[i];
              a1 += gr[i] * xc;
            }
          }
          acc[c] += a0;
          acc[C + c] += a1;
          if (qr) {
            acc[2 * C + c] += a2;
            acc[3 * C + c] += a3;
            acc[4 * C + c] += a4;
          }
        }
      }
    });
  }
  for (int64_t t = 0; t < nt; ++t) {
    const double* p = part.data() + t * nsum * C;
    for (int64_t j = 0; j < nsum * C; ++j) out[j] += p[j];
  }
}

// Pass 2: out_g = a0 + a1 xc + a3 q;  out_x = b0 + b1 xc + b2 g + b3 q (coefficients per channel,
// rows: [a0 a1 a3 b0 b1 b2 b3] x C).
template <typename T>
void write_outputs(const T* g, const T* x, const T* q, const double* mean, const double* coef,
                   const Layout& L, T* og, T* ox) {
  const int64_t C = L.C;
  std::vector<T> k(8 * C);
  for (int64_t c = 0; c < C; ++c) {
    k[c] = static_cast<T>(mean[c]);
    for (int64_t j = 0; j < 7; ++j) k[(j + 1) * C + c] = static_cast<T>(coef[j * C + c]);
  }
  const T* mT = k.data();
  const T *a0 = mT + C, *a1 = mT + 2 * C, *a3 = mT + 3 * C;
  const T *b0 = mT + 4 * C, *b1 = mT + 5 * C, *b2 = mT + 6 * C, *b3 = mT + 7 * C;
  if (L.inner == 1) {
    at::parallel_for(0, L.outer, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t base = o * C;
        const T* gr = g + base;
        const T* xr = x + base;
        const T* qr = q ? q + base : nullptr;
        if (og) {
          T* out = og + base;
          if (qr) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              out[c] = a0[c] + a1[c] * (xr[c] - mT[c]) + a3[c] * qr[c];
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) out[c] = a0[c] + a1[c] * (xr[c] - mT[c]);
          }
        }
        if (ox) {
          T* out = ox + base;
          if (qr) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              out[c] = b0[c] + b1[c] * (xr[c] - mT[c]) + b2[c] * gr[c] + b3[c] * qr[c];
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              out[c] = b0[c] + b1[c] * (xr[c] - mT[c]) + b2[c] * gr[c];
            }
          }
        }
      }
    });
  } else {
    const int64_t inner = L.inner;
    at::parallel_for(0, L.outer * C, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t c = j % C, base = j * inner;
        const T mc = mT[c];
        const T* gr = g + base;
        const T* xr = x + base;
        const T* qr = q ? q + base : nullptr;
        if (og) {
          T* out = og + base;
          const T c0 = a0[c], c1 = a1[c], c3 = a3[c];
          if (qr) {
#pragma omp simd
            for (int64_t i = 0; i < inner; ++i) out[i] = c0 + c1 * (xr[i] - mc) + c3 * qr[i];
          } else {
#pragma omp simd
            for (int64_t i = 0; i < inner; ++i) out[i] = c0 + c1 * (xr[i] - mc);
          }
        }
        if (ox) {
          T* out = ox + base;
          const T c0 = b0[c], c1 = b1[c], c2 = b2[c], c3 = b3[c];
          if (qr) {
#pragma omp simd
            for (int64_t i = 0; i < inner; ++i) {
              out[i] = c0 + c1 * (xr[i] - mc) + c2 * gr[i] + c3 * qr[i];
            }
          } else {
#pragma omp simd
            for (int64_t i = 0; i < inner; ++i) out[i] = c0 + c1 * (xr[i] - mc) + c2 * gr[i];
          }
        }
      }
    });
  }
}

// -> (dS/dg or None, dS/dx or None, dS/dw or None); see the file comment.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_double_backward(
    const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& ggx_opt,
    const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& w_opt,
    const std::optional<at::Tensor>& ggw_opt, const std::optional<at::Tensor>& ggb_opt,
    bool need_g, bool need_x, bool need_w) {
  TORCH_CHECK(x.device().is_cpu() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "fastmeta_cpp::bn_train_double_backward: x must be a float32/float64 CPU tensor");
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, "fastmeta_cpp::bn_train_double_backward: x must be "
              "[N, C, *] with at most 3 trailing dims, got ", x.sizes());
  check_same(g, x, "g");
  const bool has_q = ggx_opt.has_value() && ggx_opt->defined();
  if (has_q) check_same(*ggx_opt, x, "ggx");
  const Layout L = layout_of(x);
  const int64_t C = L.C;
  const at::Tensor mean_d = per_channel(mean, C, "mean");
  const at::Tensor r_d = per_channel(invstd, C, "invstd");
  const at::Tensor w_d = per_channel(w_opt, C, "weight");
  const bool affine = w_d.defined();
  const at::Tensor ggw_d = affine ? per_channel(ggw_opt, C, "ggw") : at::Tensor();
  const at::Tensor ggb_d = affine ? per_channel(ggb_opt, C, "ggb") : at::Tensor();
  const int64_t M = C == 0 ? 0 : x.numel() / C;

  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_train_double_backward_sums", [&] {
    channel_sums<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                           has_q ? ggx_opt->const_data_ptr<scalar_t>() : nullptr,
                           mean_d.const_data_ptr<double>(), L, sums);
  });
  std::vector<double> coef(7 * C, 0.0);
  at::Tensor gW;
  double* gWp = nullptr;
  if (need_w && affine && has_q) {
    gW = at::empty({C}, x.options().dtype(at::kDouble));
    gWp = gW.mutable_data_ptr<double>();
  }
  const double* rp = r_d.const_data_ptr<double>();
  const double* wp = affine ? w_d.const_data_ptr<double>() : nullptr;
  const double* ggwp = ggw_d.defined() ? ggw_d.const_data_ptr<double>() : nullptr;
  const double* ggbp = ggb_d.defined() ? ggb_d.const_data_ptr<double>() : nullptr;
  const double invM = M > 0 ? 1.0 / static_cast<double>(M) : 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double r = rp[c], rw = wp ? r * wp[c] : r;
    const double A = sums[c] * invM, B = r * sums[C + c] * invM;
    double m = 0, Bq = 0, mgg = 0;
    if (has_q) {
      m = sums[2 * C + c] * invM;
      Bq = r * sums[3 * C + c] * invM;
      mgg = sums[4 * C + c] * invM;
    }
    const double cc = r * rw;
    double a0 = 0, a1 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    if (has_q) {
      a3 = rw;
      a1 = -rw * Bq * r;
      a0 = -rw * m;
      b1 = cc * (3 * B * Bq - mgg + A * m) * r;
      b0 = cc * (A * Bq + B * m);
      b2 = -cc * Bq;
      b3 = -cc * B;
      if (gWp) gWp[c] = r * static_cast<double>(M) * (mgg - A * m - B * Bq);
    }
    if (ggwp) {
      const double gr = ggwp[c] * r;
      a1 += gr;
      b2 += gr;
      b1 -= gr * B * r;
      b0 -= gr * A;
    }
    if (ggbp) a0 += ggbp[c];
    coef[c] = a0;
    coef[C + c] = a1;
    coef[2 * C + c] = a3;
    coef[3 * C + c] = b0;
    coef[4 * C + c] = b1;
    coef[5 * C + c] = b2;
    coef[6 * C + c] = b3;
  }
  at::Tensor og, ox;
  if (need_g) og = at::empty_like(x);
  if (need_x) ox = at::empty_like(x);
  if (need_g || need_x) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_train_double_backward_out", [&] {
      write_outputs<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              has_q ? ggx_opt->const_data_ptr<scalar_t>() : nullptr,
                              mean_d.const_data_ptr<double>(), coef.data(), L,
                              need_g ? og.mutable_data_ptr<scalar_t>() : nullptr,
                              need_x ? ox.mutable_data_ptr<scalar_t>() : nullptr);
    });
  }
  if (gW.defined()) gW = gW.to(w_opt->scalar_type()).view(w_opt->sizes());
  return {og, ox, gW};
}

}  // namespace
}  // namespace cpu

void bind_task_bn(pybind11::module_& m) {
  m.def("bn_train_double_backward", &cpu::bn_train_double_backward,
        "Double backward of training-mode batch norm (csrc/cpu/task_bn.cpp): g, x, ggx|None, "
        "mean, invstd, weight|None, ggw|None, ggb|None, need_g, need_x, need_w -> "
        "(dS/dg|None, dS/dx|None, dS/dw|None). CPU float32/float64, contiguous or channels_last.");
}

}  // namespace fastmeta
