"""Triton kernels for ``fastmeta/ops/_proto_loss.py`` (``proto_logits``, ``proto_loss``): prototype logits and the fused ProtoNet loss.

Launchers (contract: the kernel spec of the proto_loss op; metric 0 = sqeuclidean, 1 = cosine):

* ``proto_logits_fwd(query[B,Q,D], protos[B,N,D], metric, scale, eps) -> logits[B,Q,N]``
* ``proto_logits_bwd(grad_logits[B,Q,N], query, protos, metric, scale, eps)
  -> (grad_query, grad_protos)``
* ``proto_loss_fwd(query, protos, labels[B,Q], metric, scale, eps)
  -> (loss[B,Q], lse[B,Q], pred[B,Q])``
* ``proto_loss_bwd(grad_loss[B,Q], query, protos, labels, lse, metric, scale, eps)
  -> (grad_query, grad_protos)``

Tiling. Every kernel builds logits tiles ``[BLOCK_Q, BLOCK_N]`` with ``_logits_tile``: a loop
over D in ``BLOCK_D`` chunks accumulates the cross term ``q.p`` with ``tl.dot`` and the squared
norms ``|q|^2``, ``|p|^2`` from the very values fed to the dot, then
``sqeuclidean = -scale * max(|q|^2 - 2 q.p + |p|^2, 0)`` (what ``torch.cdist`` does on large
inputs) or ``cosine = scale * q.p / (max(|q|, eps) * max(|p|, eps))``. Grids are 1-D (no
65535 limit on B). Block sizes come from ``_TILES`` (per dot path, all >= 16 as ``tl.dot``
needs on a GPU) by a heuristic (``_pick_tile``), or by the autotuner when
``FASTMETA_TRITON_AUTOTUNE=1``.

* ``proto_loss_fwd``: one program per (episode, block of queries) walks all of N in
  ``BLOCK_N`` blocks with an online (flash-style) logsumexp, picks the label logit and keeps a
  running first-index argmax. Writes only loss, lse, pred; nothing ``[B,Q,N]`` exists.
* ``proto_logits_fwd``: one program per (episode, Q block, N block) writes its logits tile.
* ``proto_loss_bwd``: one program per (episode, Q block) recomputes its rows' logits into the
  ``[B,Q,N]`` coefficient buffer G with an online max/sum, then rewrites them in place as
  ``G = coef * grad_loss * (softmax - onehot)``. ``proto_logits_bwd``: an elementwise kernel
  scales ``grad_logits`` into G. Then two batched GEMMs (``torch.baddbmm``/``bmm``, cuBLAS on
  the GPU) give ``G @ P`` and ``G^T @ Q``; row/column sums of G are plain ``torch.sum``
  (deterministic, no atomics). For cosine the per-row term ``scale * sum_n dL*cos`` equals
  ``q . (G @ P)[q]`` (and the column term ``p . (G^T @ Q)[n]``), so no second ``[B,Q,N]``
  matrix is needed.

Precision.
* Accumulation ("acc") is fp32 for fp16/bf16/fp32 inputs, fp64 for fp64; loss/lse come out in
  acc, logits and gradients in the input dtype. The backward GEMMs run in acc.
* sqeuclidean on fp32/fp64 subtracts, per episode, the mean of the prototypes from queries and
  prototypes when that mean is larger than their spread (distances are translation
  invariant): the cancellation error of ``|q|^2 - 2 q.p + |p|^2`` scales with the norms, and
  embeddings (e.g. after a ReLU) often share a large common offset. fp16/bf16 are not centred:
  their products are exact in fp32, and re-rounding centred values to 16 bits would cost more
  than it saves.
* The loss is ``(max - label_logit) + log(sum)`` and the backward softmax
  ``exp(logit - max) / sum`` (recomputed, not ``exp(logit - lse)``), so neither carries the
  rounding of ``|lse|``, which is large for distance logits.
* fp32 ``tl.dot`` uses ``input_precision="ieee"`` unless torch's fp32 CUDA matmuls may use TF32
  (``torch.backends.cuda.matmul.fp32_precision``/``allow_tf32``); then tf32, like cuBLAS.
* Python floats reach Triton kernels as fp32; ``scale`` and ``eps`` are passed as an fp32
  (hi, lo) pair and summed in acc so fp64 runs see them to ~48 bits.
* fp64 exp/log/sqrt use libdevice on the GPU (the interpreter runs numpy's).
"""

import os

import torch
import triton
import triton.language as tl

from . import _common
from ._common import exp as _exp
from ._common import log as _log
from ._common import sqrt as _sqrt

SQEUCLIDEAN = 0
COSINE = 1


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


# Tile shapes per dot path: _TILES[path][BLOCK_N][BLOCK_Q] = (BLOCK_D, num_warps). Every entry
# compiles for sm_80 and sm_90 in every tile kernel here (tools/aot_check.py, full set: every
# autotune config, bench/results/triton_aot.md); some fp64 and sm_80 variants spill 8-72 bytes
# per thread at 56-128 registers, within the budgets of tools/aot_cases.py and untimed until a
# GPU is lent. All block dims are >= 16, as tl.dot needs on a GPU.
#   fma: fp32 with input_precision="ieee" (Triton's FMA dot: register hungry, so BLOCK_N <= 32)
#   mma: fp16, bf16, and fp32 with tf32 (tensor cores)
#   f64: fp64
_TILES = {
    "fma": {16: {16: (32, 8), 32: (16, 4), 64: (32, 8)},
            32: {16: (16, 8), 32: (16, 8), 64: (16, 8)}},
    "mma": {16: {16: (32, 8), 32: (64, 8), 64: (32, 8)},
            32: {16: (32, 8), 32: (32, 8), 64: (32, 8)},
            64: {32: (32, 8), 64: (32, 8)}},
    "f64": {16: {16: (32, 4), 32: (32, 4), 64: (32, 8)},
            32: {16: (32, 8), 32: (32, 8)},
            64: {16: (32, 8)}},
}
_INTERPRET_TILE = {"BLOCK_Q": 16, "BLOCK_D": 16, "BLOCK_N": 16, "num_warps": 4}

# FASTMETA_TRITON_AUTOTUNE=1 times every tile of the call's path on the first call of each key
# instead of the heuristic below (one compile per config: slow to warm up, for benchmarking).
_AUTOTUNE = (not _common.INTERPRET) and os.environ.get("FASTMETA_TRITON_AUTOTUNE", "0") == "1"


def _dot_path(dtype: torch.dtype, input_precision: str) -> str:
    if dtype == torch.float64:
        return "f64"
    if dtype == torch.float32 and input_precision == "ieee":
        return "fma"
    return "mma"


def _pick_tile(path: str, B: int, Q: int, N: int, n_split: bool, device: torch.device) -> dict:
    """Heuristic tile from ``_TILES[path]``: blocks no wider than Q and N need; among the tiles
    that give >= 2 programs per SM the biggest (most reuse), else the one with most programs
    (the shapes that matter, e.g. B=32/Q=75 or B=1/Q=2048, need small Q blocks to fill a GPU)."""
    if _common.INTERPRET:
        return dict(_INTERPRET_TILE)
    rows = _TILES[path]
    fit_n = _common.pow2_at_least_16(N)
    fit_q = _common.pow2_at_least_16(Q)
    cands = [(bn, bq) for bn, row in rows.items() for bq in row if bn <= fit_n and bq <= fit_q]
    cands = cands or [(16, 16)]

    def programs(tile):
        bn, bq = tile
        return B * triton.cdiv(Q, bq) * (triton.cdiv(N, bn) if n_split else 1)

    target = 2 * _common.sm_count(device)
    enough = [t for t in cands if programs(t) >= target]
    if enough:
        bn, bq = max(enough, key=lambda t: (t[0] * t[1], t[0]))
    else:
        bn, bq = max(cands, key=lambda t: (programs(t), t[0]))
    bd, warps = rows[bn][bq]
    return {"BLOCK_Q": bq, "BLOCK_D": bd, "BLOCK_N": bn, "num_warps": warps, "num_stages": 3}


def _tile_configs():
    tiles = dict.fromkeys((bq, bd, bn, w) for rows in _TILES.values()
                          for bn, row in rows.items() for bq, (bd, w) in row.items())
    return [
        triton.Config({"BLOCK_Q": bq, "BLOCK_D": bd, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for (bq, bd, bn, w) in tiles
        for st in (2, 3)
    ]


def _prune_tile_configs(configs, named_args, **kwargs):
    """Keep the tiles of this call's dot path whose Q/N blocks are not wider than needed."""
    rows = _TILES[_dot_path(named_args["q_ptr"].dtype, kwargs.get("INPUT_PRECISION", "ieee"))]
    max_q = _common.pow2_at_least_16(named_args["Q"])
    max_n = _common.pow2_at_least_16(named_args["N"])

    def listed(c):
        bq, bd, bn = c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_D"], c.kwargs["BLOCK_N"]
        return rows.get(bn, {}).get(bq) == (bd, c.num_warps)

    mine = [c for c in configs if listed(c)]
    fit = [c for c in mine if c.kwargs["BLOCK_Q"] <= max_q and c.kwargs["BLOCK_N"] <= max_n]
    return fit or mine[:1]


def _autotuned(kernel):
    # B*Q enters the key rounded up to a power of two (ROWS_BUCKET), so a varying number of
    # query rows does not re-tune on every new value; the autotuner adds the tensor dtypes.
    return triton.autotune(configs=_tile_configs(), key=["ROWS_BUCKET", "N", "D", "METRIC"],
                           prune_configs_by={"early_config_prune": _prune_tile_configs})(kernel)


def _rows_bucket(B: int, Q: int) -> int:
    return triton.next_power_of_2(max(1, B * Q))


def _dot_tl(dtype: torch.dtype):
    # bf16 arithmetic/dot is broken in the interpreter: feed it fp32 there (exact upcast).
    if dtype == torch.bfloat16 and _common.INTERPRET:
        return tl.float32
    return _common.tl_dtype(dtype)


def _center(query: torch.Tensor, protos: torch.Tensor, metric: int):
    """Per-episode centre [B, D] (acc dtype) subtracted from queries and prototypes, or None.

    The mean of the episode's prototypes where it is larger than their spread
    (|mu|^2 > mean_n |p_n - mu|^2), else 0: centring rounds every element once (eps * |x - mu|),
    which only pays when the common offset dominates. Decided on the device per episode (one
    small kernel, no host sync); x - 0 is exact, so uncentred episodes get plain-expansion
    arithmetic.
    """
    if metric != SQEUCLIDEAN or query.dtype not in (torch.float32, torch.float64):
        return None
    protos = _common.last_dim_unit_stride(protos)
    B, N, D = protos.shape
    acc = _common.acc_dtype(query.dtype)
    mu = torch.empty((B, D), dtype=acc, device=protos.device)
    block_d, block_n = _common.tile(128, D), _common.tile(32, N)
    _proto_center_kernel[(B,)](
        protos, mu, N, D, protos.stride(0), protos.stride(1),
        ACC_DTYPE=_common.acc_tl(query.dtype),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return mu


def _common_meta(query, protos, metric, scale, eps):
    s_hi, s_lo = _common.split_f32(scale)
    e_hi, e_lo = _common.split_f32(eps)
    mu = _center(query, protos, metric)
    meta = {
        "METRIC": int(metric),
        "CENTER": mu is not None,
        "DOT_DTYPE": _dot_tl(query.dtype),
        "INPUT_PRECISION": _common.input_precision(query.dtype, query.device),
        "ACC_DTYPE": _common.acc_tl(query.dtype),
        "PRECISE": _common.precise(query.dtype),
    }
    return (s_hi, s_lo, e_hi, e_lo), mu, meta


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _proto_center_kernel(
    p_ptr, mu_ptr, N, D, stride_pb, stride_pn,
    ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """mu[b] = mean_n protos[b, n] if 2 |mu|^2 > mean_n |p_n|^2 (offset > spread), else 0."""
    b = tl.program_id(0).to(tl.int64)
    p_base = p_ptr + b * stride_pb
    mu_row = mu_ptr + b * D
    mu_sq = tl.zeros((BLOCK_D,), ACC_DTYPE)
    p_sq = tl.zeros((BLOCK_D,), ACC_DTYPE)
    # (the two passes' loads stay written out: a shared jit helper returning both sums cost
    # 4-16 more registers and a fp64 spill on sm_80, a shared load helper 15 registers on
    # one sm_90 variant; tools/aot_check.py)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        s1 = tl.zeros((BLOCK_D,), ACC_DTYPE)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x = tl.load(p_base + offs_n.to(tl.int64)[:, None] * stride_pn + offs_d[None, :],
                        mask=(offs_n < N)[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
            s1 += tl.sum(x, axis=0)
            p_sq += tl.sum(x * x, axis=0)
        m = s1 / N
        mu_sq += m * m
    keep = tl.where(2.0 * tl.sum(mu_sq, axis=0) > tl.sum(p_sq, axis=0) / N, 1.0, 0.0)
    # second pass recomputes the means (protos are small) rather than re-reading stores
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        s1 = tl.zeros((BLOCK_D,), ACC_DTYPE)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x = tl.load(p_base + offs_n.to(tl.int64)[:, None] * stride_pn + offs_d[None, :],
                        mask=(offs_n < N)[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
            s1 += tl.sum(x, axis=0)
        tl.store(mu_row + offs_d, (s1 / N) * keep.to(ACC_DTYPE), mask=mask_d)


@triton.jit
def _logits_tile(
    q_base, p_base, mu_base, offs_q, offs_n, Q, N, D, stride_qq, stride_pn, scale, eps,
    METRIC: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Logits tile [BLOCK_Q, BLOCK_N] (acc dtype) of queries offs_q and prototypes offs_n.

    Padded rows/columns hold finite garbage; callers mask them."""
    mask_q = offs_q < Q
    mask_n = offs_n < N
    q_rows = q_base + offs_q.to(tl.int64)[:, None] * stride_qq
    p_rows = p_base + offs_n.to(tl.int64)[:, None] * stride_pn
    cross = tl.zeros((BLOCK_Q, BLOCK_N), ACC_DTYPE)
    qn2 = tl.zeros((BLOCK_Q,), ACC_DTYPE)
    pn2 = tl.zeros((BLOCK_N,), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q = tl.load(q_rows + offs_d[None, :], mask=mask_q[:, None] & mask_d[None, :], other=0.0)
        p = tl.load(p_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if CENTER:
            # padded d stay 0 (mu is 0 there); padded rows are discarded by the callers
            mu = tl.load(mu_base + offs_d, mask=mask_d, other=0.0)
            q = (q.to(ACC_DTYPE) - mu[None, :]).to(DOT_DTYPE)
            p = (p.to(ACC_DTYPE) - mu[None, :]).to(DOT_DTYPE)
        else:
            q = q.to(DOT_DTYPE)
            p = p.to(DOT_DTYPE)
        qf = q.to(ACC_DTYPE)
        pf = p.to(ACC_DTYPE)
        qn2 += tl.sum(qf * qf, axis=1)
        pn2 += tl.sum(pf * pf, axis=1)
        cross = tl.dot(q, tl.trans(p), cross, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if METRIC == 0:
        d2 = tl.maximum(qn2[:, None] - 2.0 * cross + pn2[None, :], 0.0)
        logits = -scale * d2
    else:
        a = tl.maximum(_sqrt(qn2, PRECISE), eps)
        c = tl.maximum(_sqrt(pn2, PRECISE), eps)
        logits = scale * (cross / (a[:, None] * c[None, :]))
    return logits


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _proto_loss_fwd_kernel(
    q_ptr, p_ptr, mu_ptr, lab_ptr, loss_ptr, lse_ptr, pred_ptr,
    B, Q, N, D, ROWS_BUCKET,
    stride_qb, stride_qq, stride_pb, stride_pn, stride_lb, stride_lq,
    scale_hi, scale_lo, eps_hi, eps_lo,
    METRIC: tl.constexpr, CENTER: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_qb = tl.cdiv(Q, BLOCK_Q)
    b = (pid // num_qb).to(tl.int64)
    qb = pid % num_qb
    scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)
    eps = tl.cast(eps_hi, ACC_DTYPE) + tl.cast(eps_lo, ACC_DTYPE)

    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < Q
    lab = tl.load(lab_ptr + b * stride_lb + offs_q.to(tl.int64) * stride_lq, mask=mask_q, other=0)
    q_base = q_ptr + b * stride_qb
    p_base = p_ptr + b * stride_pb
    mu_base = mu_ptr + b * D

    m = tl.full((BLOCK_Q,), float("-inf"), ACC_DTYPE)  # running max
    s = tl.zeros((BLOCK_Q,), ACC_DTYPE)  # running sum of exp(logit - m)
    picked = tl.zeros((BLOCK_Q,), ACC_DTYPE)  # logit of the label
    best = tl.full((BLOCK_Q,), float("-inf"), ACC_DTYPE)
    best_idx = tl.zeros((BLOCK_Q,), tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        logits = _logits_tile(
            q_base, p_base, mu_base, offs_q, offs_n, Q, N, D, stride_qq, stride_pn, scale, eps,
            METRIC, CENTER, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_DTYPE, INPUT_PRECISION, ACC_DTYPE,
            PRECISE,
        )
        logits = tl.where((offs_n < N)[None, :], logits, float("-inf"))
        bmax = tl.max(logits, axis=1)
        m_new = tl.maximum(m, bmax)
        s = s * _exp(m - m_new, PRECISE) + tl.sum(_exp(logits - m_new[:, None], PRECISE), axis=1)
        m = m_new
        picked += tl.sum(tl.where(offs_n[None, :] == lab[:, None], logits, 0.0), axis=1)
        # first index of the block max; a later block wins only if strictly larger
        bidx = tl.min(tl.where(logits == bmax[:, None], offs_n[None, :], N), axis=1)
        upd = bmax > best
        best_idx = tl.where(upd, bidx, best_idx)
        best = tl.where(upd, bmax, best)
    log_s = _log(s, PRECISE)
    lse = m + log_s
    # (m - picked) first: exact for close values, so loss carries no rounding of |lse|
    loss = (m - picked) + log_s
    out = b * Q + offs_q
    tl.store(loss_ptr + out, loss, mask=mask_q)
    tl.store(lse_ptr + out, lse, mask=mask_q)
    tl.store(pred_ptr + out, best_idx.to(tl.int64), mask=mask_q)


@triton.jit
def _proto_logits_fwd_kernel(
    q_ptr, p_ptr, mu_ptr, out_ptr,
    B, Q, N, D, ROWS_BUCKET,
    stride_qb, stride_qq, stride_pb, stride_pn,
    scale_hi, scale_lo, eps_hi, eps_lo,
    METRIC: tl.constexpr, CENTER: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, offs_q, offs_n, mask_q, mask_n = _common.program_tile(tl.program_id(0), Q, N, BLOCK_Q,
                                                             BLOCK_N)
    scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)
    eps = tl.cast(eps_hi, ACC_DTYPE) + tl.cast(eps_lo, ACC_DTYPE)

    logits = _logits_tile(
        q_ptr + b * stride_qb, p_ptr + b * stride_pb, mu_ptr + b * D, offs_q, offs_n,
        Q, N, D, stride_qq, stride_pn, scale, eps,
        METRIC, CENTER, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_DTYPE, INPUT_PRECISION, ACC_DTYPE, PRECISE,
    )
    out = out_ptr + b * Q * N + offs_q.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = mask_q[:, None] & mask_n[None, :]
    tl.store(out, logits.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _proto_loss_bwd_kernel(
    q_ptr, p_ptr, mu_ptr, lab_ptr, gl_ptr, a_ptr, c_ptr, g_ptr,
    B, Q, N, D, ROWS_BUCKET,
    stride_qb, stride_qq, stride_pb, stride_pn, stride_lb, stride_lq, stride_gb, stride_gq,
    scale_hi, scale_lo, eps_hi, eps_lo,
    METRIC: tl.constexpr, CENTER: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Coefficient matrix G[b,q,n] of the loss backward, one program per (episode, Q block).

    dL = grad_loss * (softmax - onehot); sqeuclidean G = 2*scale*dL, cosine
    G = scale*dL / (a_q c_n) with a = max(|q|,eps), c = max(|p|,eps) given.
    Pass 1 recomputes the logits tiles into G (acc dtype) with an online row max/sum; pass 2
    turns them into G in place. The softmax is exp(logit - max) / sum, as torch's: using the
    forward's lse instead, exp(logit - lse), would put lse's rounding (eps * |lse|, large for
    distance logits) into every probability of the row.
    """
    pid = tl.program_id(0)
    num_qb = tl.cdiv(Q, BLOCK_Q)
    b = (pid // num_qb).to(tl.int64)
    qb = pid % num_qb
    scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)
    eps = tl.cast(eps_hi, ACC_DTYPE) + tl.cast(eps_lo, ACC_DTYPE)

    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < Q
    rows = offs_q.to(tl.int64)
    q_base = q_ptr + b * stride_qb
    p_base = p_ptr + b * stride_pb
    mu_base = mu_ptr + b * D
    g_rows = g_ptr + b * Q * N + rows[:, None] * N

    m = tl.full((BLOCK_Q,), float("-inf"), ACC_DTYPE)
    s = tl.zeros((BLOCK_Q,), ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        logits = _logits_tile(
            q_base, p_base, mu_base, offs_q, offs_n, Q, N, D, stride_qq, stride_pn, scale, eps,
            METRIC, CENTER, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_DTYPE, INPUT_PRECISION, ACC_DTYPE,
            PRECISE,
        )
        mask_n = offs_n < N
        logits = tl.where(mask_n[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * _exp(m - m_new, PRECISE) + tl.sum(_exp(logits - m_new[:, None], PRECISE), axis=1)
        m = m_new
        tl.store(g_rows + offs_n[None, :], logits, mask=mask_q[:, None] & mask_n[None, :])
    # the tiles are re-read below by other threads of this program
    tl.debug_barrier()

    lab = tl.load(lab_ptr + b * stride_lb + rows * stride_lq, mask=mask_q, other=0)
    gl = tl.load(gl_ptr + b * stride_gb + rows * stride_gq, mask=mask_q, other=0.0).to(ACC_DTYPE)
    if METRIC == 1:
        a = tl.load(a_ptr + b * Q + rows, mask=mask_q, other=1.0)
        gl = gl * (scale / a)
    else:
        gl = gl * (2.0 * scale)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_q[:, None] & mask_n[None, :]
        logits = tl.load(g_rows + offs_n[None, :], mask=mask, other=float("-inf"))
        prob = _exp(logits - m[:, None], PRECISE) / s[:, None]
        onehot = tl.where(offs_n[None, :] == lab[:, None], 1.0, 0.0).to(ACC_DTYPE)
        g = gl[:, None] * (prob - onehot)
        if METRIC == 1:
            c = tl.load(c_ptr + b * N + offs_n, mask=mask_n, other=1.0)
            g = g / c[None, :]
        tl.store(g_rows + offs_n[None, :], g, mask=mask)


@triton.jit
def _proto_logits_bwd_kernel(
    gl_ptr, a_ptr, c_ptr, g_ptr,
    Q, N,
    stride_gb, stride_gq, stride_gn,
    scale_hi, scale_lo,
    METRIC: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """G from grad_logits: sqeuclidean 2*scale*dL, cosine scale*dL/(a_q c_n) (a, c given)."""
    b, offs_q, offs_n, mask_q, mask_n = _common.program_tile(tl.program_id(0), Q, N, BLOCK_Q,
                                                             BLOCK_N)
    scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)

    mask = mask_q[:, None] & mask_n[None, :]
    rows = offs_q.to(tl.int64)
    dl = tl.load(
        gl_ptr + b * stride_gb + rows[:, None] * stride_gq
        + offs_n[None, :].to(tl.int64) * stride_gn,
        mask=mask, other=0.0,
    ).to(ACC_DTYPE)
    if METRIC == 0:
        g = (2.0 * scale) * dl
    else:
        a = tl.load(a_ptr + b * Q + rows, mask=mask_q, other=1.0)
        c = tl.load(c_ptr + b * N + offs_n, mask=mask_n, other=1.0)
        g = (scale * dl) / (a[:, None] * c[None, :])
    tl.store(g_ptr + b * Q * N + rows[:, None] * N + offs_n[None, :], g, mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _tile_grid(B, Q, N, per_n_block: bool):
    def grid(meta):
        n = B * triton.cdiv(Q, meta["BLOCK_Q"])
        return (n * triton.cdiv(N, meta["BLOCK_N"]),) if per_n_block else (n,)

    return grid


_TUNED = {}


def _launch_tiles(kernel, args, meta, B, Q, N, per_n_block, query):
    grid = _tile_grid(B, Q, N, per_n_block)
    if _AUTOTUNE:
        if kernel not in _TUNED:
            _TUNED[kernel] = _autotuned(kernel)
        _TUNED[kernel][grid](*args, **meta)
    else:
        path = _dot_path(query.dtype, meta["INPUT_PRECISION"])
        kernel[grid](*args, **meta, **_pick_tile(path, B, Q, N, per_n_block, query.device))


def proto_loss_fwd(query, protos, labels, metric, scale, eps):
    """Fused distance + logsumexp + NLL + argmax.

    Returns ``(loss[B,Q] acc, lse[B,Q] acc, pred[B,Q] int64)``."""
    B, Q, D = query.shape
    N = protos.shape[1]
    acc = _common.acc_dtype(query.dtype)
    loss = torch.empty((B, Q), dtype=acc, device=query.device)
    lse = torch.empty((B, Q), dtype=acc, device=query.device)
    pred = torch.empty((B, Q), dtype=torch.int64, device=query.device)
    if B * Q == 0:
        return loss, lse, pred
    query = _common.last_dim_unit_stride(query)
    protos = _common.last_dim_unit_stride(protos)
    scalars, mu, meta = _common_meta(query, protos, metric, scale, eps)
    args = (
        query, protos, protos if mu is None else mu, labels, loss, lse, pred,
        B, Q, N, D, _rows_bucket(B, Q),
        query.stride(0), query.stride(1), protos.stride(0), protos.stride(1),
        labels.stride(0), labels.stride(1),
        *scalars,
    )
    _launch_tiles(_proto_loss_fwd_kernel, args, meta, B, Q, N, False, query)
    return loss, lse, pred


def proto_logits_fwd(query, protos, metric, scale, eps):
    """Logits ``[B,Q,N]`` in the input dtype."""
    B, Q, D = query.shape
    N = protos.shape[1]
    out = torch.empty((B, Q, N), dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    query = _common.last_dim_unit_stride(query)
    protos = _common.last_dim_unit_stride(protos)
    scalars, mu, meta = _common_meta(query, protos, metric, scale, eps)
    args = (
        query, protos, protos if mu is None else mu, out,
        B, Q, N, D, _rows_bucket(B, Q),
        query.stride(0), query.stride(1), protos.stride(0), protos.stride(1),
        *scalars,
    )
    _launch_tiles(_proto_logits_fwd_kernel, args, meta, B, Q, N, True, query)
    return out


def _norms(query, protos, metric, eps):
    """Cosine: ((|q|, max(|q|,eps)) [B,Q], (|p|, max(|p|,eps)) [B,N]) in acc; else (None, None)."""
    if metric != COSINE:
        return None, None
    acc = _common.acc_dtype(query.dtype)
    out = []
    for x in (query, protos):
        nrm = torch.linalg.vector_norm(x, dim=-1, dtype=acc).contiguous()
        out.append((nrm, nrm.clamp_min(eps)))
    return out[0], out[1]


def _grads_from_coef(G, query, protos, metric, qn, pn, eps, mu):
    """grad_query, grad_protos (input dtype) from the coefficient matrix G [B,Q,N] (acc dtype)."""
    acc = G.dtype
    qa = query.to(acc)
    pa = protos.to(acc)
    if metric == SQEUCLIDEAN:
        # grad_q = G @ P - rowsum(G) q ; grad_p = G^T @ Q - colsum(G) p, on q, p centred as in
        # the forward (identical by translation invariance, and free of a large offset's
        # cancellation between the two terms)
        if mu is None:
            qc, pc = qa, pa
        else:
            qc = qa - mu.unsqueeze(1)
            pc = pa - mu.unsqueeze(1)
        rs = G.sum(dim=2).unsqueeze(-1)
        cs = G.sum(dim=1).unsqueeze(-1)
        gq = torch.baddbmm(qc * -rs, G, pc)
        gp = torch.baddbmm(pc * -cs, G.transpose(1, 2), qc)
    else:
        # grad_q = G @ P - q [|q|>eps] (scale/a^2) sum_n dL cos, where
        # scale * sum_n dL cos = q . (G @ P) (and likewise for p with G^T @ Q)
        gq = _project_out(torch.bmm(G, pa), qa, *qn, eps)
        gp = _project_out(torch.bmm(G.transpose(1, 2), qa), pa, *pn, eps)
    return gq.to(query.dtype), gp.to(protos.dtype)


def _project_out(g, x, nrm, a, eps):
    """Row-wise g - x [|x|>eps] (x . g) / max(|x|,eps)^2 (nrm = |x|, a = max(|x|,eps))."""
    coef = (x * g).sum(dim=-1) / (a * a)
    coef = torch.where(nrm > eps, coef, torch.zeros_like(coef))
    return torch.addcmul(g, x, coef.unsqueeze(-1), value=-1)


def proto_loss_bwd(grad_loss, query, protos, labels, lse, metric, scale, eps):
    """Gradients of ``sum(grad_loss * loss)`` w.r.t. query and protos (input dtype).

    ``lse`` is part of the contract but not read: the kernel recomputes each row's max and
    sum of exponentials (see ``_proto_loss_bwd_kernel``)."""
    B, Q, D = query.shape
    N = protos.shape[1]
    acc = _common.acc_dtype(query.dtype)
    if B * Q * N * D == 0:
        return (torch.zeros(query.shape, dtype=query.dtype, device=query.device),
                torch.zeros(protos.shape, dtype=protos.dtype, device=protos.device))
    query = _common.last_dim_unit_stride(query)
    protos = _common.last_dim_unit_stride(protos)
    G = torch.empty((B, Q, N), dtype=acc, device=query.device)
    scalars, mu, meta = _common_meta(query, protos, metric, scale, eps)
    qn, pn = _norms(query, protos, metric, eps)
    args = (
        query, protos, protos if mu is None else mu, labels, grad_loss,
        G if qn is None else qn[1], G if pn is None else pn[1], G,
        B, Q, N, D, _rows_bucket(B, Q),
        query.stride(0), query.stride(1), protos.stride(0), protos.stride(1),
        labels.stride(0), labels.stride(1), grad_loss.stride(0), grad_loss.stride(1),
        *scalars,
    )
    _launch_tiles(_proto_loss_bwd_kernel, args, meta, B, Q, N, False, query)
    return _grads_from_coef(G, query, protos, metric, qn, pn, eps, mu)


def proto_logits_bwd(grad_logits, query, protos, metric, scale, eps):
    """Gradients of ``sum(grad_logits * logits)`` w.r.t. query and protos (input dtype)."""
    B, Q, D = query.shape
    N = protos.shape[1]
    acc = _common.acc_dtype(query.dtype)
    if B * Q * N * D == 0:
        return (torch.zeros(query.shape, dtype=query.dtype, device=query.device),
                torch.zeros(protos.shape, dtype=protos.dtype, device=protos.device))
    G = torch.empty((B, Q, N), dtype=acc, device=query.device)
    qn, pn = _norms(query, protos, metric, eps)
    s_hi, s_lo = _common.split_f32(scale)
    block_q, block_n = _common.tile(32), _common.tile(128, N)
    grid = (B * triton.cdiv(Q, block_q) * triton.cdiv(N, block_n),)
    _proto_logits_bwd_kernel[grid](
        grad_logits, G if qn is None else qn[1], G if pn is None else pn[1], G,
        Q, N,
        grad_logits.stride(0), grad_logits.stride(1), grad_logits.stride(2),
        s_hi, s_lo,
        METRIC=int(metric), ACC_DTYPE=_common.acc_tl(query.dtype),
        BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=4,
    )
    return _grads_from_coef(G, query, protos, metric, qn, pn, eps, _center(query, protos, metric))
