"""Triton kernels for ``fastmeta/ops/_prototypes.py`` (``prototypes``): per-class means of support embeddings.

Launchers (contract: the kernel spec of the prototypes op):

* ``prototypes_fwd(support[B,S,D], labels[B,S], n_way) -> (protos[B,N,D], counts[B,N] int64)``
* ``prototypes_bwd(grad_protos[B,N,D], labels[B,S], counts[B,N]) -> grad_support[B,S,D]``

Forward: one program per (episode, class, block of D). It scans its episode's labels in
blocks of ``BLOCK_S`` and sums the rows whose label is its class with masked loads, so
memory traffic is one read of the support set, a non-finite value stays in its own class
(a one-hot matmul would spread ``0 * inf = nan`` to every class), and the sum order is fixed
(deterministic, no atomics). The same program counts the members.

Backward: one program per (episode, block of S, block of D) gathers
``grad_protos[b, labels[b,s]] / counts[b, labels[b,s]]``.

fp16/bf16 accumulate in fp32, fp64 in fp64; outputs have the input dtype.
"""

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _prototypes_fwd_kernel(
    x_ptr, lab_ptr, out_ptr, cnt_ptr,
    S, N, D,
    stride_xb, stride_xs, stride_lb, stride_ls,
    ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_db = tl.cdiv(D, BLOCK_D)
    db = pid % num_db
    bn = pid // num_db
    n = bn % N
    b = (bn // N).to(tl.int64)

    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x_base = x_ptr + b * stride_xb
    lab_base = lab_ptr + b * stride_lb

    acc = tl.zeros((BLOCK_D,), ACC_DTYPE)
    cnt = tl.zeros((BLOCK_S,), tl.int32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        lab = tl.load(lab_base + offs_s.to(tl.int64) * stride_ls, mask=mask_s, other=-1)
        hit = (lab == n) & mask_s
        cnt += hit.to(tl.int32)
        rows = tl.load(
            x_base + offs_s.to(tl.int64)[:, None] * stride_xs + offs_d[None, :],
            mask=hit[:, None] & mask_d[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        acc += tl.sum(rows, axis=0)
    count = tl.sum(cnt, axis=0)
    mean = acc / count.to(ACC_DTYPE)
    out_row = out_ptr + (b * N + n) * D
    tl.store(out_row + offs_d, mean.to(out_ptr.dtype.element_ty), mask=mask_d)
    if db == 0:
        tl.store(cnt_ptr + b * N + n, count.to(tl.int64))


@triton.jit
def _prototypes_bwd_kernel(
    g_ptr, lab_ptr, cnt_ptr, out_ptr,
    S, N, D,
    stride_gb, stride_gn, stride_lb, stride_ls, stride_cb, stride_cn,
    ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, offs_s, offs_d, mask_s, mask_d = _common.program_tile(tl.program_id(0), S, D, BLOCK_S,
                                                             BLOCK_D)
    mask = mask_s[:, None] & mask_d[None, :]

    lab = tl.load(lab_ptr + b * stride_lb + offs_s.to(tl.int64) * stride_ls, mask=mask_s, other=0)
    cnt = tl.load(cnt_ptr + b * stride_cb + lab * stride_cn, mask=mask_s, other=1)
    g = tl.load(
        g_ptr + b * stride_gb + lab[:, None] * stride_gn + offs_d[None, :], mask=mask, other=0.0
    ).to(ACC_DTYPE)
    grad = g / cnt.to(ACC_DTYPE)[:, None]
    out = out_ptr + b * S * D + offs_s.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=mask)


def prototypes_fwd(support: torch.Tensor, labels: torch.Tensor, n_way: int):
    """Per-class means: ``(protos[B,N,D] in support.dtype, counts[B,N] int64)``."""
    B, S, D = support.shape
    N = int(n_way)
    protos = torch.empty((B, N, D), dtype=support.dtype, device=support.device)
    counts = torch.empty((B, N), dtype=torch.int64, device=support.device)
    if protos.numel() == 0:
        counts.zero_()
        return protos, counts
    support = _common.last_dim_unit_stride(support)
    block_d, block_s = _common.tile(128, D), _common.tile(32)
    grid = (B * N * triton.cdiv(D, block_d),)
    _prototypes_fwd_kernel[grid](
        support, labels, protos, counts,
        S, N, D,
        support.stride(0), support.stride(1), labels.stride(0), labels.stride(1),
        ACC_DTYPE=_common.acc_tl(support.dtype), BLOCK_S=block_s, BLOCK_D=block_d,
        num_warps=4,
    )
    return protos, counts


def prototypes_bwd(grad_protos: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor):
    """``grad_support[b,s] = grad_protos[b, labels[b,s]] / counts[b, labels[b,s]]``."""
    B, N, D = grad_protos.shape
    S = labels.shape[1]
    out = torch.empty((B, S, D), dtype=grad_protos.dtype, device=grad_protos.device)
    if out.numel() == 0:
        return out
    grad_protos = _common.last_dim_unit_stride(grad_protos)
    block_d, block_s = _common.tile(128, D), _common.tile(32)
    grid = (B * triton.cdiv(S, block_s) * triton.cdiv(D, block_d),)
    _prototypes_bwd_kernel[grid](
        grad_protos, labels, counts, out,
        S, N, D,
        grad_protos.stride(0), grad_protos.stride(1), labels.stride(0), labels.stride(1),
        counts.stride(0), counts.stride(1),
        ACC_DTYPE=_common.acc_tl(grad_protos.dtype), BLOCK_S=block_s, BLOCK_D=block_d,
        num_warps=4,
    )
    return out
