"""Hand-written autograd Functions of the task-batched layers (:mod:`fastmeta.nn.task`): the
per-task weight gradient in the weight's own layout (linear), and closed-form or grouped double
backwards (convolution, training-mode batch norm, max-pool) for second-order MAML. Each is
checked by gradcheck / gradgradcheck in float64 (``tests/test_task_nn.py``,
``tests/test_task_formats.py``). The layers choose when to use them (plain PyTorch ops serve
under torch.func transforms and forward-mode AD where a Function has no rule).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastmeta import _ext

__all__ = [
    "BatchNormTrainBackwardFunction",
    "BatchNormTrainFunction",
    "GroupedConvBackwardFunction",
    "GroupedConvFunction",
    "MaxPool2dBackwardFunction",
    "MaxPool2dFunction",
    "TaskLinearFunction",
    "batch_norm_train",
    "like_format",
    "pair",
]


class TaskLinearFunction(torch.autograd.Function):
    """``x [T, N, in] @ w[t]^T + b[t]`` with the weight gradient made in the weight's own layout.

    Autograd's formula for ``bmm(x, w.transpose(1, 2))`` returns ``dw`` as a transposed view of a
    ``[T, in, out]`` tensor, and it computes it from a transposed view of ``x``; every later op
    on it (the inner update ``theta - lr * dw``, the sum over tasks into the shared parameter)
    then walks memory with a stride (measured: ``bench/results/design_notes.md``). Here
    ``dw = (g^T, made contiguous) @ x`` comes out
    contiguous ``[T, out, in]``. The backward is plain differentiable ops, so double backward
    (second-order MAML, Hessian-vector products) works through it.
    """

    @staticmethod
    def forward(x, w, b):
        wt = w.transpose(1, 2)
        return torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.has_bias = b is not None

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t):
        # forward mode (the forward-over-reverse Hessian-vector products of task_hvp's "func")
        x, w = ctx.saved_tensors
        out = None
        if x_t is not None:
            out = torch.bmm(x_t, w.transpose(1, 2))
        if w_t is not None:
            t = torch.bmm(x, w_t.transpose(1, 2))
            out = t if out is None else out + t
        if b_t is not None:
            out = b_t.unsqueeze(1).expand(-1, x.shape[1], -1) if out is None else out + b_t.unsqueeze(1)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2).contiguous(), x) if ctx.needs_input_grad[1] else None
        gb = g.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb

def pair(v):
    return [v, v] if isinstance(v, int) else list(v)


class GroupedConvBackwardFunction(torch.autograd.Function):
    """``convolution_backward`` of a grouped conv as a function of (g, x, w), with a double
    backward that makes one grouped call per term. PyTorch's own double backward of a grouped
    conv computes the weight term with one convolution PER GROUP (T of them per layer for the
    task-batched conv); here it is ``convolution_backward``'s grouped weight gradient:

        gx = conv_transpose(g, w),  gw = corr(x, g),  gb = sum(g)
        dS/dg = conv(ggx, w) + conv(x, ggw) + ggb
        dS/dx = conv_transpose(g, ggw)        (gw is linear in x)
        dS/dw = corr(ggx, g)                  (gx is linear in w)

    Once differentiable (third order raises), like the batch-norm double backward."""

    @staticmethod
    def forward(ctx, g, x, w, mask, cfg):
        stride, padding, dilation, groups = cfg
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]] if mask[2] else None, stride, padding, dilation, False, [0, 0], groups, mask)
        ctx.save_for_backward(g, x, w)
        ctx.cfg = cfg
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        g, x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.cfg
        dg = dx = dw = None
        if ctx.needs_input_grad[0]:
            if ggx is not None:
                dg = F.conv2d(ggx, w, ggb, stride, padding, dilation, groups)
                ggb = None
            if ggw is not None:
                c = F.conv2d(x, ggw, ggb, stride, padding, dilation, groups)
                dg = c if dg is None else dg.add_(c)
                ggb = None
            if ggb is not None:
                dg = ggb.view(1, -1, 1, 1).expand(g.shape).contiguous()
        if ctx.needs_input_grad[1] and ggw is not None:
            dx = torch.ops.aten.convolution_backward(
                g, x, ggw, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False])[0]
        if ctx.needs_input_grad[2] and ggx is not None:
            dw = torch.ops.aten.convolution_backward(
                g, ggx, w, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False])[1]
        return dg, dx, dw, None, None


class GroupedConvFunction(torch.autograd.Function):
    """``F.conv2d(x, w, b, *cfg)`` whose backward is :class:`GroupedConvBackwardFunction`."""

    @staticmethod
    def forward(ctx, x, w, b, cfg):
        stride, padding, dilation, groups = cfg
        ctx.save_for_backward(x, w)
        ctx.cfg, ctx.has_bias = cfg, b is not None
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = GroupedConvBackwardFunction.apply(g, x, w, mask, ctx.cfg)
        return gx, gw, gb, None


def like_format(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (channels_last or contiguous) when ``like`` has one of
    them and ``t`` is not in it: elementwise ops and reductions over mixed formats walk one
    operand with a stride (several times slower than the one copy)."""
    if t.dim() != 4 or t.shape != like.shape:
        return t
    if like.is_contiguous():
        return t if t.is_contiguous() else t.contiguous()
    if like.is_contiguous(memory_format=torch.channels_last):
        return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(
            memory_format=torch.channels_last)
    return t


class BatchNormTrainBackwardFunction(torch.autograd.Function):
    """Batch-norm backward (training mode) whose own backward -- the double backward that
    second-order MAML runs -- is closed form: every output is ``k0 + k1*x + k2*g + k3*ggx``
    with per-channel k's from five reductions, instead of PyTorch's generic
    ``batchnorm_double_backward`` (measured: ``bench/results/design_notes.md``). Once
    differentiable (third order raises). On the CPU the closed form runs as one C++ kernel
    (``fastmeta._C.bn_train_double_backward``: two passes over the activations) when the
    extension is built and ``FASTMETA_BN_KERNEL=1`` (opt-in, see :func:`_kernel_entry`), else
    as the ATen ops of :func:`bn_train_double_backward_reference`.

    With xh = (x - mean) * r, A = mean(g), B = mean(g * xh), the backward is
    gx = w r (g - A - xh B), gw = sum(g xh), gb = sum(g); differentiating
    S = <ggx, gx> + <ggw, gw> + <ggb, gb> gives (Bq = mean(ggx xh), m = mean(ggx)):
      dS/dg = w r (ggx - m - xh Bq) + ggw xh + ggb
      dS/dx = w r^2 [xh (3 B Bq - mean(ggx g) + A m) - (g - A) Bq - B (ggx - m)]
              + ggw r (g - A - xh B)
      dS/dw = r M (mean(ggx g) - A m - B Bq)          (M = elements per channel)
    """

    @staticmethod
    def forward(ctx, g, x, w, mean, invstd, eps):
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x, w, None, None, mean, invstd, True, eps, [True, w is not None, w is not None])
        ctx.save_for_backward(g, x, w, mean, invstd)
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        g, x, w, mean, r = ctx.saved_tensors
        if ggx is not None:
            ggx = like_format(ggx, x)
        need = ctx.needs_input_grad
        kernel = _bn_kernel(g, x, ggx)
        if kernel is not None:
            gg_out, gI, gW = kernel(g, x, ggx, mean, r, w, ggw, ggb, need[0], need[1],
                                    need[2] and w is not None)
            return gg_out, gI, gW, None, None, None
        return bn_train_double_backward_reference(g, x, w, mean, r, ggx, ggw, ggb, need)


def _bn_kernel(g, x, ggx):
    """``fastmeta._C.bn_train_double_backward`` (csrc/cpu/task_bn.cpp: the same closed form in
    two passes over the activations) when it applies: the extension is built, plain float32/
    float64 CPU tensors, ``g``/``ggx`` in ``x``'s layout, contiguous or 4-D channels_last, and
    ``FASTMETA_BN_KERNEL=1`` (opt-in, see :func:`_kernel_entry`). Otherwise None (the
    composite formulation runs)."""
    fn = _kernel_entry("bn_train_double_backward")
    if fn is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if not 2 <= x.dim() <= 5 or type(x) is not torch.Tensor or type(g) is not torch.Tensor:
        return None
    if not (x.is_contiguous()
            or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return None
    for t in (g, ggx):
        if t is not None and (t.dtype != x.dtype or t.stride() != x.stride() or t.shape != x.shape):
            return None
    return fn


_BN_KERNEL: dict = {}


def _kernel_entry(name):
    """``fastmeta._C.<name>`` (csrc/cpu/task_bn.cpp) or None: extension not built or older, or
    ``FASTMETA_BN_KERNEL`` is not ``1`` (the composite ATen formulations then run). Opt-in
    for now: with the kernel, ``train maml`` on 2 ranks x 2 tasks drifted from 1 process x 4
    tasks after 4 Adam steps (51% of the parameters within 1e-6, 98-99% with the composite;
    tests/test_distributed.py), although one meta-gradient of 4 tasks vs 2 + 2 agrees better
    with it (6.9e-8 vs 7.6e-7 of the largest entry, float32) and the kernel's outputs are
    bitwise independent of the number of tasks in every layout tried. Not understood yet."""
    fn = _BN_KERNEL.get(name, False)
    if fn is False:
        opted_in = os.environ.get("FASTMETA_BN_KERNEL", "0") == "1"
        fn = _BN_KERNEL[name] = _ext.entry(name) if opted_in else None
    return fn


def bn_train_double_backward_reference(g, x, w, mean, r, ggx, ggw, ggb, need):
    """The double backward of :class:`BatchNormTrainBackwardFunction` with ATen ops (the
    reference of the C++ kernel, and the path without it): ``(dS/dg, dS/dx, dS/dw, None, None,
    None)`` for the upstream gradients ``ggx, ggw, ggb`` and ``need`` = needs_input_grad."""
    C = x.shape[1]
    dims = [0, *range(2, x.dim())]
    M = x.numel() // C
    A = g.sum(dims) / M
    B = r * ((g * x).sum(dims) / M - A * mean)
    rw = r if w is None else r * w
    zero = torch.zeros_like(r)
    o0, o1, o3 = zero, zero, zero  # dS/dg = o0 + o1 x + o3 ggx
    k0, k1, k2, k3 = zero, zero, zero, zero  # dS/dx = k0 + k1 x + k2 g + k3 ggx
    gW = None
    if ggx is not None:
        m = ggx.sum(dims) / M
        Bq = r * ((ggx * x).sum(dims) / M - m * mean)
        mgg = (ggx * g).sum(dims) / M
        o3 = rw
        o1 = -rw * Bq * r
        o0 = rw * (Bq * r * mean - m)
        c = r * rw
        kx = c * (3 * B * Bq - mgg + A * m)  # coefficient of xh
        k1 = kx * r
        k0 = c * (A * Bq + B * m) - kx * r * mean
        k2 = -c * Bq
        k3 = -c * B
        if w is not None and need[2]:
            gW = r * M * (mgg - A * m - B * Bq)
    if ggw is not None and w is not None:
        gr = ggw * r
        o1 = o1 + gr
        o0 = o0 - gr * mean
        k2 = k2 + gr
        k1 = k1 - gr * B * r
        k0 = k0 - gr * A + gr * B * r * mean
    if ggb is not None and w is not None:
        o0 = o0 + ggb
    shp = [1, C] + [1] * (x.dim() - 2)
    gg_out = gI = None
    if need[0]:
        gg_out = torch.addcmul(o0.view(shp), x, o1.view(shp))
        if ggx is not None:
            gg_out = gg_out.addcmul_(ggx, o3.view(shp))
    if need[1]:
        gI = torch.addcmul(k0.view(shp), x, k1.view(shp)).addcmul_(g, k2.view(shp))
        if ggx is not None:
            gI = gI.addcmul_(ggx, k3.view(shp))
    return gg_out, gI, gW, None, None, None


class BatchNormTrainFunction(torch.autograd.Function):
    """``F.batch_norm(x, None, None, w, b, training=True)`` with the fast double backward above."""

    @staticmethod
    def forward(ctx, x, w, b, eps):
        out, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, mean, invstd = ctx.saved_tensors
        # A gradient summed from branches of different memory formats arrives NCHW-contiguous;
        # the batch-norm backward with mixed formats is slower than one copy (design_notes.md).
        g = like_format(g, x)
        gx, gw, gb = BatchNormTrainBackwardFunction.apply(g, x, w, mean, invstd, ctx.eps)
        return gx, gw, gb, None


def batch_norm_train(x, w, b, eps):
    """Per-channel batch statistics, no running statistics. The custom double backward is
    used for float32/float64 outside torch.func transforms and forward-mode AD (custom
    autograd Functions would need jvp/vmap rules there); otherwise plain F.batch_norm."""
    if (x.dtype in (torch.float32, torch.float64) and not torch._C._are_functorch_transforms_active()
            and torch.autograd.forward_ad._current_level < 0 and (w is None or w.dtype == x.dtype)):
        return BatchNormTrainFunction.apply(x, w, b, eps)
    return F.batch_norm(x, None, None, w, b, True, 0.0, eps)

class MaxPool2dBackwardFunction(torch.autograd.Function):
    """The max-pool backward (scatter of ``g`` to the argmax positions) as a function of ``g``
    only. Its derivative w.r.t. the pool's input is zero wherever it exists (the argmax is
    locally constant), which PyTorch's own double backward materialises as a zeros tensor that
    is then added into the input's gradient; leaving it out (None) gives the same values
    without the fill and the add. The derivative w.r.t. ``g`` is the gather
    (``max_pool_double_backward``), itself differentiable."""

    @staticmethod
    def forward(ctx, g, x, idx, cfg):
        ctx.save_for_backward(idx)
        return torch.ops.aten.max_pool2d_with_indices_backward(g, x, *cfg, idx)

    @staticmethod
    def backward(ctx, gg):
        (idx,) = ctx.saved_tensors
        if (idx.dim() == 4 and not idx.is_contiguous()
                and idx.is_contiguous(memory_format=torch.channels_last)):
            # channels_last: gather over the pixels of the [N, H*W, C] view; flatten(-2) would
            # copy gg to NCHW first (a transposing copy, several times the gather:
            # bench/results/design_notes.md) and hand NCHW to every later op
            N, C, h, w = idx.shape
            src = gg.contiguous(memory_format=torch.channels_last)
            src = src.permute(0, 2, 3, 1).reshape(N, -1, C)
            out = src.gather(1, idx.permute(0, 2, 3, 1).reshape(N, -1, C))
            return out.view(N, h, w, C).permute(0, 3, 1, 2), None, None, None
        out = gg.flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape)
        return out, None, None, None


class MaxPool2dFunction(torch.autograd.Function):
    """``F.max_pool2d`` (same kernel, same argmax and tie rule) whose backward is
    :class:`MaxPool2dBackwardFunction`."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        cfg = (pair(kernel_size), pair(stride), pair(padding), pair(dilation), ceil_mode)
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, *cfg)
        ctx.save_for_backward(x, idx)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, g):
        x, idx = ctx.saved_tensors
        return MaxPool2dBackwardFunction.apply(g, x, idx, ctx.cfg), None, None, None, None, None
