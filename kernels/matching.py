"""Triton kernels for ``fastmeta.ops.matching``: Matching Networks attention and its fused loss.

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
class n (a ``[BLOCK_Q, BLOCK_S, BLOCK_N]`` masked tile per step). It writes
``lse_class[B,Q,N] = cm + log(cs)``, finite for any class with an example however small its
attention; ``lse = logsumexp_n(lse_class)`` and ``logp = lse_class - lse`` are [B,Q,N] torch
ops. Nothing ``[B,Q,S]`` exists in the forward. With more than ``BLOCK_N`` classes the
similarity tiles are recomputed once per class block (fine for few-shot N; the large-N case
would want a two-pass scheme).

Backward (``_matching_bwd_kernel``): one program per (episode, Q block, S block) recomputes
its similarity tile and writes the coefficient tile
``G = scale * (dY[q, c_s] exp(l - lse_class[q, c_s]) - (sum_n dY[q, n]) exp(l - lse[q]))`` (the
class values gathered by label) into a ``[B,Q,S]`` buffer that lives only during the backward,
as proto_loss's ``[B,Q,N]`` one; then two batched GEMMs (cuBLAS on the GPU) give
``G @ Sn`` and ``G^T @ Qn``. The loss backward is the same with ``dY = -grad_loss onehot(y)``
and ``lse_class[y] = lse - loss``.

Precision: acc is fp32 for fp16/bf16/fp32 and fp64 for fp64. The normalised copies are in acc,
so fp16/bf16 dots run in fp32 (the interpreter cannot do bf16 arithmetic anyway). fp32 dots use
``input_precision="ieee"`` unless torch's fp32 CUDA matmuls may use TF32 (then tf32, like
cuBLAS), the rule of ``kernels/proto_loss.py``. Python floats reach the kernels as an fp32
(hi, lo) pair summed in acc. Offsets into [B,Q,*] buffers are int64.
"""

import os

import torch
import triton
import triton.language as tl

from fastmeta.kernels.proto_loss import _exp, _input_precision, _log, _split_f32

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _blocks(N: int, D: int) -> dict:
    # One config under the interpreter (autotune cannot run there); all dims >= 16 for tl.dot.
    if _INTERPRET:
        return {"BLOCK_Q": 16, "BLOCK_S": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 4}
    # The forward's masked [BLOCK_Q, BLOCK_S, BLOCK_N] tile is the register budget: 4K or 8K
    # elements. Untuned (no GPU was available when this was written).
    bn = 16 if N <= 16 else 32
    bd = max(16, min(64, triton.next_power_of_2(D)))
    return {"BLOCK_Q": 16, "BLOCK_S": 16, "BLOCK_N": bn, "BLOCK_D": bd,
            "num_warps": 4 if bn == 16 else 8}


def _normalized(x: torch.Tensor, eps: float):
    """(x / max(|x|, eps), |x|) in acc dtype, contiguous."""
    xa = x.to(_acc_dtype(x.dtype))
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
    q_ptr, s_ptr, lab_ptr, lsec_ptr,
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
        p = tl.where(onehot[None, :, :], _exp(l[:, :, None] - shift[:, None, :], PRECISE), 0.0)
        cs = cs * _exp(cm - shift, PRECISE) + tl.sum(p, axis=1)
        cm = m_new
    # -inf only for a class without support examples (cm = -inf, cs = 0: log(1) keeps it -inf)
    lsec = cm + _log(tl.where(cs > 0, cs, 1.0), PRECISE)
    out = (b * Q + offs_q.to(tl.int64))[:, None] * N + offs_n[None, :]
    tl.store(lsec_ptr + out, lsec, mask=(offs_q < Q)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _matching_bwd_kernel(
    q_ptr, s_ptr, lab_ptr, dy_ptr, lsec_ptr, lse_ptr, sdy_ptr, g_ptr,
    Q, S, N, D,
    scale_hi, scale_lo,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
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
    cls = rows[:, None] * N + lab[None, :]  # gather [q, label_s]
    dyc = tl.load(dy_ptr + cls, mask=m2, other=0.0)
    # padded entries: +inf makes their exp() 0 instead of overflowing
    lsc = tl.load(lsec_ptr + cls, mask=m2, other=float("inf"))
    lse = tl.load(lse_ptr + rows, mask=mq, other=float("inf"))
    sdy = tl.load(sdy_ptr + rows, mask=mq, other=0.0)
    g = dyc * _exp(l - lsc, PRECISE) - sdy[:, None] * _exp(l - lse[:, None], PRECISE)
    g = tl.where(m2, scale * g, 0.0)
    tl.store(g_ptr + rows[:, None] * S + offs_s[None, :], g, mask=m2)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _meta(query):
    acc = _acc_dtype(query.dtype)
    return {
        "INPUT_PRECISION": _input_precision(query.dtype, query.device),
        "ACC_DTYPE": _tl_acc(acc),
        "PRECISE": (not _INTERPRET) and query.dtype == torch.float64,
    }


def _class_lse(query, support, labels, n_way, scale, eps):
    """lse_class [B,Q,N] (acc), the normalised inputs and their norms."""
    B, Q, D = query.shape
    S = support.shape[1]
    qn, qnrm = _normalized(query, eps)
    sn, snrm = _normalized(support, eps)
    lab = labels.contiguous()
    lsec = torch.empty((B, Q, n_way), dtype=qn.dtype, device=query.device)
    blk = _blocks(n_way, D)
    grid = (B * triton.cdiv(Q, blk["BLOCK_Q"]), triton.cdiv(n_way, blk["BLOCK_N"]))
    _matching_fwd_kernel[grid](qn, sn, lab, lsec, Q, S, n_way, D, *_split_f32(scale),
                               **_meta(query), **blk)
    return lsec, (qn, qnrm, sn, snrm, lab)


def matching_fwd(query, support, labels, n_way, scale, eps):
    """Returns ``(logp[B,Q,N], lse[B,Q])`` in acc dtype."""
    lsec, _ = _class_lse(query, support, labels, n_way, scale, eps)
    lse = torch.logsumexp(lsec, dim=-1)
    return lsec - lse.unsqueeze(-1), lse


def matching_loss_fwd(query, support, labels, query_labels, n_way, scale, eps):
    """Returns ``(loss[B,Q], lse[B,Q], pred[B,Q] int64)``; loss, lse in acc dtype."""
    lsec, _ = _class_lse(query, support, labels, n_way, scale, eps)
    lse = torch.logsumexp(lsec, dim=-1)
    loss = lse - lsec.gather(-1, query_labels.unsqueeze(-1)).squeeze(-1)
    return loss, lse, lsec.argmax(-1)


def _grads(query, support, labels, n_way, scale, eps, dy, lsec, lse):
    """Gradients (input dtype) from dY = d/d logp, lse_class and lse, all [B,Q,*] acc."""
    B, Q, D = query.shape
    S = support.shape[1]
    qn, qnrm = _normalized(query, eps)
    sn, snrm = _normalized(support, eps)
    dy = dy.contiguous()
    lsec = lsec.contiguous()
    lse = lse.contiguous()
    sdy = dy.sum(-1).contiguous()
    G = torch.empty((B, Q, S), dtype=qn.dtype, device=query.device)
    blk = _blocks(n_way, D)
    blk.pop("BLOCK_N")
    grid = (B * triton.cdiv(Q, blk["BLOCK_Q"]), triton.cdiv(S, blk["BLOCK_S"]))
    _matching_bwd_kernel[grid](qn, sn, labels.contiguous(), dy, lsec, lse, sdy, G,
                               Q, S, n_way, D, *_split_f32(scale), **_meta(query), **blk)
    gq = _normalize_bwd(torch.bmm(G, sn), qn, qnrm, eps)
    gs = _normalize_bwd(torch.bmm(G.transpose(1, 2), qn), sn, snrm, eps)
    return gq.to(query.dtype), gs.to(support.dtype)


def matching_bwd(grad_logp, query, support, labels, logp, lse, n_way, scale, eps):
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. query and support (input dtype)."""
    lsec = logp + lse.unsqueeze(-1)
    return _grads(query, support, labels, n_way, scale, eps, grad_logp.to(logp.dtype), lsec, lse)


def matching_loss_bwd(grad_loss, query, support, labels, query_labels, loss, lse, n_way, scale,
                      eps):
    """Gradients of ``sum(grad_loss * loss)`` w.r.t. query and support (input dtype)."""
    B, Q = query_labels.shape
    y = query_labels.unsqueeze(-1)
    dy = torch.zeros((B, Q, n_way), dtype=lse.dtype, device=lse.device)
    dy.scatter_(-1, y, -grad_loss.to(lse.dtype).unsqueeze(-1))
    # only lse_class[y] is read with a non-zero dY; lse elsewhere keeps exp() in range
    lsec = lse.unsqueeze(-1).expand(B, Q, n_way).clone()
    lsec.scatter_(-1, y, (lse - loss).unsqueeze(-1))
    return _grads(query, support, labels, n_way, scale, eps, dy, lsec, lse)
