"""Triton kernel for ``fastmeta/ops/_mlp_hvp.py`` (``mlp_grad``, ``mlp_grad_hvp``): per-task loss,
gradient and exact Hessian-vector product of a small MLP (Pearlmutter's R-operator), one
program per task.

Launchers (contract: ``fastmeta/ops/_mlp_hvp.py``; activation 0 identity, 1 relu, 2 tanh,
3 sigmoid; loss 0 mse, 1 cross_entropy):

* ``mlp_grad_fwd(weights[], biases[], x[T,N,in], y, activation, loss)
  -> (losses[T], grad_w[], grad_b[])``
* ``mlp_grad_hvp_fwd(weights[], biases[], x, y, v_w[], v_b[], activation, loss)
  -> (losses[T], grad_w[], grad_b[], hvp_w[], hvp_b[])``

``biases == []`` means no biases (bias outputs ``[]``); ``v_b == []`` a zero bias direction.

Layout. The launcher packs every layer of every task into one zero-padded square tile:
``W [T, L, BW, BW]`` (``BW`` = the widest layer rounded up to a power of two, >= 16 for
``tl.dot``), biases ``[T, L, BW]``, and likewise the directions. Zero padding is exact: a
padded output unit has ``z = 0`` and meets only zero weights in the next layer, and the loss
gradient is masked to the real rows (``n < N``) and outputs, so padding never reaches a real
gradient. One program per task then runs the whole recursion on ``[BN, BW]`` tiles (``BN`` =
N rounded up, >= 16): forward and R-forward layer by layer, the loss and its R, backward and
R-backward (``tl.dot`` with ``input_precision="ieee"``: no TF32).

Every product runs over ``BK`` = 16-wide chunks of its inner dimension loaded from memory:
the hidden ``z`` and ``R{z}`` of each layer go to a per-task scratch buffer (``2 L BN BW``
elements) and the current layer's ``g``, ``R{g}`` to another (``2 BN BW``), all L1/L2
resident; a layer's input ``act(z)``, ``act'(z) R{z}`` is recomputed chunk by chunk from them.
Whole-tile register operands (the first version) needed up to 255 registers per thread and
spilled up to 250 KB at BW = 64; chunked, fp32 spills nothing at any shape the backend
accepts (``tools/aot_check.py``, sm_80 and sm_90). ``tl.debug_barrier()`` orders each scratch
store before the other threads of the program read it back. ``L``, the activation, the loss
and the block sizes are compile-time constants (one compile per combination). Bounded by
``fastmeta.ops._mlp_hvp.TRITON_MAX_WIDTH`` / ``TRITON_MAX_N`` (larger shapes fall back to the
C++/reference backends with a reason).

Precision: fp16/bf16/fp32 inputs compute in fp32, fp64 in fp64; outputs in the input dtype.
On the GPU tanh/exp/log use libdevice; the interpreter (no libdevice) uses exp-based forms.
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import exp as _exp
from ._common import libdevice
from ._common import log as _log


@triton.jit
def _act(z, ACT: tl.constexpr, PRECISE: tl.constexpr):
    """(act(z), act'(z), act''(z)); act'' is only used for tanh/sigmoid."""
    if ACT == 1:  # relu
        d1 = (z > 0).to(z.dtype)
        return z * d1, d1, d1 * 0
    elif ACT == 2:  # tanh
        if PRECISE:
            a = libdevice.tanh(z)
        else:
            e = _exp(-2.0 * tl.abs(z), PRECISE)
            m = (1.0 - e) / (1.0 + e)
            a = tl.where(z < 0, -m, m)
        d1 = 1.0 - a * a
        return a, d1, -2.0 * a * d1
    elif ACT == 3:  # sigmoid
        a = 1.0 / (1.0 + _exp(-z, PRECISE))
        d1 = a * (1.0 - a)
        return a, d1, d1 * (1.0 - 2.0 * a)
    else:  # identity
        return z, z * 0 + 1.0, z * 0


@triton.jit
def _layer_input(x_ptr, zs_ptr, rzs_ptr, t, layer, rows, cols, N, IN, stride_xt, stride_xn,
                 FIRST: tl.constexpr, ACT: tl.constexpr, HVP: tl.constexpr, DT: tl.constexpr,
                 BN: tl.constexpr, BW: tl.constexpr, PRECISE: tl.constexpr):
    """The input of layer ``layer`` at [rows, cols]: (a, R{a}). The first layer reads x
    (R{x} = 0); the others recompute act(z) and act'(z) R{z} of the previous layer from the
    scratch buffers."""
    if FIRST:
        a = tl.load(x_ptr + t * stride_xt + rows[:, None] * stride_xn + cols[None, :],
                    mask=(rows < N)[:, None] & (cols < IN)[None, :], other=0.0).to(DT)
        ra = a * 0
    else:
        off = (layer - 1) * BN * BW + rows[:, None] * BW + cols[None, :]
        a, d1, _d2 = _act(tl.load(zs_ptr + off), ACT, PRECISE)
        if HVP:
            ra = d1 * tl.load(rzs_ptr + off)
        else:
            ra = a * 0
    return a, ra


@triton.jit
def _mlp_hvp_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, vw_ptr, vb_ptr, zs_ptr, rzs_ptr, gs_ptr, rgs_ptr,
    loss_ptr, gw_ptr, gb_ptr, hw_ptr, hb_ptr,
    N, IN, OUT,
    stride_xt, stride_xn, stride_yt, stride_yn,
    L: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr, HVP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_VB: tl.constexpr, DT: tl.constexpr,
    BN: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, PRECISE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BW)
    ks = tl.arange(0, BK)
    mask_n = rows < N
    tile = rows[:, None] * BW + cols[None, :]  # [BN, BW] offsets in a scratch slot
    gs = gs_ptr + t * BN * BW  # this task's g and R{g} of the current layer
    rgs = rgs_ptr + t * BN * BW

    # ---- forward + R-forward: z = a W^T + b, R{z} = a V^T + R{a} W^T (+ v_b) ----
    # Every product runs over BK-wide chunks of its inner dimension, read from memory (the
    # scratch buffers are L1/L2 resident): whole [BN, BW] x [BW, BW] register operands would
    # need hundreds of registers per thread at BW = 64 and spill.
    z = tl.zeros((BN, BW), DT)
    rz = tl.zeros((BN, BW), DT)
    for l in tl.static_range(L):
        layer = t * L + l
        z = tl.zeros((BN, BW), DT)
        rz = tl.zeros((BN, BW), DT)
        for k0 in range(0, BW, BK):
            kc = k0 + ks
            a, ra = _layer_input(x_ptr, zs_ptr + t * L * BN * BW, rzs_ptr + t * L * BN * BW,
                                 t, l, rows, kc, N, IN, stride_xt, stride_xn,
                                 l == 0, ACT, HVP, DT, BN, BW, PRECISE)
            wt = tl.load(w_ptr + layer * BW * BW + cols[None, :] * BW + kc[:, None])  # W^T chunk
            z = tl.dot(a, wt, z, input_precision="ieee", out_dtype=DT)
            if HVP:
                vt = tl.load(vw_ptr + layer * BW * BW + cols[None, :] * BW + kc[:, None])
                rz = tl.dot(a, vt, rz, input_precision="ieee", out_dtype=DT)
                if l > 0:  # R{a_0} = 0
                    rz = tl.dot(ra, wt, rz, input_precision="ieee", out_dtype=DT)
        if HAS_BIAS:
            z += tl.load(b_ptr + layer * BW + cols)[None, :]
        if HVP and HAS_VB:
            rz += tl.load(vb_ptr + layer * BW + cols)[None, :]
        if l + 1 < L:
            tl.store(zs_ptr + layer * BN * BW + tile, z)
            if HVP:
                tl.store(rzs_ptr + layer * BN * BW + tile, rz)
            tl.debug_barrier()  # the next layer reads them back in chunks

    # ---- loss, g = dloss/dz_L, R{g} ----
    valid = mask_n[:, None] & (cols[None, :] < OUT)
    # N or OUT may arrive as constexpr 1 (Triton specialises 1): plain arithmetic, and every
    # division by them happens in DT (the numerator is a DT tensor).
    n_f = N * 1.0
    rg = tl.zeros((BN, BW), DT)
    if LOSS == 0:
        yv = tl.load(y_ptr + t * stride_yt + rows[:, None] * stride_yn + cols[None, :],
                     mask=valid, other=0.0).to(DT)
        diff = tl.where(valid, z - yv, 0.0)
        denom = n_f * OUT
        loss = tl.sum(tl.sum(diff * diff, axis=1), axis=0) / denom
        g = diff * 2.0 / denom
        if HVP:
            rg = tl.where(valid, rz * 2.0 / denom, 0.0)
    else:
        lab = tl.load(y_ptr + t * stride_yt + rows * stride_yn, mask=mask_n, other=0)
        logits = tl.where(cols[None, :] < OUT, z, float("-inf"))
        m = tl.max(logits, axis=1)
        e = _exp(logits - m[:, None], PRECISE)
        s = tl.sum(e, axis=1)
        p = e / s[:, None]
        hit = cols[None, :] == lab[:, None]
        z_lab = tl.sum(tl.where(hit, z, 0.0), axis=1)
        lse = m + _log(s, PRECISE)
        loss = tl.sum(tl.where(mask_n, lse - z_lab, 0.0), axis=0) / n_f
        g = tl.where(valid, (p - hit.to(DT)) / n_f, 0.0)
        if HVP:
            prz = tl.sum(p * rz, axis=1)
            rg = tl.where(valid, p * (rz - prz[:, None]) / n_f, 0.0)
    tl.store(loss_ptr + t, loss)

    # ---- backward + R-backward, layer by layer from the last ----
    # l must be the loop variable itself: an index computed from it (L - 1 - i) is a runtime
    # value in Triton 3.6, which turns `if l == 0` into a runtime branch and drops the names
    # bound in only one of its arms (NameError at compile time on the GPU; the interpreter,
    # being Python, never noticed).
    for l in tl.static_range(L - 1, -1, -1):
        layer = t * L + l
        if HAS_BIAS:
            tl.store(gb_ptr + layer * BW + cols, tl.sum(g, axis=0))
            if HVP:
                tl.store(hb_ptr + layer * BW + cols, tl.sum(rg, axis=0))
        # publish g, R{g}: the products below read them in chunks
        tl.store(gs + tile, g)
        if HVP:
            tl.store(rgs + tile, rg)
        tl.debug_barrier()

        # grad W = g^T a_prev; hvp W = R{g}^T a_prev + g^T R{a_prev} (chunks of rows)
        gw = tl.zeros((BW, BW), DT)
        hw = tl.zeros((BW, BW), DT)
        for n0 in range(0, BN, BK):
            nr = n0 + ks
            a, ra = _layer_input(x_ptr, zs_ptr + t * L * BN * BW, rzs_ptr + t * L * BN * BW,
                                 t, l, nr, cols, N, IN, stride_xt, stride_xn,
                                 l == 0, ACT, HVP, DT, BN, BW, PRECISE)
            gt = tl.load(gs + nr[None, :] * BW + cols[:, None])  # g^T chunk [BW, BK]
            gw = tl.dot(gt, a, gw, input_precision="ieee", out_dtype=DT)
            if HVP:
                rgt = tl.load(rgs + nr[None, :] * BW + cols[:, None])
                hw = tl.dot(rgt, a, hw, input_precision="ieee", out_dtype=DT)
                if l > 0:
                    hw = tl.dot(gt, ra, hw, input_precision="ieee", out_dtype=DT)
        w_nat = cols[:, None] * BW + cols[None, :]  # W[o, i] at o*BW + i
        tl.store(gw_ptr + layer * BW * BW + w_nat, gw)
        if HVP:
            tl.store(hw_ptr + layer * BW * BW + w_nat, hw)

        if l > 0:
            # da = g W; R{da} = R{g} W + g V (chunks of output units)
            da = tl.zeros((BN, BW), DT)
            rda = tl.zeros((BN, BW), DT)
            for o0 in range(0, BW, BK):
                oc = o0 + ks
                gc = tl.load(gs + rows[:, None] * BW + oc[None, :])
                wl = tl.load(w_ptr + layer * BW * BW + oc[:, None] * BW + cols[None, :])
                da = tl.dot(gc, wl, da, input_precision="ieee", out_dtype=DT)
                if HVP:
                    rgc = tl.load(rgs + rows[:, None] * BW + oc[None, :])
                    vl = tl.load(vw_ptr + layer * BW * BW + oc[:, None] * BW + cols[None, :])
                    rda = tl.dot(rgc, wl, rda, input_precision="ieee", out_dtype=DT)
                    rda = tl.dot(gc, vl, rda, input_precision="ieee", out_dtype=DT)
            prev = (layer - 1) * BN * BW + tile
            _a, d1, d2 = _act(tl.load(zs_ptr + prev), ACT, PRECISE)
            if HVP:
                if ACT >= 2:
                    rg = d1 * rda + d2 * tl.load(rzs_ptr + prev) * da
                else:
                    rg = d1 * rda
            g = d1 * da
            tl.debug_barrier()  # every chunk of gs read before the next layer overwrites it


def _num_warps(BN: int, BW: int) -> int:
    # The [BW, BW] weight-gradient accumulators and the [BN, BW] tiles set the register need:
    # 8 warps from 64 rows or units (ptxas -v via tools/aot_check.py, sm_80/sm_90: fp32 spills
    # nothing up to BN = BW = 64; 16 warps make fp64 worse, ptxas then caps at 64 registers).
    return 8 if BW >= 64 or BN >= 64 else 4


def _pack(ts, T, L, BW, acc, matrix):
    shape = (T, L, BW, BW) if matrix else (T, L, BW)
    out = torch.zeros(shape, dtype=acc, device=ts[0].device)
    for l, t in enumerate(ts):
        if matrix:
            out[:, l, : t.shape[1], : t.shape[2]] = t
        else:
            out[:, l, : t.shape[1]] = t
    return out


def _unpack(buf, like, matrix):
    # fresh contiguous tensors: outputs of a custom op must not alias each other
    if matrix:
        views = [buf[:, l, : t.shape[1], : t.shape[2]] for l, t in enumerate(like)]
    else:
        views = [buf[:, l, : t.shape[1]] for l, t in enumerate(like)]
    return [v.to(t.dtype, memory_format=torch.contiguous_format, copy=True)
            for v, t in zip(views, like)]


def _launch(weights, biases, x, y, v_w, v_b, activation, loss, hvp):
    weights, biases, v_w, v_b = list(weights), list(biases), list(v_w), list(v_b)
    T, N, IN = x.shape
    L = len(weights)
    OUT = weights[-1].shape[1]
    acc = _common.acc_dtype(x.dtype)
    BW = _common.pow2_at_least_16(max([IN] + [w.shape[1] for w in weights]))
    BN = _common.pow2_at_least_16(N)
    dev = x.device
    has_bias, has_vb = len(biases) > 0, hvp and len(v_b) > 0
    w = _pack(weights, T, L, BW, acc, True)
    b = _pack(biases, T, L, BW, acc, False) if has_bias else w
    vw = _pack(v_w, T, L, BW, acc, True) if hvp else w
    vb = _pack(v_b, T, L, BW, acc, False) if has_vb else w
    x = x if x.stride(-1) == 1 else x.contiguous()
    if loss == 0:
        y = y if y.stride(-1) == 1 else y.contiguous()
    # z and R{z} per layer, indexed by t*L + l like the weights (the last layer's slot is
    # unused); g and R{g} of the layer being differentiated
    zs = torch.empty((T, L, BN, BW), dtype=acc, device=dev)
    rzs = torch.empty_like(zs) if hvp else zs
    gs = torch.empty((T, BN, BW), dtype=acc, device=dev)
    rgs = torch.empty_like(gs) if hvp else gs
    losses = torch.empty(T, dtype=acc, device=dev)
    gw = torch.empty((T, L, BW, BW), dtype=acc, device=dev)
    gb = torch.empty((T, L, BW), dtype=acc, device=dev) if has_bias else gw
    hw = torch.empty_like(gw) if hvp else gw
    hb = torch.empty((T, L, BW), dtype=acc, device=dev) if (hvp and has_bias) else gw
    _mlp_hvp_kernel[(T,)](
        x, y, w, b, vw, vb, zs, rzs, gs, rgs, losses, gw, gb, hw, hb,
        N, IN, OUT, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        L=L, ACT=int(activation), LOSS=int(loss), HVP=hvp, HAS_BIAS=has_bias, HAS_VB=has_vb,
        DT=_common.acc_tl(x.dtype), BN=BN, BW=BW, BK=16, PRECISE=_common.HAS_LIBDEVICE,
        num_warps=_num_warps(BN, BW),
    )
    out = [losses.to(x.dtype), _unpack(gw, weights, True),
           _unpack(gb, biases, False) if has_bias else []]
    if hvp:
        out += [_unpack(hw, weights, True), _unpack(hb, biases, False) if has_bias else []]
    return tuple(out)


def mlp_grad_fwd(weights, biases, x, y, activation, loss):
    """Per-task ``(losses [T], grad_w[], grad_b[])`` (see the module docstring)."""
    return _launch(weights, biases, x, y, [], [], activation, loss, hvp=False)


def mlp_grad_hvp_fwd(weights, biases, x, y, v_w, v_b, activation, loss):
    """Per-task ``(losses [T], grad_w[], grad_b[], hvp_w[], hvp_b[])``."""
    return _launch(weights, biases, x, y, v_w, v_b, activation, loss, hvp=True)
