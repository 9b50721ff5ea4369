// mlp_grad_fwd / mlp_grad_hvp_fwd: per-task loss, gradient and exact Hessian-vector product of
// a task-batched MLP (weights [T,out,in], nn.Linear layout), by Pearlmutter's R-operator:
// forward + R-forward, loss and its R, backward + R-backward (see fastmeta/ops/_mlp_hvp.py for
// the equations). No autograd: the whole recursion is one op call.
//
// Every step is a batched GEMM over the T tasks (at::bmm / baddbmm, MKL's batched GEMM) or an
// elementwise pass over [T,N,width]; the forward keeps, per hidden layer, the activation a,
// act'(z), act''(z) (tanh/sigmoid only) and R{z} for the backward. The GEMMs dominate once
// widths reach ~64; for the tiny sinusoid MLP (1-40-40-1, N=10) the ~50 ATen calls cost
// tens of microseconds in total, well under what autograd's double backward spends building
// and walking two graphs. Hand loops per task (unit-stride dot/axpy from common.h, tasks in
// parallel) were measured 3.5x slower on that MLP (1.14 ms vs 0.32 ms, 1 thread, AVX-512):
// ~4000 short vector calls per task with no register blocking lose to MKL's batched GEMM.
//
// Schemas (declared in csrc/register.cpp, like every fastmeta_cpp schema):
//   fastmeta_cpp::mlp_grad_fwd(weights, biases, x, y, activation, loss)
//       -> (losses [T], grad_w[], grad_b[])
//   fastmeta_cpp::mlp_grad_hvp_fwd(weights, biases, x, y, v_w, v_b, activation, loss)
//       -> (losses [T], grad_w[], grad_b[], hvp_w[], hvp_b[])
// biases == [] means no biases (then the bias outputs are []); v_b == [] with biases means a
// zero bias direction. activation: 0 identity, 1 relu, 2 tanh, 3 sigmoid; loss: 0 mse (mean
// over N*out), 1 cross_entropy (int64 targets [T,N], mean over N).

#include <tuple>
#include <vector>

#include <ATen/TensorOperators.h>  // scalar - tensor, scalar * tensor

#include "common.h"
#include "ops.h"

namespace fastmeta {
namespace cpu {
namespace {

enum Act : int64_t { kIdentity = 0, kRelu = 1, kTanh = 2, kSigmoid = 3 };
enum LossKind : int64_t { kMse = 0, kCrossEntropy = 1 };

constexpr const char* kOp = "mlp_grad_hvp";

struct Inputs {
  std::vector<at::Tensor> w, b, vw, vb;  // compute dtype, contiguous, detached
  at::Tensor x, y;
  int64_t T, N, L;
  bool has_bias, hvp;
  at::ScalarType in_dtype, ct;
};

Inputs prepare(at::TensorList weights, at::TensorList biases, const at::Tensor& x,
               const at::Tensor& y, at::TensorList v_w, at::TensorList v_b, int64_t activation,
               int64_t loss, bool hvp) {
  TORCH_CHECK(activation >= kIdentity && activation <= kSigmoid, "fastmeta_cpp::", kOp,
              ": activation must be 0 (identity), 1 (relu), 2 (tanh) or 3 (sigmoid), got ",
              activation);
  TORCH_CHECK(loss == kMse || loss == kCrossEntropy, "fastmeta_cpp::", kOp,
              ": loss must be 0 (mse) or 1 (cross_entropy), got ", loss);
  check_float_input(x, kOp, "x", 3);
  Inputs in;
  in.T = x.size(0);
  in.N = x.size(1);
  in.L = static_cast<int64_t>(weights.size());
  in.hvp = hvp;
  in.has_bias = !biases.empty();
  in.in_dtype = x.scalar_type();
  in.ct = compute_dtype(in.in_dtype);
  TORCH_CHECK(in.L >= 1, "fastmeta_cpp::", kOp, ": weights must hold at least one layer");
  TORCH_CHECK(!in.has_bias || static_cast<int64_t>(biases.size()) == in.L, "fastmeta_cpp::",
              kOp, ": biases must be empty or hold one tensor per layer (", in.L, "), got ",
              biases.size());
  if (hvp) {
    TORCH_CHECK(static_cast<int64_t>(v_w.size()) == in.L, "fastmeta_cpp::", kOp,
                ": v_w must hold one tensor per layer (", in.L, "), got ", v_w.size());
    TORCH_CHECK(v_b.empty() || (in.has_bias && static_cast<int64_t>(v_b.size()) == in.L),
                "fastmeta_cpp::", kOp, ": v_b must be empty, or hold one tensor per layer when "
                "there are biases; got ", v_b.size(), " tensors, ", biases.size(), " biases");
  }
  int64_t width = x.size(2);
  for (int64_t l = 0; l < in.L; ++l) {
    const at::Tensor& w = weights[l];
    check_float_input(w, kOp, "weights[l]", 3);
    TORCH_CHECK(w.size(0) == in.T && w.size(2) == width, "fastmeta_cpp::", kOp, ": weights[",
                l, "] must have shape [", in.T, ", out, ", width, "], got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == in.in_dtype, "fastmeta_cpp::", kOp, ": weights[", l,
                "] has dtype ", w.scalar_type(), ", x has ", in.in_dtype);
    const int64_t out = w.size(1);
    in.w.push_back(as_compute(w, in.ct));
    if (in.has_bias) {
      check_float_input(biases[l], kOp, "biases[l]", 2);
      TORCH_CHECK(biases[l].size(0) == in.T && biases[l].size(1) == out, "fastmeta_cpp::", kOp,
                  ": biases[", l, "] must have shape [", in.T, ", ", out, "], got ",
                  biases[l].sizes());
      in.b.push_back(as_compute(biases[l], in.ct));
    }
    if (hvp) {
      check_float_input(v_w[l], kOp, "v_w[l]", 3);
      TORCH_CHECK(v_w[l].sizes() == w.sizes(), "fastmeta_cpp::", kOp, ": v_w[", l,
                  "] must have the shape of weights[", l, "] ", w.sizes(), ", got ",
                  v_w[l].sizes());
      in.vw.push_back(as_compute(v_w[l], in.ct));
      if (!v_b.empty()) {
        check_float_input(v_b[l], kOp, "v_b[l]", 2);
        TORCH_CHECK(v_b[l].sizes() == biases[l].sizes(), "fastmeta_cpp::", kOp, ": v_b[", l,
                    "] must have the shape of biases[", l, "] ", biases[l].sizes(), ", got ",
                    v_b[l].sizes());
        in.vb.push_back(as_compute(v_b[l], in.ct));
      }
    }
    width = out;
  }
  in.x = as_compute(x, in.ct);
  if (loss == kMse) {
    TORCH_CHECK(y.is_floating_point() && y.dim() == 3 && y.size(0) == in.T &&
                    y.size(1) == in.N && y.size(2) == width,
                "fastmeta_cpp::", kOp, ": y must be a float tensor [", in.T, ", ", in.N, ", ",
                width, "] for mse, got ", y.scalar_type(), " ", y.sizes());
    in.y = as_compute(y, in.ct);
  } else {
    check_index_tensor(y, kOp, "y", in.T, in.N);
    in.y = y.contiguous();
    check_label_range(in.y, width, kOp, "y");
  }
  return in;
}

struct Outputs {
  at::Tensor losses;
  std::vector<at::Tensor> gw, gb, hw, hb;
};

Outputs run(const Inputs& in, int64_t activation, int64_t loss) {
  const int64_t L = in.L;
  const bool hvp = in.hvp;
  // Per layer input l (0 = x): activations A, their R (undefined = 0), and for hidden layers
  // act'(z) (undefined = 1, identity) and act''(z) * R{z} (undefined = 0: relu, identity).
  std::vector<at::Tensor> A(L), RA(L), D1(L), D2RZ(L);
  A[0] = in.x;
  at::Tensor out, rout;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor wt = in.w[l].transpose(1, 2);
    at::Tensor z = in.has_bias ? at::baddbmm(in.b[l].unsqueeze(1), A[l], wt) : at::bmm(A[l], wt);
    at::Tensor rz;
    if (hvp) {
      const at::Tensor vt = in.vw[l].transpose(1, 2);
      rz = in.vb.empty() ? at::bmm(A[l], vt) : at::baddbmm(in.vb[l].unsqueeze(1), A[l], vt);
      if (RA[l].defined()) rz.baddbmm_(RA[l], wt);
    }
    if (l + 1 == L) {
      out = z;
      rout = rz;
      break;
    }
    at::Tensor a, d1, d2;
    switch (activation) {
      case kRelu:
        d1 = z.gt(0).to(in.ct);
        a = z.mul(d1);
        break;
      case kTanh:
        a = z.tanh();
        d1 = 1 - a.square();
        if (hvp) d2 = a.mul(d1).mul_(-2);
        break;
      case kSigmoid:
        a = z.sigmoid();
        d1 = a.mul(1 - a);
        if (hvp) d2 = d1.mul(1 - 2 * a);
        break;
      default:
        a = z;
    }
    A[l + 1] = a;
    D1[l + 1] = d1;
    if (hvp) {
      RA[l + 1] = d1.defined() ? rz.mul(d1) : rz;
      if (d2.defined()) D2RZ[l + 1] = d2.mul_(rz);
    }
  }

  // Loss, dloss/dout (G) and its R (RG).
  const int64_t T = in.T, N = in.N, C = out.size(2);
  at::Tensor losses, G, RG;
  if (loss == kMse) {
    const double k = 2.0 / static_cast<double>(N * C);
    at::Tensor diff = out.sub(in.y);
    losses = diff.square().sum({1, 2}).div_(static_cast<double>(N * C));
    G = diff.mul_(k);
    if (hvp) RG = rout.mul(k);
  } else {
    at::Tensor logp = at::log_softmax(out, 2);
    at::Tensor picked = logp.gather(2, in.y.unsqueeze(2));  // [T,N,1]
    losses = picked.sum({1, 2}).neg_().div_(static_cast<double>(N));
    at::Tensor p = logp.exp_();
    if (hvp) {
      RG = rout.sub(p.mul(rout).sum(2, true)).mul_(p).div_(static_cast<double>(N));
    }
    G = p.scatter_add_(2, in.y.unsqueeze(2), at::full({T, N, 1}, -1.0, p.options()))
            .div_(static_cast<double>(N));
  }

  Outputs o;
  o.gw.resize(L);
  o.hw.resize(L);
  if (in.has_bias) {
    o.gb.resize(L);
    o.hb.resize(L);
  }
  for (int64_t l = L - 1; l >= 0; --l) {
    const at::Tensor gt = G.transpose(1, 2);
    o.gw[l] = at::bmm(gt, A[l]);
    if (in.has_bias) o.gb[l] = G.sum(1);
    if (hvp) {
      o.hw[l] = at::bmm(RG.transpose(1, 2), A[l]);
      if (RA[l].defined()) o.hw[l].baddbmm_(gt, RA[l]);
      if (in.has_bias) o.hb[l] = RG.sum(1);
    }
    if (l == 0) break;
    at::Tensor dA = at::bmm(G, in.w[l]);  // [T,N,in]
    if (hvp) {
      at::Tensor rdA = at::bmm(RG, in.w[l]);
      rdA.baddbmm_(G, in.vw[l]);
      if (D1[l].defined()) rdA.mul_(D1[l]);
      if (D2RZ[l].defined()) rdA.addcmul_(D2RZ[l], dA);
      RG = rdA;
    }
    G = D1[l].defined() ? dA.mul_(D1[l]) : dA;
  }
  o.losses = losses;
  return o;
}

std::vector<at::Tensor> cast_all(std::vector<at::Tensor>& ts, at::ScalarType st) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (auto& t : ts) out.push_back(to_dtype(t, st));
  return out;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_grad_fwd(
    at::TensorList weights, at::TensorList biases, const at::Tensor& x, const at::Tensor& y,
    int64_t activation, int64_t loss) {
  Inputs in = prepare(weights, biases, x, y, {}, {}, activation, loss, /*hvp=*/false);
  Outputs o = run(in, activation, loss);
  const auto st = in.in_dtype;
  return {to_dtype(o.losses, st), cast_all(o.gw, st), cast_all(o.gb, st)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
mlp_grad_hvp_fwd(at::TensorList weights, at::TensorList biases, const at::Tensor& x,
                 const at::Tensor& y, at::TensorList v_w, at::TensorList v_b, int64_t activation,
                 int64_t loss) {
  Inputs in = prepare(weights, biases, x, y, v_w, v_b, activation, loss, /*hvp=*/true);
  Outputs o = run(in, activation, loss);
  const auto st = in.in_dtype;
  return {to_dtype(o.losses, st), cast_all(o.gw, st), cast_all(o.gb, st), cast_all(o.hw, st),
          cast_all(o.hb, st)};
}

}  // namespace cpu
}  // namespace fastmeta
