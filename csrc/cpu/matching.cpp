// matching_{fwd,bwd} and the fused matching_loss_{fwd,bwd} CPU kernels (Matching Networks,
// Vinyals et al. 2016, eq. 1-2: softmax over the support set of scale * cos, summed per class).
//
// Work is split over (episode, chunk of query rows); inside a chunk, query rows are processed in
// tiles whose [rows, S] logits workspace stays around kTileBytes per thread (one single-threaded
// GEMM per tile). The [B, Q, S] attention matrix never exists: only a tile of it, per thread.
//
// Cosine: the support rows are normalised into a copy sorted by label (class n = the column
// segment [off[n], off[n+1]) of every logits tile, so per-class loops are contiguous); the
// queries are not copied: a tile of q . sn is scaled row-wise by scale / max(|q|, eps).
// Zero-norm vectors get similarity 0 (eps = 1e-8, as F.normalize).
//
// Per query row the per-class log-sum-exp is exact and stable: per-class maxima cm (or the row
// maximum where that cannot underflow, see row_shift_is_exact), sums cs of exp(l - cm), so
// lse_n = cm + log cs is finite for every class with a support example, however small its
// attention (a log of the summed probabilities would underflow to -inf), and
// log P[n] = (cm - m) + (log cs - log tot) with m = max cm, tot = sum cs exp(cm - m).
//
// Backward recomputes the logits and the per-class statistics tile by tile. With dY = grad of
// log P:  dl[s] = dY[c_s] * exp(l_s - lse_{c_s}) - (sum_n dY_n) * exp(l_s - lse),  c_s = label
// of s (evaluated as exp(l_s - cm) times a per-class factor, never through |lse|), and
// G = scale * dl gives grad_qn = G @ Sn and grad_sn = G^T @ Qn (per tile, accumulated per work
// item), then the normalisation backward  g_x = (g - [|x| > eps] xn (xn . g)) / max(|x|, eps)
// and the support gradient is scattered back to the caller's order.
// The fused loss uses dY = -grad_loss * onehot(y).
#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastmeta {
namespace cpu {
namespace {

constexpr int64_t kTileBytes = 1 << 20;  // per-thread [rows, S] logits workspace

struct Plan {
  int64_t chunks;  // chunks per episode
  int64_t rows;    // rows per chunk
  int64_t tile;    // rows per GEMM tile inside a chunk
};

inline Plan plan(int64_t B, int64_t Q, int64_t S, int64_t elt) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = 2 * nt;
  int64_t chunks = B >= want ? 1 : ceil_div(want, B);
  chunks = std::max<int64_t>(1, std::min(chunks, Q));
  const int64_t rows = ceil_div(Q, chunks);
  chunks = ceil_div(Q, rows);
  const int64_t tile = std::max<int64_t>(1, std::min(rows, kTileBytes / std::max<int64_t>(1, S * elt)));
  return {chunks, rows, tile};
}

// In place: g = (g - [n > eps] xn (xn . g)) / max(n, eps), row by row.
template <typename T>
void normalize_bwd_rows(T* g, const T* xn, const T* nrm, int64_t R, int64_t D, T eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* gr = g + r * D;
      const T* xr = xn + r * D;
      const T n = nrm[r];
      if (n > eps) axpy<T>(-dot(xr, gr, D), xr, gr, D);
      div_inplace<T>(gr, std::max(n, eps), D);
    }
  });
}

// Same from the raw rows x (xn = x / |x|): g = (g - [n > eps] x (x . g) / n^2) / max(n, eps).
template <typename T>
void normalize_bwd_rows_raw(T* g, const T* x, const T* nrm, int64_t R, int64_t D, T eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* gr = g + r * D;
      const T* xr = x + r * D;
      const T n = nrm[r];
      if (n > eps) axpy<T>(-dot(xr, gr, D) / (n * n), xr, gr, D);
      div_inplace<T>(gr, std::max(n, eps), D);
    }
  });
}

// Per-class statistics of a tile of logits wt [rows, S] whose columns are grouped by class
// (the support rows are sorted by label once per episode: class n is the column segment
// [off[n], off[n+1]), so every loop below is a contiguous, vectorisable sweep):
//   cm[i, n]  the class maximum,
//   wt[i, s] <- ev = exp(l - cm[i, c_s])   (in place),
//   cs[i, n]  = sum_{s in n} ev,
//   m[i]      = max_n cm[i, n],  E[i, n] = exp(cm[i, n] - m[i]),  tot[i] = sum_n cs E.
// Then lse_n = cm + log cs and lse = m + log tot; differences of the two are formed as
// (cm - m) + (log cs - log tot), which carry no rounding of |lse| (up to |scale| + log S).
// The exponentials run as ATen's vectorised exp_ over the whole tile (a scalar expf per
// element costs more than the similarity GEMM at small D). cm/cs/E: [tile, N] workspaces.
// row_shift (see row_shift_is_exact): every class is shifted by the row maximum instead of its
// own maximum, which saves N short segment sweeps per row and changes nothing when no
// exp(l - max) can leave the normal range.
template <typename T>
void tile_stats(at::Tensor& wt, const int64_t* __restrict off, int64_t S, int64_t N,
                bool row_shift, at::Tensor& cm_t, at::Tensor& cs_t, at::Tensor& e_t,
                T* __restrict m, T* __restrict tot) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t rows = wt.size(0);
  T* __restrict w = wt.mutable_data_ptr<T>();
  T* __restrict cm = cm_t.mutable_data_ptr<T>();
  T* __restrict cs = cs_t.mutable_data_ptr<T>();
  T* __restrict E = e_t.mutable_data_ptr<T>();
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict l = w + i * S;
    T* __restrict cmi = cm + i * N;
    if (row_shift) {
      T mx = kNegInf;
#pragma omp simd reduction(max : mx)
      for (int64_t s = 0; s < S; ++s) mx = l[s] > mx ? l[s] : mx;
      for (int64_t n = 0; n < N; ++n) cmi[n] = off[n] == off[n + 1] ? kNegInf : mx;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) l[s] -= mx;
      continue;
    }
    for (int64_t n = 0; n < N; ++n) {
      T mx = kNegInf;
#pragma omp simd reduction(max : mx)
      for (int64_t s = off[n]; s < off[n + 1]; ++s) mx = l[s] > mx ? l[s] : mx;
      cmi[n] = mx;
#pragma omp simd
      for (int64_t s = off[n]; s < off[n + 1]; ++s) l[s] -= mx;
    }
  }
  wt.exp_();
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict l = w + i * S;
    const T* __restrict cmi = cm + i * N;
    T* __restrict csi = cs + i * N;
    T mi = kNegInf;
    for (int64_t n = 0; n < N; ++n) {
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t s = off[n]; s < off[n + 1]; ++s) sum += l[s];
      csi[n] = sum;
      mi = cmi[n] > mi ? cmi[n] : mi;
    }
    m[i] = mi;
    T* __restrict Ei = E + i * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) Ei[n] = cmi[n] - mi;  // -inf for a class without examples
  }
  at::Tensor et = e_t.narrow(0, 0, rows);
  et.exp_();
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict csi = cs + i * N;
    const T* __restrict Ei = E + i * N;
    T t = 0;
#pragma omp simd reduction(+ : t)
    for (int64_t n = 0; n < N; ++n) t += csi[n] * Ei[n];
    tot[i] = t;
  }
}

// Logits are scale * cos, so l - max(l) >= -2|scale| (1 + rounding): when exp of that stays a
// normal number (float: e^-80 = 1.8e-35 > 1.2e-38; double: e^-700 > 2.2e-308), shifting every
// class by the row maximum loses nothing against per-class maxima (every exponential keeps full
// relative precision); beyond it a far class needs its own maximum to stay finite.
template <typename T>
inline bool row_shift_is_exact(T scale) {
  return std::abs(scale) <= (sizeof(T) >= 8 ? T(350) : T(40));
}

template <typename T>
struct Ctx {
  int64_t B, Q, S, N, D;
  T scale, eps;
  const int64_t* off;  // [B, N + 1] class segment offsets of the label-sorted support
  const T* qnrm;       // [B * Q] query norms |q| (queries are never normalised in memory)
};

// Raw products q . sn -> logits scale * cos = q . sn * scale / max(|q|, eps), rows r0.. of B*Q.
template <typename T>
void scale_rows(at::Tensor& wt, const Ctx<T>& c, int64_t r0) {
  const int64_t rows = wt.size(0), S = wt.size(1);
  T* w = wt.mutable_data_ptr<T>();
  for (int64_t i = 0; i < rows; ++i) {
    const T f = c.scale / std::max(c.qnrm[r0 + i], c.eps);
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) w[i * S + s] *= f;
  }
}

// --------------------------------------------------------------------------------------------
// forward (kLoss: writes loss/pred from query labels y; else writes logp [B,Q,N])
// --------------------------------------------------------------------------------------------
template <typename T, bool kLoss>
void fwd_impl(const Ctx<T>& c, const at::Tensor& qn, const at::Tensor& sn, T* logp_out, T* lse_out,
              const int64_t* y, T* loss, int64_t* pred) {
  const int64_t B = c.B, Q = c.Q, S = c.S, N = c.N;
  const Plan pl = plan(B, Q, S, sizeof(T));
  at::parallel_for(0, B * pl.chunks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: not inherited by workers
    const MklOneThread mkl_one;  // its GEMMs on this thread (common.h)
    at::Tensor ws = at::empty({pl.tile, S}, qn.options());
    at::Tensor cm_t = at::empty({pl.tile, N}, qn.options());
    at::Tensor cs_t = at::empty({pl.tile, N}, qn.options());
    at::Tensor e_t = at::empty({pl.tile, N}, qn.options());
    std::vector<T> m(pl.tile), tot(pl.tile);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / pl.chunks;
      const int64_t q0 = (it % pl.chunks) * pl.rows;
      const int64_t q1 = std::min(Q, q0 + pl.rows);
      const int64_t* off = c.off + b * (N + 1);
      for (int64_t t0 = q0; t0 < q1; t0 += pl.tile) {
        const int64_t rows = std::min(pl.tile, q1 - t0);
        at::Tensor wt = ws.narrow(0, 0, rows);
        at::mm_out(wt, qn.select(0, b).narrow(0, t0, rows), sn.select(0, b).t());
        scale_rows<T>(wt, c, b * Q + t0);
        tile_stats<T>(wt, off, S, N, row_shift_is_exact(c.scale), cm_t, cs_t, e_t, m.data(), tot.data());
        const T* cm = cm_t.const_data_ptr<T>();
        const T* cs = cs_t.const_data_ptr<T>();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = b * Q + t0 + i;
          const T lt = std::log(tot[i]);
          lse_out[r] = m[i] + lt;
          const T* cmi = cm + i * N;
          const T* csi = cs + i * N;
          if constexpr (kLoss) {
            const int64_t yr = y[r];
            loss[r] = -((cmi[yr] - m[i]) + (std::log(csi[yr]) - lt));
            // most probable class: largest cs * exp(cm - m), i.e. the largest E * cs
            const T* Ei = e_t.const_data_ptr<T>() + i * N;
            int64_t am = 0;
            T best = csi[0] * Ei[0];
            for (int64_t n = 1; n < N; ++n) {
              const T v = csi[n] * Ei[n];
              if (v > best || (std::isnan(v) && !std::isnan(best))) {
                best = v;
                am = n;
              }
            }
            pred[r] = am;
          } else {
            T* dst = logp_out + r * N;
            for (int64_t n = 0; n < N; ++n)
              dst[n] = csi[n] == T(0) ? -std::numeric_limits<T>::infinity()
                                      : (cmi[n] - m[i]) + (std::log(csi[n]) - lt);
          }
        }
      }
    }
  });
}

// --------------------------------------------------------------------------------------------
// backward. kLoss: gsrc = grad_loss [B,Q], y = query labels (dY = -grad_loss onehot(y)).
//           else:  gsrc = grad_logp [B,Q,N].
// The saved forward results (aux = loss or logp, lse) are part of the op contract and
// validated by the callers, but not read: each row's statistics are recomputed (see below).
// gq/gs receive the gradients w.r.t. the *normalised* inputs; the caller maps them back.
// --------------------------------------------------------------------------------------------
template <typename T, bool kLoss>
void bwd_impl(const Ctx<T>& c, const at::Tensor& qn, const at::Tensor& sn, const T* gsrc,
              const T* aux, const T* lse, const int64_t* y, at::Tensor& gq_t, at::Tensor& gs_t) {
  const int64_t B = c.B, Q = c.Q, S = c.S, N = c.N, D = c.D;
  const Plan pl = plan(B, Q, S, sizeof(T));
  const int64_t items = B * pl.chunks;
  const bool direct = pl.chunks == 1;
  at::Tensor part = direct ? gs_t : at::empty({items, S, D}, qn.options());
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: not inherited by workers
    const MklOneThread mkl_one;  // its GEMMs on this thread (common.h)
    at::Tensor ws = at::empty({pl.tile, S}, qn.options());
    T* w = ws.mutable_data_ptr<T>();
    at::Tensor cm_t = at::empty({pl.tile, N}, qn.options());
    at::Tensor cs_t = at::empty({pl.tile, N}, qn.options());
    at::Tensor e_t = at::empty({pl.tile, N}, qn.options());
    std::vector<T> m(pl.tile), tot(pl.tile), k(N);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / pl.chunks;
      const int64_t q0 = (it % pl.chunks) * pl.rows;
      const int64_t q1 = std::min(Q, q0 + pl.rows);
      const int64_t* off = c.off + b * (N + 1);
      at::Tensor acc = part.select(0, direct ? b : it);
      acc.zero_();
      const at::Tensor snb = sn.select(0, b);
      for (int64_t t0 = q0; t0 < q1; t0 += pl.tile) {
        const int64_t rows = std::min(pl.tile, q1 - t0);
        at::Tensor wt = ws.narrow(0, 0, rows);
        const at::Tensor qt = qn.select(0, b).narrow(0, t0, rows);
        at::mm_out(wt, qt, snb.t());
        scale_rows<T>(wt, c, b * Q + t0);
        // Recomputed per-class statistics (the saved lse/logp/loss are not read: differences
        // of log-sum-exps would carry the rounding of |lse|). With dY the gradient of log P:
        //   dl_s = ev_s k[c_s],  k[n] = dY_n / cs_n - (sum dY) exp(cm_n - m) / tot,
        // ev_s = exp(l_s - cm[c_s]) (exp(l_s - lse_n) = ev_s / cs_n, softmax_s = ev_s E_n / tot).
        tile_stats<T>(wt, off, S, N, row_shift_is_exact(c.scale), cm_t, cs_t, e_t, m.data(), tot.data());
        const T* cs = cs_t.const_data_ptr<T>();
        const T* E = e_t.const_data_ptr<T>();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = b * Q + t0 + i;
          const T* csi = cs + i * N;
          const T* Ei = E + i * N;
          T sdy = 0;
          if constexpr (kLoss) {
            sdy = -gsrc[r];
            std::fill(k.begin(), k.end(), T(0));
            k[y[r]] = sdy;
          } else {
            const T* dy = gsrc + r * N;
            for (int64_t n = 0; n < N; ++n) {
              k[n] = dy[n];
              sdy += dy[n];
            }
          }
          const T st = sdy / tot[i];
          for (int64_t n = 0; n < N; ++n)
            k[n] = csi[n] == T(0) ? T(0) : c.scale * (k[n] / csi[n] - st * Ei[n]);
          T* l = w + i * S;
          for (int64_t n = 0; n < N; ++n) {
            const T kn = k[n];
#pragma omp simd
            for (int64_t s = off[n]; s < off[n + 1]; ++s) l[s] *= kn;
          }
        }
        at::Tensor gqt = gq_t.select(0, b).narrow(0, t0, rows);
        at::mm_out(gqt, wt, snb);  // grad w.r.t. the normalised query rows
        // grad w.r.t. the normalised support: G^T @ (q / max(|q|, eps))
        T* w2 = wt.mutable_data_ptr<T>();
        for (int64_t i = 0; i < rows; ++i) {
          const T inv = T(1) / std::max(c.qnrm[b * Q + t0 + i], c.eps);
#pragma omp simd
          for (int64_t s = 0; s < S; ++s) w2[i * S + s] *= inv;
        }
        acc.addmm_(wt.t(), qt);
      }
    }
  });
  if (direct) return;
  at::sum_out(gs_t, part.view({B, pl.chunks, S, D}), {1});
}

struct Inputs {
  at::Tensor q, s, lab;  // contiguous, compute dtype / int64
  at::ScalarType in_dtype, ct;
  int64_t B, Q, S, N, D;
};

Inputs prep(const at::Tensor& query, const at::Tensor& support, const at::Tensor& labels,
            int64_t n_way, double scale, double eps, const char* op) {
  check_float_input(query, op, "query", 3);
  check_float_input(support, op, "support", 3);
  TORCH_CHECK(query.scalar_type() == support.scalar_type(), "fastmeta_cpp::", op,
              ": query and support must have the same dtype, got ", query.scalar_type(), " and ",
              support.scalar_type());
  TORCH_CHECK(query.size(0) == support.size(0) && query.size(2) == support.size(2),
              "fastmeta_cpp::", op, ": query [B,Q,D] and support [B,S,D] disagree: ",
              query.sizes(), " vs ", support.sizes());
  TORCH_CHECK(n_way >= 1, "fastmeta_cpp::", op, ": n_way must be >= 1, got ", n_way);
  TORCH_CHECK(support.size(1) >= 1, "fastmeta_cpp::", op, ": support set is empty (S = 0)");
  TORCH_CHECK(std::isfinite(scale), "fastmeta_cpp::", op, ": scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "fastmeta_cpp::", op,
              ": eps must be finite and >= 0, got ", eps);
  check_index_tensor(labels, op, "support_labels", support.size(0), support.size(1));
  Inputs in;
  in.lab = labels.contiguous();
  check_label_range(in.lab, n_way, op, "support_labels");
  in.in_dtype = query.scalar_type();
  in.ct = compute_dtype(in.in_dtype);
  in.q = as_compute(query, in.ct);
  in.s = as_compute(support, in.ct);
  in.B = query.size(0);
  in.Q = query.size(1);
  in.S = support.size(1);
  in.N = n_way;
  in.D = query.size(2);
  return in;
}

// Normalised copies and norms of query and support rows; the support rows of each episode in
// label order (stable counting sort): sorted row j of episode b is support row perm[b, j], and
// class n occupies rows [off[b, n], off[b, n + 1]).
struct Normed {
  at::Tensor sn, qnrm, snrm, perm, off;
};

template <typename T>
Normed normalize(const Inputs& in, T eps) {
  const int64_t B = in.B, S = in.S, N = in.N, D = in.D;
  Normed r;
  r.sn = at::empty({B, S, D}, in.q.options());
  r.qnrm = at::empty({B * in.Q}, in.q.options());
  r.snrm = at::empty({B * S}, in.q.options());
  r.perm = at::empty({B, S}, in.lab.options());
  r.off = at::empty({B, N + 1}, in.lab.options());
  const int64_t* lab = in.lab.const_data_ptr<int64_t>();
  int64_t* perm = r.perm.mutable_data_ptr<int64_t>();
  int64_t* off = r.off.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t* o = off + b * (N + 1);
    std::fill(o, o + N + 1, int64_t(0));
    for (int64_t s = 0; s < S; ++s) ++o[lab[b * S + s] + 1];
    for (int64_t n = 0; n < N; ++n) o[n + 1] += o[n];
    std::vector<int64_t> pos(o, o + N);
    for (int64_t s = 0; s < S; ++s) perm[b * S + pos[lab[b * S + s]]++] = s;
  }
  {
    // query norms only: the kernels scale rows of q . sn by 1 / max(|q|, eps) instead of
    // writing a normalised copy of the (larger) query set
    const T* q = in.q.const_data_ptr<T>();
    T* qnrm = r.qnrm.mutable_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
    at::parallel_for(0, B * in.Q, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) qnrm[i] = std::sqrt(dot(q + i * D, q + i * D, D));
    });
  }
  const T* x = in.s.const_data_ptr<T>();
  T* xn = r.sn.mutable_data_ptr<T>();
  T* nrm = r.snrm.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
  at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* row = x + ((j / S) * S + perm[j]) * D;
      const T n = std::sqrt(dot(row, row, D));
      nrm[j] = n;
      scale_to<T>(T(1) / std::max(n, eps), row, xn + j * D, D);
    }
  });
  return r;
}

template <typename T>
Ctx<T> make_ctx(const Inputs& in, const Normed& nm, double scale, double eps) {
  return Ctx<T>{in.B, in.Q, in.S, in.N, in.D, static_cast<T>(scale), static_cast<T>(eps),
                nm.off.const_data_ptr<int64_t>(), nm.qnrm.const_data_ptr<T>()};
}

// Shared backward driver: gradients w.r.t. the normalised inputs, then through the norms.
template <bool kLoss>
std::tuple<at::Tensor, at::Tensor> run_bwd(const Inputs& in, double scale, double eps,
                                           const at::Tensor& g, const at::Tensor& aux,
                                           const at::Tensor& lse, const at::Tensor& y) {
  at::Tensor gq = at::empty({in.B, in.Q, in.D}, in.q.options());
  at::Tensor gs_sorted = at::empty({in.B, in.S, in.D}, in.q.options());
  at::Tensor gs;
  AT_DISPATCH_FLOATING_TYPES(in.ct, "matching_bwd", [&] {
    using T = scalar_t;
    Normed nm = normalize<T>(in, static_cast<T>(eps));
    const Ctx<T> c = make_ctx<T>(in, nm, scale, eps);
    bwd_impl<T, kLoss>(c, in.q, nm.sn, g.const_data_ptr<T>(), aux.const_data_ptr<T>(),
                       lse.const_data_ptr<T>(), kLoss ? y.const_data_ptr<int64_t>() : nullptr,
                       gq, gs_sorted);
    normalize_bwd_rows_raw<T>(gq.mutable_data_ptr<T>(), in.q.const_data_ptr<T>(),
                              nm.qnrm.const_data_ptr<T>(), in.B * in.Q, in.D, c.eps);
    normalize_bwd_rows<T>(gs_sorted.mutable_data_ptr<T>(), nm.sn.const_data_ptr<T>(),
                          nm.snrm.const_data_ptr<T>(), in.B * in.S, in.D, c.eps);
    // back to the caller's support order: sorted row j of episode b is row perm[b, j]
    gs = at::empty_like(gs_sorted);
    gs.scatter_(1, nm.perm.unsqueeze(-1).expand({in.B, in.S, in.D}), gs_sorted);
  });
  return {to_dtype(gq, in.in_dtype), to_dtype(gs, in.in_dtype)};
}

void check_rows(const at::Tensor& t, const char* op, const char* name, const Inputs& in,
                bool with_n) {
  check_float_input(t, op, name, with_n ? 3 : 2);
  TORCH_CHECK(t.size(0) == in.B && t.size(1) == in.Q && (!with_n || t.size(2) == in.N),
              "fastmeta_cpp::", op, ": ", name, " has shape ", t.sizes(),
              ", expected [B, Q", with_n ? ", N]" : "]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> matching_fwd(const at::Tensor& query, const at::Tensor& support,
                                                const at::Tensor& support_labels, int64_t n_way,
                                                double scale, double eps) {
  constexpr const char* op = "matching_fwd";
  // Kernels run below autograd (the Python wrapper owns the gradient formula).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Inputs in = prep(query, support, support_labels, n_way, scale, eps, op);
  at::Tensor logp = at::empty({in.B, in.Q, in.N}, in.q.options());
  at::Tensor lse = at::empty({in.B, in.Q}, in.q.options());
  if (in.B * in.Q > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.ct, op, [&] {
      using T = scalar_t;
      Normed nm = normalize<T>(in, static_cast<T>(eps));
      const Ctx<T> c = make_ctx<T>(in, nm, scale, eps);
      fwd_impl<T, false>(c, in.q, nm.sn, logp.mutable_data_ptr<T>(), lse.mutable_data_ptr<T>(),
                         nullptr, nullptr, nullptr);
    });
  }
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor> matching_bwd(const at::Tensor& grad_logp,
                                                const at::Tensor& query, const at::Tensor& support,
                                                const at::Tensor& support_labels,
                                                const at::Tensor& logp, const at::Tensor& lse,
                                                int64_t n_way, double scale, double eps) {
  constexpr const char* op = "matching_bwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Inputs in = prep(query, support, support_labels, n_way, scale, eps, op);
  check_rows(grad_logp, op, "grad_logp", in, true);
  check_rows(logp, op, "logp", in, true);
  check_rows(lse, op, "lse", in, false);
  return run_bwd<false>(in, scale, eps, as_compute(grad_logp, in.ct), as_compute(logp, in.ct),
                        as_compute(lse, in.ct), at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matching_loss_fwd(
    const at::Tensor& query, const at::Tensor& support, const at::Tensor& support_labels,
    const at::Tensor& query_labels, int64_t n_way, double scale, double eps) {
  constexpr const char* op = "matching_loss_fwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Inputs in = prep(query, support, support_labels, n_way, scale, eps, op);
  check_index_tensor(query_labels, op, "query_labels", in.B, in.Q);
  const at::Tensor y = query_labels.contiguous();
  check_label_range(y, in.N, op, "query_labels");
  at::Tensor loss = at::empty({in.B, in.Q}, in.q.options());
  at::Tensor lse = at::empty({in.B, in.Q}, in.q.options());
  at::Tensor pred = at::empty({in.B, in.Q}, y.options());
  if (in.B * in.Q > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.ct, op, [&] {
      using T = scalar_t;
      Normed nm = normalize<T>(in, static_cast<T>(eps));
      const Ctx<T> c = make_ctx<T>(in, nm, scale, eps);
      fwd_impl<T, true>(c, in.q, nm.sn, nullptr, lse.mutable_data_ptr<T>(),
                        y.const_data_ptr<int64_t>(), loss.mutable_data_ptr<T>(),
                        pred.mutable_data_ptr<int64_t>());
    });
  }
  return {loss, lse, pred};
}

std::tuple<at::Tensor, at::Tensor> matching_loss_bwd(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& support,
    const at::Tensor& support_labels, const at::Tensor& query_labels, const at::Tensor& loss,
    const at::Tensor& lse, int64_t n_way, double scale, double eps) {
  constexpr const char* op = "matching_loss_bwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Inputs in = prep(query, support, support_labels, n_way, scale, eps, op);
  check_rows(grad_loss, op, "grad_loss", in, false);
  check_rows(loss, op, "loss", in, false);
  check_rows(lse, op, "lse", in, false);
  check_index_tensor(query_labels, op, "query_labels", in.B, in.Q);
  const at::Tensor y = query_labels.contiguous();
  check_label_range(y, in.N, op, "query_labels");
  return run_bwd<true>(in, scale, eps, as_compute(grad_loss, in.ct), as_compute(loss, in.ct),
                       as_compute(lse, in.ct), y);
}

}  // namespace cpu
}  // namespace fastmeta
