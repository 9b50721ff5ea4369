"""Triton kernels for ``fastmeta.ops.gaussian_product``: the product of weighted diagonal
Gaussian factors per task (PEARL's posterior over a context, Rakelly et al. 2019).

Launchers (contract: the custom ops ``fastmeta::gaussian_product_fwd/_bwd``):

* ``gaussian_product_fwd(mu[B,C,D], var[B,C,D], weights[B,C], min_var)
  -> (mu_out[B,D], var_out[B,D])``
* ``gaussian_product_bwd(grad_mu[B,D], grad_var[B,D], mu, var, weights, mu_out, var_out,
  min_var) -> (grad_mu_in[B,C,D], grad_var_in[B,C,D])``

With ``v = max(var, min_var)`` (a negative ``var`` becomes NaN, NaN stays NaN) and ``r = w / v``
for the factors with ``w > 0`` (0 elsewhere, whatever padding holds): ``var_out = 1 / sum_c r``,
``mu_out = var_out * sum_c r * mu``.

Forward: one program per (task, block of D) walks C in blocks of ``BLOCK_C`` and reduces each
tile in registers (one read of mu and var, no atomics, a fixed summation order).
Backward: one program per (task, block of C, block of D): with ``A = grad_mu * var_out`` and
``K = var_out * (grad_var * var_out + grad_mu * mu_out)`` it writes
``grad_mu_in = r * A`` and ``grad_var_in = r / v * (K - A * mu)`` (0 where the clamp was active).

fp16/bf16 compute in fp32, fp64 in fp64; outputs have the input dtype. ``min_var`` reaches the
kernel as an fp32 (hi, lo) pair so that the fp64 clamp sees it to ~48 bits.
"""

import torch
import triton
import triton.language as tl

from . import _common


def _blocks(D: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_D): a [BLOCK_C, BLOCK_D] tile of at most 2048 fp32 / 512 fp64 values
    (16 / 4 per thread at 4 warps): fp64 tiles of 32 x 64 and 32 x 32 spilled 8-28 B on sm_80 /
    sm_90 (tools/aot_check.py; fp64 division is a called subroutine)."""
    block_d = _common.tile(128, D)
    if _common.INTERPRET:
        return 16, block_d
    budget = 512 if dtype == torch.float64 else 2048
    return min(32, budget // block_d), block_d


@triton.jit
def _factor_precision(w, v, valid, MIN_HI, MIN_LO, ACC_DTYPE: tl.constexpr):
    """(r = w / v where valid else 0, the clamped v) for a [BLOCK_C, BLOCK_D] tile."""
    min_var = tl.cast(MIN_HI, ACC_DTYPE) + tl.cast(MIN_LO, ACC_DTYPE)
    vc = tl.where(v < min_var, min_var, v)
    vc = tl.where(v < 0, float("nan"), vc)
    r = tl.where(valid, w[:, None] / vc, 0.0)
    return r, vc, min_var


@triton.jit
def _gaussian_product_fwd_kernel(
    mu_ptr, var_ptr, w_ptr, mu_out_ptr, var_out_ptr,
    C, D, MIN_HI, MIN_LO,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_db = tl.cdiv(D, BLOCK_D)
    db = pid % num_db
    b = (pid // num_db).to(tl.int64)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    prec = tl.zeros((BLOCK_D,), ACC_DTYPE)
    wmu = tl.zeros((BLOCK_D,), ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w = tl.load(w_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
        valid = (w > 0)[:, None] & mask_d[None, :]
        offs = b * C * D + offs_c.to(tl.int64)[:, None] * D + offs_d[None, :]
        v = tl.load(var_ptr + offs, mask=valid, other=1.0).to(ACC_DTYPE)
        m = tl.load(mu_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        r, _vc, _mv = _factor_precision(w, v, valid, MIN_HI, MIN_LO, ACC_DTYPE)
        prec += tl.sum(r, axis=0)
        wmu += tl.sum(tl.where(valid, r * m, 0.0), axis=0)
    var_out = 1.0 / prec
    out = b * D + offs_d
    tl.store(var_out_ptr + out, var_out.to(var_out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(mu_out_ptr + out, (wmu * var_out).to(mu_out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _gaussian_product_bwd_kernel(
    g_mu_ptr, g_var_ptr, mu_ptr, var_ptr, w_ptr, mu_out_ptr, var_out_ptr, gm_ptr, gv_ptr,
    C, D, MIN_HI, MIN_LO,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, offs_c, offs_d, mask_c, mask_d = _common.program_tile(tl.program_id(0), C, D, BLOCK_C,
                                                             BLOCK_D)

    row = b * D + offs_d
    g_mu = tl.load(g_mu_ptr + row, mask=mask_d, other=0.0).to(ACC_DTYPE)
    g_var = tl.load(g_var_ptr + row, mask=mask_d, other=0.0).to(ACC_DTYPE)
    mu_out = tl.load(mu_out_ptr + row, mask=mask_d, other=0.0).to(ACC_DTYPE)
    var_out = tl.load(var_out_ptr + row, mask=mask_d, other=0.0).to(ACC_DTYPE)
    a = g_mu * var_out  # dL/d(sum r mu)
    k = var_out * (g_var * var_out + g_mu * mu_out)  # -dL/d(sum r)

    w = tl.load(w_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    valid = (w > 0)[:, None] & mask_d[None, :]
    offs = b * C * D + offs_c.to(tl.int64)[:, None] * D + offs_d[None, :]
    v = tl.load(var_ptr + offs, mask=valid, other=1.0).to(ACC_DTYPE)
    m = tl.load(mu_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
    r, vc, min_var = _factor_precision(w, v, valid, MIN_HI, MIN_LO, ACC_DTYPE)
    gm = r * a[None, :]
    gv = tl.where(valid & (v >= min_var), r / vc * (k[None, :] - a[None, :] * m), 0.0)
    store = mask_c[:, None] & mask_d[None, :]
    tl.store(gm_ptr + offs, gm.to(gm_ptr.dtype.element_ty), mask=store)
    tl.store(gv_ptr + offs, gv.to(gv_ptr.dtype.element_ty), mask=store)


def gaussian_product_fwd(mu: torch.Tensor, var: torch.Tensor, weights: torch.Tensor, min_var: float):
    """``(mu_out[B,D], var_out[B,D])`` in ``mu.dtype``; see the module docstring."""
    B, C, D = mu.shape
    mu_out = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    var_out = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    if mu_out.numel() == 0:
        return mu_out, var_out
    block_c, block_d = _blocks(D, mu.dtype)
    hi, lo = _common.split_f32(min_var)
    grid = (B * triton.cdiv(D, block_d),)
    _gaussian_product_fwd_kernel[grid](
        mu.contiguous(), var.contiguous(), weights.to(mu.dtype).contiguous(), mu_out, var_out,
        C, D, hi, lo,
        ACC_DTYPE=_common.acc_tl(mu.dtype), BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4,
    )
    return mu_out, var_out


def gaussian_product_bwd(
    grad_mu: torch.Tensor, grad_var: torch.Tensor, mu: torch.Tensor, var: torch.Tensor,
    weights: torch.Tensor, mu_out: torch.Tensor, var_out: torch.Tensor, min_var: float,
):
    """``(grad_mu_in[B,C,D], grad_var_in[B,C,D])`` in ``mu.dtype``; see the module docstring."""
    B, C, D = mu.shape
    gm = torch.empty((B, C, D), dtype=mu.dtype, device=mu.device)
    gv = torch.empty((B, C, D), dtype=mu.dtype, device=mu.device)
    if gm.numel() == 0:
        return gm, gv
    block_c, block_d = _blocks(D, mu.dtype)
    hi, lo = _common.split_f32(min_var)
    grid = (B * triton.cdiv(C, block_c) * triton.cdiv(D, block_d),)
    _gaussian_product_bwd_kernel[grid](
        grad_mu.contiguous(), grad_var.contiguous(), mu.contiguous(), var.contiguous(),
        weights.to(mu.dtype).contiguous(), mu_out.contiguous(), var_out.contiguous(), gm, gv,
        C, D, hi, lo,
        ACC_DTYPE=_common.acc_tl(mu.dtype), BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4,
    )
    return gm, gv
