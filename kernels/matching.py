"""Triton kernels for ``fastmeta/ops/_matching.py`` (``matching_attention``, ``matching_loss``): Matching Networks attention and its fused loss.

Launchers (contract: the kernel spec of the matching op; all per-row results in acc dtype):

* ``matching_fwd(query[B,Q,D], support[B,S,D], labels[B,S], n_way, scale, eps)
  -> (logp[B,Q,N], lse[B,Q])``
* ``matching_bwd(grad_logp[B,Q,N], query, support, labels, logp, lse, n_way, scale, eps)
  -> (grad_query, grad_support)``
* ``matching_loss_fwd(query, support, labels, query_labels[B,Q], n_way, scale, eps)
  -> (loss[B,Q], lse[B,Q], pred[B,Q])``
* ``matching_loss_bwd(grad_loss[B,Q], query, support, labels, query_labels, loss, lse, n_way,
  scale, eps) -> (grad_query, grad_support)``

Cosine. Query and support rows are normalised once (``x / max(|x|, eps)``, torch, acc dtype);
the kernels take the normalised copies, so a logit is ``scale * qn . sn`` (``tl.dot`` over D in
``BLOCK_D`` chunks). The normalisation backward ``(g - [|x|>eps] xn (xn . g)) / max(|x|, eps)``
is plain torch.

Forward (``_matching_fwd_kernel``): one program per (episode, block of queries, block of
classes) walks the support set in ``BLOCK_S`` blocks with an online, *per-class* log-sum-exp:
running max ``cm[q, n]`` and sum ``cs[q, n]`` of ``exp(l - cm)`` over the support examples of
class n (a ``[BLOCK_Q, BLOCK_S, BLOCK_N]`` masked tile per step), and writes ``cm`` and ``cs``
``[B,Q,N]``. ``[B,Q,N]`` torch ops finish: ``m = max_n cm``, ``tot = sum_n cs exp(cm - m)``,
``logp = (cm - m) + (log cs - log tot)`` (finite for any class with an example however small
its attention, and free of the rounding of ``|lse|``), ``lse = m + log tot``. Nothing
``[B,Q,S]`` exists in the forward. With more than ``BLOCK_N`` classes the similarity tiles are
recomputed once per class block (fine for few-shot N; the large-N case would want a different
scheme).

Backward: the forward kernel runs again for ``cm``, ``cs`` (the saved lse/logp are not read),
``k[q, n] = scale * (dY_n / cs_n - (sum dY) exp(cm_n - m) / tot)`` is a [B,Q,N] torch op, and
``_matching_bwd_kernel`` (one program per (episode, Q block, S block)) recomputes its similarity
tile and writes ``G = exp(l - cm[q, c_s]) * k[q, c_s]`` (class values gathered by label) into a
``[B,Q,S]`` buffer that lives only during the backward, as proto_loss's ``[B,Q,N]`` one; then
two batched GEMMs (cuBLAS on the GPU) give ``G @ Sn`` and ``G^T @ Qn``. The loss backward is
the same with ``dY = -grad_loss onehot(y)``.

Precision: acc is fp32 for fp16/bf16/fp32 and fp64 for fp64. The normalised copies are in acc,
so fp16/bf16 dots run in fp32 (the interpreter cannot do bf16 arithmetic anyway). fp32 dots use
``input_precision="ieee"`` unless torch's fp32 CUDA matmuls may use TF32 (then tf32, like
cuBLAS), the rule of ``kernels/proto_loss.py``. Python floats reach the kernels as an fp32
(hi, lo) pair summed in acc. Offsets into [B,Q,*] buffers are int64.
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import exp as _exp


def _blocks(N: int, D: int) -> dict:
    # One config under the interpreter (autotune cannot run there); all dims >= 16 for tl.dot.
    if _common.INTERPRET:
        return {"BLOCK_Q": 16, "BLOCK_S": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 4}
    # The forward's masked [BLOCK_Q, BLOCK_S, BLOCK_N] tile is the register budget: 4K or 8K
    # elements. Untuned (no GPU was available when this was written).
    bn = 16 if N <= 16 else 32
    bd = _common.tile(64, D)
    return {"BLOCK_Q": 16, "BLOCK_S": 16, "BLOCK_N": bn, "BLOCK_D": bd,
            "num_warps": 4 if bn == 16 else 8}


def _normalized(x: torch.Tensor, eps: float):
    """(x / max(|x|, eps), |x|) in acc dtype, contiguous."""
    xa = x.to(_common.acc_dtype(x.dtype))
    nrm = torch.linalg.vector_norm(xa, dim=-1)
    return (xa / nrm.clamp_min(eps).unsqueeze(-1)).contiguous(), nrm


def _normalize_bwd(g, xn, nrm, eps):
    coef = (xn * g).sum(-1)
    coef = torch.where(nrm > eps, coef, torch.zeros_like(coef))
    return (g - xn * coef.unsqueeze(-1)) / nrm.clamp_min(eps).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _sim_tile(q_base, s_base, offs_q, offs_s, Q, S, D,
              BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """qn . sn tile [BLOCK_Q, BLOCK_S] (rows of D contiguous); padded entries are 0."""
    q_rows = q_base + offs_q.to(tl.int64)[:, None] * D
    s_rows = s_base + offs_s.to(tl.int64)[:, None] * D
    mq = offs_q < Q
    ms = offs_s < S
    acc = tl.zeros((BLOCK_Q, BLOCK_S), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        q = tl.load(q_rows + offs_d[None, :], mask=mq[:, None] & md[None, :], other=0.0)
        s = tl.load(s_rows + offs_d[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        acc = tl.dot(q, tl.trans(s), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _matching_fwd_kernel(
    q_ptr, s_ptr, lab_ptr, cm_ptr, cs_ptr,
    Q, S, N, D,
    scale_hi, scale_lo,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nb = tl.program_id(1)
    num_qb = tl.cdiv(Q, BLOCK_Q)
    b = (pid // num_qb).to(tl.int64)
    qb = pid % num_qb
    scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    q_base = q_ptr + b * Q * D
    s_base = s_ptr + b * S * D

    cm = tl.full((BLOCK_Q, BLOCK_N), float("-inf"), ACC_DTYPE)  # per-class running max
    cs = tl.zeros((BLOCK_Q, BLOCK_N), ACC_DTYPE)  # per-class sum of exp(l - cm)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lab = tl.load(lab_ptr + b * S + offs_s, mask=offs_s < S, other=-1)
        onehot = lab[:, None] == offs_n[None, :]  # [BS, BN]; padded s match nothing
        l = scale * _sim_tile(q_base, s_base, offs_q, offs_s, Q, S, D, BLOCK_Q, BLOCK_S, BLOCK_D,
                              INPUT_PRECISION, ACC_DTYPE)
        l3 = tl.where(onehot[None, :, :], l[:, :, None], float("-inf"))  # [BQ, BS, BN]
        m_new = tl.maximum(cm, tl.max(l3, axis=1))
        # a class not seen yet has max -inf: shift by 0 there (its terms are all masked)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        # masked before exp(): another class's entries may lie far above this class's max
        p = _exp(tl.where(onehot[None, :, :], l[:, :, None] - shift[:, None, :], float("-inf")),
                 PRECISE)
        cs = cs * _exp(cm - shift, PRECISE) + tl.sum(p, axis=1)
        cm = m_new
    out = (b * Q + offs_q.to(tl.int64))[:, None] * N + offs_n[None, :]
    mask = (offs_q < Q)[:, None] & (offs_n < N)[None, :]
    tl.store(cm_ptr + out, cm, mask=mask)  # -inf (and cs 0) for a class without examples
    tl.store(cs_ptr + out, cs, mask=mask)


@triton.jit
def _matching_bwd_kernel(
    q_ptr, s_ptr, lab_ptr, cm_ptr, k_ptr, g_ptr,
    Q, S, N, D,
    scale_hi, scale_lo,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """G[q, s] = exp(l - cm[q, c_s]) * k[q, c_s] (class values gathered by label)."""
    pid = tl.program_id(0)
    sb = tl.program_id(1)
    num_qb = tl.cdiv(Q, BLOCK_Q)
    b = (pid // num_qb).to(tl.int64)
    qb = pid % num_qb
    scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mq = offs_q < Q
    ms = offs_s < S
    l = scale * _sim_tile(q_ptr + b * Q * D, s_ptr + b * S * D, offs_q, offs_s, Q, S, D,
                          BLOCK_Q, BLOCK_S, BLOCK_D, INPUT_PRECISION, ACC_DTYPE)
    rows = b * Q + offs_q.to(tl.int64)
    lab = tl.load(lab_ptr + b * S + offs_s, mask=ms, other=0)
    m2 = mq[:, None] & ms[None, :]
    cls = rows[:, None] * N + lab[None, :]
    # padded entries: cm = +inf makes their exp() 0 instead of overflowing
    cmc = tl.load(cm_ptr + cls, mask=m2, other=float("inf"))
    kc = tl.load(k_ptr + cls, mask=m2, other=0.0)
    g = tl.where(m2, _exp(l - cmc, PRECISE) * kc, 0.0)
    tl.store(g_ptr + rows[:, None] * S + offs_s[None, :], g, mask=m2)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _meta(query):
    return {
        "INPUT_PRECISION": _common.input_precision(query.dtype, query.device),
        "ACC_DTYPE": _common.acc_tl(query.dtype),
        "PRECISE": _common.precise(query.dtype),
    }


def _class_stats(query, support, labels, n_way, scale, eps):
    """Per-class max cm and sum cs of exp(l - cm) [B,Q,N] (acc), m = max_n cm and
    tot = sum_n cs exp(cm - m) [B,Q], plus the normalised inputs and their norms."""
    B, Q, D = query.shape
    S = support.shape[1]
    qn, qnrm = _normalized(query, eps)
    sn, snrm = _normalized(support, eps)
    lab = labels.contiguous()
    cm = torch.empty((B, Q, n_way), dtype=qn.dtype, device=query.device)
    cs = torch.empty_like(cm)
    blk = _blocks(n_way, D)
    grid = (B * triton.cdiv(Q, blk["BLOCK_Q"]), triton.cdiv(n_way, blk["BLOCK_N"]))
    _matching_fwd_kernel[grid](qn, sn, lab, cm, cs, Q, S, n_way, D, *_common.split_f32(scale),
                               **_meta(query), **blk)
    m = cm.amax(-1)
    tot = (cs * torch.exp(cm - m.unsqueeze(-1))).sum(-1)  # cs = 0 where cm = -inf
    return cm, cs, m, tot, (qn, qnrm, sn, snrm, lab)


def _logp(cm, cs, m, tot):
    # (cm - m) + (log cs - log tot): no rounding of |lse| (up to |scale| + log S) in the result
    return (cm - m.unsqueeze(-1)) + (torch.log(cs) - torch.log(tot).unsqueeze(-1))


def matching_fwd(query, support, labels, n_way, scale, eps):
    """Returns ``(logp[B,Q,N], lse[B,Q])`` in acc dtype."""
    cm, cs, m, tot, _ = _class_stats(query, support, labels, n_way, scale, eps)
    return _logp(cm, cs, m, tot), m + torch.log(tot)


def matching_loss_fwd(query, support, labels, query_labels, n_way, scale, eps):
    """Returns ``(loss[B,Q], lse[B,Q], pred[B,Q] int64)``; loss, lse in acc dtype."""
    cm, cs, m, tot, _ = _class_stats(query, support, labels, n_way, scale, eps)
    logp = _logp(cm, cs, m, tot)
    loss = -logp.gather(-1, query_labels.unsqueeze(-1)).squeeze(-1)
    return loss, m + torch.log(tot), logp.argmax(-1)


def _grads(query, support, labels, n_way, scale, eps, dy):
    """Gradients (input dtype) from dY = d/d logp [B,Q,N] (acc). The class statistics are
    recomputed (the forward kernel again) rather than taken from the saved lse/logp, whose
    differences would carry the rounding of |lse|:
    dl_s = exp(l_s - cm[c_s]) k[c_s] with k[n] = dY_n / cs_n - (sum dY) exp(cm_n - m) / tot."""
    B, Q, D = query.shape
    S = support.shape[1]
    cm, cs, m, tot, (qn, qnrm, sn, snrm, lab) = _class_stats(query, support, labels, n_way, scale, eps)
    sdy = dy.sum(-1, keepdim=True)
    k = dy / cs - (sdy / tot.unsqueeze(-1)) * torch.exp(cm - m.unsqueeze(-1))
    k = scale * torch.where(cs > 0, k, torch.zeros_like(k))
    G = torch.empty((B, Q, S), dtype=qn.dtype, device=query.device)
    blk = _blocks(n_way, D)
    blk.pop("BLOCK_N")
    grid = (B * triton.cdiv(Q, blk["BLOCK_Q"]), triton.cdiv(S, blk["BLOCK_S"]))
    _matching_bwd_kernel[grid](qn, sn, lab, cm, k.contiguous(), G,
                               Q, S, n_way, D, *_common.split_f32(scale), **_meta(query), **blk)
    gq = _normalize_bwd(torch.bmm(G, sn), qn, qnrm, eps)
    gs = _normalize_bwd(torch.bmm(G.transpose(1, 2), qn), sn, snrm, eps)
    return gq.to(query.dtype), gs.to(support.dtype)


def matching_bwd(grad_logp, query, support, labels, logp, lse, n_way, scale, eps):
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. query and support (input dtype).
    ``logp`` and ``lse`` are part of the contract but not read (see ``_grads``)."""
    acc = _common.acc_dtype(query.dtype)
    return _grads(query, support, labels, n_way, scale, eps, grad_logp.to(acc))


def matching_loss_bwd(grad_loss, query, support, labels, query_labels, loss, lse, n_way, scale,
                      eps):
    """Gradients of ``sum(grad_loss * loss)`` w.r.t. query and support (input dtype).
    ``loss`` and ``lse`` are part of the contract but not read (see ``_grads``)."""
    B, Q = query_labels.shape
    acc = _common.acc_dtype(query.dtype)
    dy = torch.zeros((B, Q, n_way), dtype=acc, device=query.device)
    dy.scatter_(-1, query_labels.unsqueeze(-1), -grad_loss.to(acc).unsqueeze(-1))
    return _grads(query, support, labels, n_way, scale, eps, dy)
