// proto_logits_{fwd,bwd} and the fused proto_loss_{fwd,bwd} CPU kernels.
//
// Two code paths, chosen by the number of classes N:
//  * small N (N <= kSmallNMax): hand-written loops, one query row at a time against all N
//    prototypes (which stay in cache). Squared distances are computed directly as
//    sum_d (q_d - p_d)^2 (exact, no cancellation). The backward writes grad_query row by row and
//    accumulates grad_protos += G^T @ Q per block of rows (per work item, reduced at the end).
//    No BLAS call per tile; q is streamed once per pass.
//  * large N: the cross term q.p is a GEMM (ATen BLAS); ||q-p||^2 = |q|^2 - 2 q.p + |p|^2 clamped
//    at 0 (what torch.cdist does), with the few entries that lost their digits to cancellation
//    recomputed directly. The forward tiles query rows so the [rows, N] workspace stays around
//    kTileBytes per thread (one single-threaded GEMM per tile, tiles in parallel); the backward
//    materialises the coefficient matrix G [B,Q,N] once and does grad_q = G@P - r*q and
//    grad_p = G^T@Q - c*p with in-place (multi-threaded) baddbmm.
// Softmax terms below the smallest normal number are flushed to 0 (see exp_neg).
#include "ops.h"

#include <vector>

#include "common.h"

namespace fastmeta {
namespace cpu {
namespace {

// N <= this: hand-loop path. Measured (AVX-512, D = 64..1600): hand loops win clearly up to
// N ~ 8 (no BLAS call per tile, exact distances), the GEMM path from N ~ 12 on.
constexpr int64_t kSmallNMax = 8;
constexpr int64_t kTileBytes = 1 << 20;  // per-thread [rows, N] logits workspace (forward)

template <typename T>
struct Ctx {
  int64_t B, Q, N, D;
  int64_t metric;
  T scale, eps;
  const T* q;   // [B,Q,D] contiguous
  const T* p;   // [B,N,D] contiguous
  const T* pn;  // [B,N] sqeuclidean: |p|^2, cosine: |p|
  const T* pc;  // [B,N] cosine: max(|p|, eps) (unused for sqeuclidean)
};

// Work split over (episode, chunk of query rows).
struct Plan {
  int64_t chunks;  // chunks per episode
  int64_t rows;    // rows per chunk (last one may be shorter)
};

inline Plan plan_rows(int64_t B, int64_t Q, int64_t row_cap) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = 2 * nt;  // enough items for load balance
  int64_t chunks = std::max<int64_t>(1, ceil_div(Q, std::max<int64_t>(1, row_cap)));
  if (B < want) chunks = std::max(chunks, ceil_div(want, std::max<int64_t>(1, B)));
  chunks = std::max<int64_t>(1, std::min(chunks, Q));
  const int64_t rows = std::max<int64_t>(1, ceil_div(Q, chunks));
  chunks = std::max<int64_t>(1, ceil_div(Q, rows));
  return {chunks, rows};
}

// pn[b,n] = |p|^2 (sqeuclidean) or |p| (cosine); pc[b,n] = max(|p|, eps) (cosine).
template <typename T>
void proto_norms(const T* p, int64_t BN, int64_t D, int64_t metric, T eps, T* pn, T* pc) {
  // Serial below ~1M elements (~0.1 ms): a parallel region costs more than it saves there, and
  // much more when other processes compete for the cores.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, D));
  at::parallel_for(0, BN, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = p + i * D;
      const T s = dot(row, row, D);
      if (metric == kSqEuclidean) {
        pn[i] = s;
      } else {
        const T nrm = std::sqrt(s);
        pn[i] = nrm;
        pc[i] = std::max(nrm, eps);
      }
    }
  });
}

// Query-side norm of a row: |q|^2 for sqeuclidean, |q| for cosine.
template <typename T>
inline T query_norm(const T* q, int64_t D, int64_t metric) {
  const T s = dot(q, q, D);
  return metric == kSqEuclidean ? s : std::sqrt(s);
}

// Below this fraction of |q|^2 + |p|^2, a squared distance from the expansion
// |q|^2 - 2 q.p + |p|^2 has lost most of its digits to cancellation (query very close to a
// prototype relative to their norms); such entries are recomputed directly as sum (q-p)^2.
// Rare for ordinary embeddings, so the check is nearly free.
template <typename T>
constexpr T cancellation_ratio() {
  return sizeof(T) >= 8 ? T(1) / T(16384) : T(1) / T(64);
}

// In place: raw values -> logits for one query row qr of episode b. `direct`: v holds exact
// squared distances (sqeuclidean, small-N path); otherwise v holds dot products q.p.
// qn = query_norm(q). For cosine, also writes cos (logit/scale) to `cosv` when non-null.
template <typename T>
inline void raw_to_logits(T* __restrict v, const Ctx<T>& c, int64_t b, bool direct, T qn,
                          T* __restrict cosv, const T* __restrict qr) {
  const int64_t N = c.N;
  if (c.metric == kSqEuclidean) {
    const T ms = -c.scale;
    if (!direct) {
      const T* __restrict pn = c.pn + b * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) v[n] = qn - T(2) * v[n] + pn[n];
      const T tau = cancellation_ratio<T>();
      const T* P = c.p + b * N * c.D;
      for (int64_t n = 0; n < N; ++n) {
        if (!(v[n] > tau * (qn + pn[n]))) v[n] = sqdist<T>(qr, P + n * c.D, c.D);
      }
    }
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) v[n] = ms * std::max(v[n], T(0));
  } else {
    const T* __restrict pc = c.pc + b * N;
    const T a = std::max(qn, c.eps);
    if (cosv != nullptr) {
      for (int64_t n = 0; n < N; ++n) {
        const T cs = v[n] / (a * pc[n]);
        cosv[n] = cs;
        v[n] = c.scale * cs;
      }
    } else {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) v[n] = c.scale * (v[n] / (a * pc[n]));
    }
  }
}

// Row maximum (first one; NaN counts as the maximum, as torch.argmax).
template <typename T>
inline T row_max(const T* __restrict l, int64_t N, int64_t* arg) {
  T m = l[0];
  int64_t am = 0;
  for (int64_t n = 1; n < N; ++n) {
    const T x = l[n];
    if (x > m || (std::isnan(x) && !std::isnan(m))) {
      m = x;
      am = n;
    }
  }
  if (arg != nullptr) *arg = am;
  return m;
}

// exp(x) for x <= 0, flushed to 0 where the result would be subnormal: subnormal operands make
// the following additions and the BLAS GEMMs of the backward many times slower (a saturated
// softmax of large distances is almost entirely such values), and they are far below any
// tolerance (< 1.2e-38 in float32).
template <typename T>
inline T exp_neg(T x) {
  constexpr T kMin = sizeof(T) >= 8 ? T(-708) : T(-87);
  return x < kMin ? T(0) : std::exp(x);
}

// logsumexp (max-subtracted), NLL and argmax of one row of logits. The NLL is computed as
// (max - l[y]) + log(sum exp(l - max)), which keeps its accuracy when |logits| is large.
template <typename T>
inline void lse_row(const T* __restrict l, int64_t N, int64_t y, T* loss, T* lse, int64_t* pred) {
  const T m = row_max(l, N, pred);
  const bool finite = std::isfinite(m);
  const T shift = finite ? m : T(0);
  T s = 0;
  for (int64_t n = 0; n < N; ++n) s += exp_neg(l[n] - shift);
  const T ls = std::log(s);
  *lse = shift + ls;
  *loss = finite ? (shift - l[y]) + ls : (shift + ls) - l[y];
}

// In place: logits -> dL = g * (softmax - onehot(y)). The softmax is recomputed from the row
// itself (max-subtracted) rather than from the saved lse: same number of exps, and it avoids
// the absolute rounding error of a float32 lse of large magnitude.
template <typename T>
inline void logits_to_dl(T* __restrict l, int64_t N, int64_t y, T g) {
  const T m = row_max(l, N, static_cast<int64_t*>(nullptr));
  const T shift = std::isfinite(m) ? m : T(0);
  T s = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T e = exp_neg(l[n] - shift);
    l[n] = e;
    s += e;
  }
  const T k = g / s;
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) l[n] *= k;
  l[y] -= g;
}

// Subnormal -> 0 (see exp_neg): G feeds two GEMMs.
template <typename T>
inline T flush_tiny(T x) {
  return std::abs(x) < std::numeric_limits<T>::min() ? T(0) : x;
}

// In place: dL -> G; returns the row coefficient r (grad_q = G@P - r*q) and accumulates the
// column statistics into colacc (sqeuclidean: sum_q G, cosine: sum_q dL*cos).
template <typename T>
inline T dl_to_g(T* __restrict g, const T* __restrict cosv, const Ctx<T>& c, int64_t b, T qn,
                 T* __restrict colacc) {
  const int64_t N = c.N;
  if (c.metric == kSqEuclidean) {
    const T k = T(2) * c.scale;
    T rs = 0;
#pragma omp simd reduction(+ : rs)
    for (int64_t n = 0; n < N; ++n) {
      const T G = flush_tiny(k * g[n]);
      g[n] = G;
      rs += G;
      colacc[n] += G;
    }
    return rs;
  }
  const T* __restrict pc = c.pc + b * N;
  const T a = std::max(qn, c.eps);
  T rs = 0;
#pragma omp simd reduction(+ : rs)
  for (int64_t n = 0; n < N; ++n) {
    const T dl = g[n];
    const T t = dl * cosv[n];
    rs += t;
    colacc[n] += t;
    g[n] = flush_tiny(c.scale * dl / (a * pc[n]));
  }
  return qn > c.eps ? c.scale / (a * a) * rs : T(0);
}

// Column coefficient from the accumulated statistics.
template <typename T>
inline T col_coef(const Ctx<T>& c, int64_t bn, T acc) {
  if (c.metric == kSqEuclidean) return acc;
  const T cn = c.pc[bn];
  return c.pn[bn] > c.eps ? c.scale / (cn * cn) * acc : T(0);
}

// --------------------------------------------------------------------------------------------
// forward: logits
// --------------------------------------------------------------------------------------------
template <typename T>
void logits_fwd_impl(const Ctx<T>& c, const at::Tensor& qc, const at::Tensor& pc_t,
                     at::Tensor& out) {
  const int64_t N = c.N, D = c.D, Q = c.Q;
  T* o = out.mutable_data_ptr<T>();
  const bool small = N <= kSmallNMax;
  if (!small) at::bmm_out(out, qc, pc_t.transpose(1, 2));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * D));
  at::parallel_for(0, c.B * Q, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Q;
      const T* qr = c.q + r * D;
      const T* P = c.p + b * N * D;
      T* v = o + r * N;
      if (small && c.metric == kSqEuclidean) {
        row_cross<T, true>(qr, P, N, D, v);
        raw_to_logits<T>(v, c, b, /*direct=*/true, T(0), nullptr, qr);
      } else {
        if (small) row_cross<T, false>(qr, P, N, D, v);
        raw_to_logits<T>(v, c, b, /*direct=*/false, query_norm(qr, D, c.metric), nullptr, qr);
      }
    }
  });
}

// --------------------------------------------------------------------------------------------
// forward: fused loss
// --------------------------------------------------------------------------------------------
template <typename T>
void loss_fwd_impl(const Ctx<T>& c, const at::Tensor& qc, const at::Tensor& pc_t,
                   const int64_t* y, T* loss, T* lse, int64_t* pred) {
  const int64_t B = c.B, Q = c.Q, N = c.N, D = c.D;
  if (N <= kSmallNMax) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * D));
    at::parallel_for(0, B * Q, grain, [&](int64_t begin, int64_t end) {
      T v[kSmallNMax];
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / Q;
        const T* qr = c.q + r * D;
        const T* P = c.p + b * N * D;
        if (c.metric == kSqEuclidean) {
          row_cross<T, true>(qr, P, N, D, v);
          raw_to_logits<T>(v, c, b, true, T(0), nullptr, qr);
        } else {
          row_cross<T, false>(qr, P, N, D, v);
          raw_to_logits<T>(v, c, b, false, query_norm(qr, D, c.metric), nullptr, qr);
        }
        lse_row<T>(v, N, y[r], loss + r, lse + r, pred + r);
      }
    });
    return;
  }
  // Large N: tiles of query rows, one single-threaded GEMM per tile into a per-thread workspace.
  const Plan pl = plan_rows(B, Q, kTileBytes / static_cast<int64_t>(N * sizeof(T)));
  at::parallel_for(0, B * pl.chunks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: not inherited by workers
    const MklOneThread mkl_one;  // its GEMMs on this thread (common.h)
    at::Tensor ws = at::empty({pl.rows, N}, qc.options());
    T* w = ws.mutable_data_ptr<T>();
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / pl.chunks;
      const int64_t q0 = (it % pl.chunks) * pl.rows;
      const int64_t rows = std::min(Q, q0 + pl.rows) - q0;
      if (rows <= 0) continue;
      at::Tensor wt = ws.narrow(0, 0, rows);
      at::mm_out(wt, qc.select(0, b).narrow(0, q0, rows), pc_t.select(0, b).t());
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = b * Q + q0 + i;
        T* v = w + i * N;
        const T* qr = c.q + r * D;
        raw_to_logits<T>(v, c, b, false, query_norm(qr, D, c.metric), nullptr, qr);
        lse_row<T>(v, N, y[r], loss + r, lse + r, pred + r);
      }
    }
  });
}

// --------------------------------------------------------------------------------------------
// backward (shared by proto_logits_bwd and proto_loss_bwd)
//   kLoss:  gsrc = grad_loss [B,Q], labels y [B,Q]. The saved lse is not needed: the softmax
//           is recomputed from the recomputed row (see logits_to_dl).
//   !kLoss: gsrc = grad_logits [B,Q,N]
// --------------------------------------------------------------------------------------------
template <typename T, bool kLoss>
void bwd_impl(const Ctx<T>& c, const at::Tensor& qc, const at::Tensor& pc_t, const T* gsrc,
              const int64_t* y, at::Tensor& gq_t, at::Tensor& gp_t) {
  const int64_t B = c.B, Q = c.Q, N = c.N, D = c.D;
  const bool cosine = c.metric == kCosine;
  const bool need_cross = kLoss || cosine;
  const bool small = N <= kSmallNMax;
  T* gq = gq_t.mutable_data_ptr<T>();
  T* gp = gp_t.mutable_data_ptr<T>();

  const Plan pl = small ? plan_rows(B, Q, Q)
                        : plan_rows(B, Q, kTileBytes / static_cast<int64_t>(N * sizeof(T)));
  const int64_t items = B * pl.chunks;
  at::Tensor colacc_t = at::zeros({items, N}, qc.options());
  T* colacc = colacc_t.mutable_data_ptr<T>();

  if (small) {
    // grad_protos partial sums per work item; with one item per episode the item writes the
    // output directly and finishes it (no second pass).
    const bool direct_gp = pl.chunks == 1;
    at::Tensor part_t = direct_gp ? gp_t : at::empty({items, N, D}, qc.options());
    T* part = part_t.mutable_data_ptr<T>();
    // Rows are processed in blocks: the G rows of a block are kept and their grad_protos
    // contribution G^T @ Q_block is accumulated in one blocked sweep (accum_gtx).
    constexpr int64_t kRowBlock = 64;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      T Gb[kRowBlock * kSmallNMax];
      T cs[kSmallNMax];
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / pl.chunks;
        const int64_t q0 = (it % pl.chunks) * pl.rows;
        const int64_t q1 = std::min(Q, q0 + pl.rows);
        const T* P = c.p + b * N * D;
        T* ca = colacc + it * N;
        T* gpi = part + it * N * D;
        std::fill(gpi, gpi + N * D, T(0));
        for (int64_t r0 = q0; r0 < q1; r0 += kRowBlock) {
          const int64_t nr = std::min(kRowBlock, q1 - r0);
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t r = b * Q + r0 + i;
            const T* qr = c.q + r * D;
            T* v = Gb + i * N;
            T qn = 0;
            if (need_cross) {
              if (cosine) {
                row_cross<T, false>(qr, P, N, D, v);
                qn = query_norm(qr, D, c.metric);
                raw_to_logits<T>(v, c, b, false, qn, cs, qr);
              } else {
                row_cross<T, true>(qr, P, N, D, v);
                raw_to_logits<T>(v, c, b, true, T(0), nullptr, qr);
              }
            }
            if constexpr (kLoss) {
              logits_to_dl<T>(v, N, y[r], gsrc[r]);
            } else {
              const T* gl = gsrc + r * N;
              for (int64_t n = 0; n < N; ++n) v[n] = gl[n];
            }
            const T rc = dl_to_g<T>(v, cs, c, b, qn, ca);
            row_grad<T>(v, rc, qr, P, N, D, gq + r * D);
          }
          accum_gtx<T>(Gb, N, c.q + (b * Q + r0) * D, nr, N, D, gpi);
        }
        if (direct_gp) {  // grad_p[b] = G^T Q - colcoef * p
          for (int64_t n = 0; n < N; ++n)
            axpy<T>(-col_coef(c, b * N + n, ca[n]), P + n * D, gpi + n * D, D);
        }
      }
    });
    if (direct_gp) return;
    // grad_p[b,n] = sum_chunks part - colcoef * p
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D * pl.chunks));
    at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t bn = begin; bn < end; ++bn) {
        const int64_t b = bn / N, n = bn % N;
        T acc = 0;
        for (int64_t k = 0; k < pl.chunks; ++k) acc += colacc[(b * pl.chunks + k) * N + n];
        T* dst = gp + bn * D;
        scale_to<T>(-col_coef(c, bn, acc), c.p + bn * D, dst, D);
        for (int64_t k = 0; k < pl.chunks; ++k)
          axpy<T>(T(1), part + ((b * pl.chunks + k) * N + n) * D, dst, D);
      }
    });
    return;
  }

  // Large N: materialise G [B,Q,N], then two batched GEMMs with beta = 1.
  at::Tensor G_t = at::empty({B, Q, N}, qc.options());
  T* Gp = G_t.mutable_data_ptr<T>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: not inherited by workers
    std::vector<T> cs(cosine ? N : 0);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / pl.chunks;
      const int64_t q0 = (it % pl.chunks) * pl.rows;
      const int64_t rows = std::min(Q, q0 + pl.rows) - q0;
      if (rows <= 0) continue;
      if (need_cross) {
        at::Tensor gt = G_t.select(0, b).narrow(0, q0, rows);
        at::mm_out(gt, qc.select(0, b).narrow(0, q0, rows), pc_t.select(0, b).t());
      }
      T* ca = colacc + it * N;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = b * Q + q0 + i;
        const T* qr = c.q + r * D;
        T* v = Gp + r * N;
        T qn = 0;
        if (need_cross) {
          qn = query_norm(qr, D, c.metric);
          raw_to_logits<T>(v, c, b, false, qn, cosine ? cs.data() : nullptr, qr);
        }
        if constexpr (kLoss) {
          logits_to_dl<T>(v, N, y[r], gsrc[r]);
        } else {
          const T* gl = gsrc + r * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) v[n] = gl[n];
        }
        const T rc = dl_to_g<T>(v, cs.data(), c, b, qn, ca);
        scale_to<T>(-rc, qr, gq + r * D, D);
      }
    }
  });
  {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
    at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t bn = begin; bn < end; ++bn) {
        const int64_t b = bn / N, n = bn % N;
        T acc = 0;
        for (int64_t k = 0; k < pl.chunks; ++k) acc += colacc[(b * pl.chunks + k) * N + n];
        const T cc = col_coef(c, bn, acc);
        const T* pr = c.p + bn * D;
        scale_to<T>(-cc, pr, gp + bn * D, D);
      }
    });
  }
  gq_t.baddbmm_(G_t, pc_t);
  gp_t.baddbmm_(G_t.transpose(1, 2), qc);
}

// --------------------------------------------------------------------------------------------
// argument handling shared by the four ops
// --------------------------------------------------------------------------------------------
struct Inputs {
  at::Tensor q, p;  // contiguous, compute dtype
  at::ScalarType in_dtype, ct;
  int64_t B, Q, N, D;
};

Inputs prep_qp(const at::Tensor& query, const at::Tensor& protos, int64_t metric, double scale,
               double eps, const char* op) {
  check_float_input(query, op, "query", 3);
  check_float_input(protos, op, "protos", 3);
  check_metric(metric, scale, eps, op);
  TORCH_CHECK(query.scalar_type() == protos.scalar_type(), "fastmeta_cpp::", op,
              ": query and protos must have the same dtype, got ", query.scalar_type(), " and ",
              protos.scalar_type());
  TORCH_CHECK(query.size(0) == protos.size(0) && query.size(2) == protos.size(2),
              "fastmeta_cpp::", op, ": query [B,Q,D] and protos [B,N,D] disagree: ",
              query.sizes(), " vs ", protos.sizes());
  Inputs in;
  in.in_dtype = query.scalar_type();
  in.ct = compute_dtype(in.in_dtype);
  in.q = as_compute(query, in.ct);
  in.p = as_compute(protos, in.ct);
  in.B = query.size(0);
  in.Q = query.size(1);
  in.N = protos.size(1);
  in.D = query.size(2);
  return in;
}

template <typename T>
Ctx<T> make_ctx(const Inputs& in, int64_t metric, double scale, double eps, at::Tensor& norms) {
  norms = at::empty({2, in.B, in.N}, in.q.options());
  T* pn = norms.mutable_data_ptr<T>();
  T* pcn = pn + in.B * in.N;
  Ctx<T> c{in.B,
           in.Q,
           in.N,
           in.D,
           metric,
           static_cast<T>(scale),
           static_cast<T>(eps),
           in.q.const_data_ptr<T>(),
           in.p.const_data_ptr<T>(),
           pn,
           pcn};
  proto_norms<T>(c.p, in.B * in.N, in.D, metric, c.eps, pn, pcn);
  return c;
}

}  // namespace

at::Tensor proto_logits_fwd(const at::Tensor& query, const at::Tensor& protos, int64_t metric,
                            double scale, double eps) {
  constexpr const char* op = "proto_logits_fwd";
  // Kernels run below autograd (the Python wrapper owns the gradient formula).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Inputs in = prep_qp(query, protos, metric, scale, eps, op);
  at::Tensor out = at::empty({in.B, in.Q, in.N}, in.q.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.ct, op, [&] {
      at::Tensor norms;
      const Ctx<scalar_t> c = make_ctx<scalar_t>(in, metric, scale, eps, norms);
      logits_fwd_impl<scalar_t>(c, in.q, in.p, out);
    });
  }
  return to_dtype(out, in.in_dtype);
}

// Shared tail of both backward entry points: allocate the gradients, run bwd_impl (LOSS: g is
// the per-row loss gradient and y the labels; else g is the [B,Q,N] logits gradient), cast back.
template <bool LOSS>
std::tuple<at::Tensor, at::Tensor> run_backward(const Inputs& in, const at::Tensor& g,
                                                const at::Tensor& y, int64_t metric, double scale,
                                                double eps) {
  // Every element is written when there is work; otherwise the gradients are zero.
  const bool work = in.B * in.Q * in.N * in.D > 0;
  at::Tensor gq = work ? at::empty({in.B, in.Q, in.D}, in.q.options())
                       : at::zeros({in.B, in.Q, in.D}, in.q.options());
  at::Tensor gp = work ? at::empty({in.B, in.N, in.D}, in.q.options())
                       : at::zeros({in.B, in.N, in.D}, in.q.options());
  if (work) {
    AT_DISPATCH_FLOATING_TYPES(in.ct, "proto_backward", [&] {
      at::Tensor norms;
      const Ctx<scalar_t> c = make_ctx<scalar_t>(in, metric, scale, eps, norms);
      bwd_impl<scalar_t, LOSS>(c, in.q, in.p, g.const_data_ptr<scalar_t>(),
                               LOSS ? y.const_data_ptr<int64_t>() : nullptr, gq, gp);
    });
  }
  return {to_dtype(gq, in.in_dtype), to_dtype(gp, in.in_dtype)};
}

std::tuple<at::Tensor, at::Tensor> proto_logits_bwd(const at::Tensor& grad_logits,
                                                    const at::Tensor& query,
                                                    const at::Tensor& protos, int64_t metric,
                                                    double scale, double eps) {
  constexpr const char* op = "proto_logits_bwd";
  // Kernels run below autograd (the Python wrapper owns the gradient formula).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Inputs in = prep_qp(query, protos, metric, scale, eps, op);
  check_float_input(grad_logits, op, "grad_logits", 3);
  TORCH_CHECK(grad_logits.size(0) == in.B && grad_logits.size(1) == in.Q &&
                  grad_logits.size(2) == in.N,
              "fastmeta_cpp::", op, ": grad_logits must have shape [", in.B, ", ", in.Q, ", ",
              in.N, "], got ", grad_logits.sizes());
  return run_backward</*LOSS=*/false>(in, as_compute(grad_logits, in.ct), at::Tensor(), metric,
                                      scale, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_loss_fwd(const at::Tensor& query,
                                                              const at::Tensor& protos,
                                                              const at::Tensor& labels,
                                                              int64_t metric, double scale,
                                                              double eps) {
  constexpr const char* op = "proto_loss_fwd";
  // Kernels run below autograd (the Python wrapper owns the gradient formula).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Inputs in = prep_qp(query, protos, metric, scale, eps, op);
  check_index_tensor(labels, op, "labels", in.B, in.Q);
  const at::Tensor y = labels.contiguous();
  check_label_range(y, in.N, op, "labels");
  at::Tensor loss = at::empty({in.B, in.Q}, in.q.options());
  at::Tensor lse = at::empty({in.B, in.Q}, in.q.options());
  at::Tensor pred = at::empty({in.B, in.Q}, y.options());
  if (in.B * in.Q > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.ct, op, [&] {
      at::Tensor norms;
      const Ctx<scalar_t> c = make_ctx<scalar_t>(in, metric, scale, eps, norms);
      loss_fwd_impl<scalar_t>(c, in.q, in.p, y.const_data_ptr<int64_t>(),
                              loss.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(),
                              pred.mutable_data_ptr<int64_t>());
    });
  }
  return {loss, lse, pred};
}

std::tuple<at::Tensor, at::Tensor> proto_loss_bwd(const at::Tensor& grad_loss,
                                                  const at::Tensor& query,
                                                  const at::Tensor& protos,
                                                  const at::Tensor& labels, const at::Tensor& lse,
                                                  int64_t metric, double scale, double eps) {
  constexpr const char* op = "proto_loss_bwd";
  // Kernels run below autograd (the Python wrapper owns the gradient formula).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Inputs in = prep_qp(query, protos, metric, scale, eps, op);
  check_float_input(grad_loss, op, "grad_loss", 2);
  check_float_input(lse, op, "lse", 2);
  TORCH_CHECK(grad_loss.size(0) == in.B && grad_loss.size(1) == in.Q, "fastmeta_cpp::", op,
              ": grad_loss must have shape [", in.B, ", ", in.Q, "], got ", grad_loss.sizes());
  TORCH_CHECK(lse.size(0) == in.B && lse.size(1) == in.Q, "fastmeta_cpp::", op,
              ": lse must have shape [", in.B, ", ", in.Q, "], got ", lse.sizes());
  check_index_tensor(labels, op, "labels", in.B, in.Q);
  const at::Tensor y = labels.contiguous();
  check_label_range(y, in.N, op, "labels");
  // lse is validated (it is part of the contract) but the backward recomputes the row
  // log-sum-exp from the recomputed logits, which is more accurate in float32.
  return run_backward</*LOSS=*/true>(in, as_compute(grad_loss, in.ct), y, metric, scale, eps);
}

}  // namespace cpu
}  // namespace fastmeta
