"""Triton kernel for ``fastmeta.ops.mlp_hvp``: per-task loss, gradient and exact
Hessian-vector product of a small MLP (Pearlmutter's R-operator), one program per task.

Launchers (contract: ``fastmeta.ops.mlp_hvp``; activation 0 identity, 1 relu, 2 tanh,
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
gradient. One program per task then runs the whole recursion on ``[BN, BW]`` register tiles
(``BN`` = N rounded up, >= 16): forward and R-forward layer by layer (``tl.dot`` with
``input_precision="ieee"``: no TF32), the loss and its R, backward and R-backward. The hidden
``z`` and ``R{z}`` of each layer go to a small per-task scratch buffer (``2 L BN BW``
elements, L1/L2 resident) because Triton cannot keep a variable number of tiles live across
the unrolled loop; the backward recomputes ``act(z)``, ``act'(z)``, ``act''(z)`` from it.
``L``, the activation, the loss and the block sizes are compile-time constants (one compile
per combination). Bounded by ``fastmeta.ops.mlp_hvp.TRITON_MAX_WIDTH`` / ``TRITON_MAX_N``
(larger shapes fall back to the C++/reference backends with a reason).

Precision: fp16/bf16/fp32 inputs compute in fp32, fp64 in fp64; outputs in the input dtype.
On the GPU tanh/exp/log use libdevice; the interpreter (no libdevice) uses exp-based forms.
"""

import os

import torch
import triton
import triton.language as tl

try:  # the interpreter does not implement libdevice
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


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
def _mlp_hvp_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, vw_ptr, vb_ptr, zs_ptr, rzs_ptr,
    loss_ptr, gw_ptr, gb_ptr, hw_ptr, hb_ptr,
    N, IN, OUT,
    stride_xt, stride_xn, stride_yt, stride_yn,
    L: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr, HVP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_VB: tl.constexpr, DT: tl.constexpr,
    BN: tl.constexpr, BW: tl.constexpr, PRECISE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BW)
    mask_n = rows < N
    tile = rows[:, None] * BW + cols[None, :]  # [BN, BW] scratch offsets
    w_nat = cols[:, None] * BW + cols[None, :]  # W[o, i] at o*BW + i (natural: rows o)
    w_tr = cols[None, :] * BW + cols[:, None]  # W^T: rows i, cols o

    a = tl.load(x_ptr + t * stride_xt + rows[:, None] * stride_xn + cols[None, :],
                mask=mask_n[:, None] & (cols[None, :] < IN), other=0.0).to(DT)
    ra = tl.zeros((BN, BW), DT)
    z = tl.zeros((BN, BW), DT)
    rz = tl.zeros((BN, BW), DT)

    # ---- forward + R-forward ----
    for l in tl.static_range(L):
        layer = t * L + l
        wt = tl.load(w_ptr + layer * BW * BW + w_tr)
        z = tl.dot(a, wt, input_precision="ieee", out_dtype=DT)
        if HAS_BIAS:
            z += tl.load(b_ptr + layer * BW + cols)[None, :]
        if HVP:
            vt = tl.load(vw_ptr + layer * BW * BW + w_tr)
            rz = tl.dot(a, vt, input_precision="ieee", out_dtype=DT)
            if l > 0:  # R{a_0} = 0
                rz = tl.dot(ra, wt, rz, input_precision="ieee", out_dtype=DT)
            if HAS_VB:
                rz += tl.load(vb_ptr + layer * BW + cols)[None, :]
        if l + 1 < L:
            tl.store(zs_ptr + layer * BN * BW + tile, z)
            if HVP:
                tl.store(rzs_ptr + layer * BN * BW + tile, rz)
            a, d1, _d2 = _act(z, ACT, PRECISE)
            if HVP:
                ra = d1 * rz
    tl.debug_barrier()

    # ---- loss, g = dloss/dz_L, R{g} ----
    valid = mask_n[:, None] & (cols[None, :] < OUT)
    # N or OUT may arrive as constexpr 1 (Triton specialises 1): plain arithmetic, and every
    # division by them happens in DT (the numerator is a DT tensor).
    n_f = N * 1.0
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
        if PRECISE:
            lse = m + libdevice.log(s)
        else:
            lse = m + tl.log(s)
        loss = tl.sum(tl.where(mask_n, lse - z_lab, 0.0), axis=0) / n_f
        g = tl.where(valid, (p - hit.to(DT)) / n_f, 0.0)
        if HVP:
            prz = tl.sum(p * rz, axis=1)
            rg = tl.where(valid, p * (rz - prz[:, None]) / n_f, 0.0)
    tl.store(loss_ptr + t, loss)

    # ---- backward + R-backward ----
    for i in tl.static_range(L):
        l = L - 1 - i
        layer = t * L + l
        if l == 0:
            a_prev = tl.load(x_ptr + t * stride_xt + rows[:, None] * stride_xn + cols[None, :],
                             mask=mask_n[:, None] & (cols[None, :] < IN), other=0.0).to(DT)
            ra_prev = tl.zeros((BN, BW), DT)
        else:
            zp = tl.load(zs_ptr + (layer - 1) * BN * BW + tile)
            a_prev, d1, d2 = _act(zp, ACT, PRECISE)
            if HVP:
                rzp = tl.load(rzs_ptr + (layer - 1) * BN * BW + tile)
                ra_prev = d1 * rzp
        gt = tl.trans(g)
        gw = tl.dot(gt, a_prev, input_precision="ieee", out_dtype=DT)
        tl.store(gw_ptr + layer * BW * BW + w_nat, gw)
        if HAS_BIAS:
            tl.store(gb_ptr + layer * BW + cols, tl.sum(g, axis=0))
        if HVP:
            hw = tl.dot(tl.trans(rg), a_prev, input_precision="ieee", out_dtype=DT)
            if l > 0:
                hw = tl.dot(gt, ra_prev, hw, input_precision="ieee", out_dtype=DT)
            tl.store(hw_ptr + layer * BW * BW + w_nat, hw)
            if HAS_BIAS:
                tl.store(hb_ptr + layer * BW + cols, tl.sum(rg, axis=0))
        if l > 0:
            wl = tl.load(w_ptr + layer * BW * BW + w_nat)
            da = tl.dot(g, wl, input_precision="ieee", out_dtype=DT)
            if HVP:
                vl = tl.load(vw_ptr + layer * BW * BW + w_nat)
                rda = tl.dot(rg, wl, input_precision="ieee", out_dtype=DT)
                rda = tl.dot(g, vl, rda, input_precision="ieee", out_dtype=DT)
                if ACT >= 2:
                    rg = d1 * rda + d2 * rzp * da
                else:
                    rg = d1 * rda
            g = d1 * da


def _pad_pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


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
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    BW = _pad_pow2(max([IN] + [w.shape[1] for w in weights]))
    BN = _pad_pow2(N)
    dev = x.device
    has_bias, has_vb = len(biases) > 0, hvp and len(v_b) > 0
    w = _pack(weights, T, L, BW, acc, True)
    b = _pack(biases, T, L, BW, acc, False) if has_bias else w
    vw = _pack(v_w, T, L, BW, acc, True) if hvp else w
    vb = _pack(v_b, T, L, BW, acc, False) if has_vb else w
    x = x if x.stride(-1) == 1 else x.contiguous()
    if loss == 0:
        y = y if y.stride(-1) == 1 else y.contiguous()
        sy = (y.stride(0), y.stride(1))
    else:
        sy = (y.stride(0), y.stride(1))
    # indexed by layer t*L + l like the weights (the last layer's slot is unused)
    zs = torch.empty((T, L, BN, BW), dtype=acc, device=dev)
    rzs = torch.empty_like(zs) if hvp else zs
    losses = torch.empty(T, dtype=acc, device=dev)
    gw = torch.empty((T, L, BW, BW), dtype=acc, device=dev)
    gb = torch.empty((T, L, BW), dtype=acc, device=dev) if has_bias else gw
    hw = torch.empty_like(gw) if hvp else gw
    hb = torch.empty((T, L, BW), dtype=acc, device=dev) if (hvp and has_bias) else gw
    _mlp_hvp_kernel[(T,)](
        x, y, w, b, vw, vb, zs, rzs, losses, gw, gb, hw, hb,
        N, IN, OUT, x.stride(0), x.stride(1), sy[0], sy[1],
        L=L, ACT=int(activation), LOSS=int(loss), HVP=hvp, HAS_BIAS=has_bias, HAS_VB=has_vb,
        DT=tl.float64 if acc == torch.float64 else tl.float32, BN=BN, BW=BW,
        PRECISE=(not _INTERPRET) and libdevice is not None,
        num_warps=4,
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
