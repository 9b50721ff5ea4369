"""Task-batched layers: one set of parameters per task, all tasks in one call.

Every module here is an ordinary ``nn.Module`` with ordinary (unbatched) parameters, and

    forward(x, params=None)

takes ``x [T, N, *in]`` (T tasks of N examples each) and returns ``[T, N, *out]``. ``params`` is
a dict whose keys are this module's ``named_parameters()`` names and whose values are
``[T, *param.shape]`` tensors (task t uses slice t), or ``None`` = the module's own parameters
for every task. Parameters with ``requires_grad=False`` may be left out of the dict (the
module's own value is then used for every task). All paths are plain differentiable PyTorch,
so second-order MAML can double-backward through them.

How the T tasks become one kernel call:

* :class:`TaskLinear`: ``torch.baddbmm`` over ``[T, N, in] x [T, in, out]``.
* :class:`TaskConv2d`: one ``F.conv2d(groups=T * groups)`` on a ``[N, T*C, H, W]`` layout
  (task t owns channels ``t*C .. t*C+C-1``) with the weights reshaped to ``[T*O, C/g, k, k]``.
  On the CPU, maps of at least 14x14 are made channels_last (NHWC) first, which the following
  BN / activation / max-pool keep; the double backward (second-order MAML) computes the
  grouped weight term in one ``convolution_backward`` call instead of PyTorch's one conv per
  group (:class:`_GroupedConvBackward`).
* :class:`TaskBatchNorm1d` / :class:`TaskBatchNorm2d`: ``F.batch_norm`` on the same
  ``[N, T*C, ...]`` layout; statistics are per channel, hence per task.
* :class:`TaskSequential` keeps the ``[N, T*C, H, W]`` layout through consecutive
  conv / BN / activation / pool / dropout layers and converts only at the ends (the exit to
  ``[T, N, ...]`` -- e.g. at a Flatten before the classifier -- is a view, not a copy).

BatchNorm is transductive, as in MAML (Finn et al. 2017): in training mode every task is
normalised with its own batch statistics; in eval mode the running statistics are used if
the module tracks them, otherwise the batch statistics again. Task-batched calls NEVER update
the running statistics: the T tasks run with T different (adapted) parameter sets, so their
activations do not come from one model and averaging them into one running estimate would
describe none of them (and an inner loop would update them once per step and per HVP
recomputation). Update them, if needed, with an ordinary (unbatched) forward of the module.

:func:`to_task_batched` converts a plain module (Linear, Conv2d, BatchNorm1d/2d, ReLU / Tanh /
Sigmoid / LeakyReLU / ELU / GELU / Identity, MaxPool2d / AvgPool2d, Flatten, Dropout, LayerNorm,
GroupNorm and nested
Sequential) into these, sharing the SAME Parameter (and buffer) objects under the same names.

Example::

    >>> net = TaskMLP([1, 40, 40, 1])
    >>> params = {n: p.expand(25, *p.shape) for n, p in net.named_parameters()}
    >>> net(torch.randn(25, 10, 1), params).shape
    torch.Size([25, 10, 1])
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastmeta import _malloc

__all__ = [
    "TaskActivation",
    "TaskAvgPool2d",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "TaskConv2d",
    "TaskConv4",
    "TaskDropout",
    "TaskFlatten",
    "TaskGroupNorm",
    "TaskLayerNorm",
    "TaskLinear",
    "TaskMLP",
    "TaskMaxPool2d",
    "TaskModule",
    "TaskSequential",
    "UnsupportedModuleError",
    "to_task_batched",
]

# Internal layouts of the activations flowing between task layers.
# Grouped convs on maps of at least this many pixels run channels_last (NHWC): oneDNN's
# convolution and PyTorch's max_pool2d / batch-norm kernels are vectorised over channels there
# (Conv4 second-order meta-step about 20% faster on a 1-thread CPU; max_pool2d alone ~5x).
# Smaller maps (7x7, 3x3) were measured slightly faster NCHW.
_CHANNELS_LAST_MIN_PIXELS = 196
_TN = 0  # [T, N, *per_sample]
_NT = 1  # [N, T*C, *spatial] for per-sample [C, *spatial] (task-major channels)


def _to_tn(h: torch.Tensor, layout: int, T: int) -> torch.Tensor:
    if layout == _TN:
        return h
    # [N, T*C, *sp] -> [N, T, C, *sp] -> [T, N, C, *sp]: a view, no copy.
    return h.unflatten(1, (T, h.shape[1] // T)).transpose(0, 1)


def _to_nt(h: torch.Tensor, layout: int, T: int) -> torch.Tensor:
    if layout == _NT:
        return h
    # [T, N, C, *sp] -> [N, T*C, *sp]: one copy at the entry of a conv/BN run.
    return h.transpose(0, 1).flatten(1, 2)


def _check_x(x, params) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [T, N, *in], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [T, N, *in] (at least 2 dims), got {tuple(x.shape)}")
    if params is not None and type(params) is not dict and not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> [T, *shape] tensor or None, got {type(params).__name__}")
    return x.shape[0]


def _own_params(mod: nn.Module, params, T: int, prefix: str) -> dict:
    """name -> (tensor, batched) for this module's direct parameters, with validation."""
    if params is None:
        return {n: (p, False) for n, p in mod._parameters.items() if p is not None}
    out = {}
    used = 0
    for n, p in mod._parameters.items():
        if p is None:
            continue
        v = params.get(n)
        if v is None:
            if p.requires_grad:
                raise ValueError(
                    f"params is missing '{prefix}{n}': expected a tensor of shape [T, *{tuple(p.shape)}] = "
                    f"{(T, *p.shape)} (T={T} from x.shape[0])"
                )
            out[n] = (p, False)
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"params['{prefix}{n}'] must be a torch.Tensor, got {type(v).__name__}")
        vs = v.shape
        if len(vs) != p.dim() + 1 or vs[0] != T or vs[1:] != p.shape:
            raise ValueError(
                f"params['{prefix}{n}'] has shape {tuple(v.shape)}, expected [T, *{tuple(p.shape)}] = "
                f"{(T, *p.shape)} (T={T} from x.shape[0])"
            )
        out[n] = (v, True)
        used += 1
    if used != len(params):
        extra = sorted(k for k in params if k not in out)
        known = [f"{prefix}{n}" for n, p in mod._parameters.items() if p is not None]
        raise ValueError(
            f"params has unexpected key(s) {[prefix + k for k in extra]}; this module's parameters are {known}"
        )
    return out


def _batched(v, batched: bool, T: int) -> torch.Tensor:
    return v if batched else v.expand(T, *v.shape)


class UnsupportedModuleError(TypeError):
    """Raised by :func:`to_task_batched` for a module it has no task-batched version of."""


class TaskModule(nn.Module):
    """Base class: ``forward(x [T, N, *in], params=None) -> [T, N, *out]``.

    Subclasses implement ``_task_forward(h, params, T, layout, prefix) -> (h, layout)``, which
    receives the activations in either internal layout and returns them in the layout it
    prefers (so that consecutive conv/BN/pool layers never permute)."""

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        T = _check_x(x, params)
        if not _malloc._state["done"] and x.device.type == "cpu":
            _malloc.tune()  # large task-batched tensors: keep freed memory mapped (see _malloc)
        h, layout = self._task_forward(x, params, T, _TN, "")
        return _to_tn(h, layout, T)

    def _task_forward(self, h, params, T, layout, prefix):  # pragma: no cover - abstract
        raise NotImplementedError


class TaskLinear(TaskModule):
    """Linear layer with per-task weights: ``x [T, N, *, in] -> [T, N, *, out]``.

    ``params``: ``weight [T, out, in]``, ``bias [T, out]``.

    Equivalent PyTorch code::

        torch.stack([F.linear(x[t], weight[t], bias[t]) for t in range(T)])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        lin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = lin.weight
        self.bias = lin.bias

    @classmethod
    def from_module(cls, m: nn.Linear) -> TaskLinear:
        self = cls.__new__(cls)
        TaskModule.__init__(self)
        self.in_features, self.out_features = m.in_features, m.out_features
        self.weight = m.weight
        self.bias = m.bias
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _task_forward(self, h, params, T, layout, prefix):
        if layout != _TN:
            h = _to_tn(h, layout, T)
        shape = h.shape
        if len(shape) < 3 or shape[-1] != self.in_features:
            raise ValueError(
                f"x for {prefix or 'TaskLinear'} must have shape [T, N, *, {self.in_features}], got {tuple(shape)}"
            )
        if params is None:  # shared parameters: one matmul over all T*N rows
            return F.linear(h, self.weight, self.bias), _TN
        p = _own_params(self, params, T, prefix)
        w, wb = p["weight"]
        b, bb = p.get("bias", (None, False))
        if not wb and not bb:
            return F.linear(h, w, b), _TN
        x3 = h if len(shape) == 3 else h.reshape(T, -1, self.in_features)
        out = _TaskLinearFn.apply(x3, _batched(w, wb, T), None if b is None else _batched(b, bb, T))
        if len(shape) != 3:
            out = out.reshape(*shape[:-1], self.out_features)
        return out, _TN


class _TaskLinearFn(torch.autograd.Function):
    """``x [T, N, in] @ w[t]^T + b[t]`` with the weight gradient made in the weight's own layout.

    Autograd's formula for ``bmm(x, w.transpose(1, 2))`` returns ``dw`` as a transposed view of a
    ``[T, in, out]`` tensor, and it computes it from a transposed view of ``x``; every later op
    on it (the inner update ``theta - lr * dw``, the sum over tasks into the shared parameter)
    then walks memory with a stride. On this CPU (1 thread) that made the sum over T of a
    ``[32, 256, 784]`` gradient 40x slower (45 ms vs 1.1 ms) and the MAML meta-step of
    learn2learn's OmniglotFC 1.5x slower. Here ``dw = (g^T, made contiguous) @ x`` comes out
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


class TaskConv2d(TaskModule):
    """2-D convolution with per-task weights: ``x [T, N, C, H, W] -> [T, N, O, H', W']``.

    One grouped ``F.conv2d`` (``groups = T * groups``) on the ``[N, T*C, H, W]`` layout.
    ``params``: ``weight [T, O, C/groups, kh, kw]``, ``bias [T, O]``. Only
    ``padding_mode='zeros'``.

    Equivalent PyTorch code::

        torch.stack([F.conv2d(x[t], weight[t], bias[t], stride, padding, dilation, groups)
                     for t in range(T)])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, device=None, dtype=None):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        self._copy_config(conv)
        self.weight, self.bias = conv.weight, conv.bias

    def _copy_config(self, m: nn.Conv2d) -> None:
        self.in_channels, self.out_channels = m.in_channels, m.out_channels
        self.kernel_size, self.stride, self.padding = m.kernel_size, m.stride, m.padding
        self.dilation, self.groups = m.dilation, m.groups

    @classmethod
    def from_module(cls, m: nn.Conv2d) -> TaskConv2d:
        if m.padding_mode != "zeros":
            raise UnsupportedModuleError(f"Conv2d with padding_mode={m.padding_mode!r} (only 'zeros' is task-batched)")
        self = cls.__new__(cls)
        TaskModule.__init__(self)
        self._copy_config(m)
        self.weight, self.bias = m.weight, m.bias
        return self

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")

    def _task_forward(self, h, params, T, layout, prefix):
        C = self.in_channels
        if (layout == _TN and (h.dim() != 5 or h.shape[2] != C)) or (layout == _NT and (h.dim() != 4 or h.shape[1] != T * C)):
            shown = tuple(_to_tn(h, layout, T).shape)
            raise ValueError(f"x for {prefix or 'TaskConv2d'} must have shape [T, N, {C}, H, W], got {shown}")
        p = _own_params(self, params, T, prefix)
        w, wb = p["weight"]
        b, bb = p.get("bias", (None, False))
        if not wb and not bb:
            # Shared weights: [N, T*C, H, W] is [N*T, C, H, W] in memory, and [T, N, ...] flattens too.
            if layout == _NT:
                N = h.shape[0]
                out = F.conv2d(h.reshape(N * T, C, *h.shape[2:]), w, b, self.stride, self.padding,
                               self.dilation, self.groups)
                return out.reshape(N, T * self.out_channels, *out.shape[2:]), _NT
            out = F.conv2d(h.flatten(0, 1), w, b, self.stride, self.padding, self.dilation, self.groups)
            return out.unflatten(0, (T, h.shape[1])), _TN
        h = _to_nt(h, layout, T)
        if h.dim() == 4 and h.device.type == "cpu":
            if h.shape[-1] * h.shape[-2] >= _CHANNELS_LAST_MIN_PIXELS:
                h = h.contiguous(memory_format=torch.channels_last)
            else:
                h = h.contiguous()
        w = _batched(w, wb, T).flatten(0, 1)
        if b is not None:
            b = _batched(b, bb, T).flatten()
        if (isinstance(self.padding, str) or h.device.type != "cpu"
                or torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0):
            out = F.conv2d(h, w, b, self.stride, self.padding, self.dilation, self.groups * T)
        else:
            out = _GroupedConv.apply(h, w, b, (_pair(self.stride), _pair(self.padding), _pair(self.dilation),
                                               self.groups * T))
        return out, _NT


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


class _GroupedConvBackward(torch.autograd.Function):
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


class _GroupedConv(torch.autograd.Function):
    """``F.conv2d(x, w, b, *cfg)`` whose backward is :class:`_GroupedConvBackward`."""

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
        gx, gw, gb = _GroupedConvBackward.apply(g, x, w, mask, ctx.cfg)
        return gx, gw, gb, None


def _like_format(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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


class _BatchNormTrainBackward(torch.autograd.Function):
    """Batch-norm backward (training mode) whose own backward -- the double backward that
    second-order MAML runs -- is closed form: every output is ``k0 + k1*x + k2*g + k3*ggx``
    with per-channel k's from five reductions, about 3x faster on the CPU than PyTorch's
    generic ``batchnorm_double_backward``. Once differentiable (third order raises).

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
            ggx = _like_format(ggx, x)
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
            if w is not None and ctx.needs_input_grad[2]:
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
        if ctx.needs_input_grad[0]:
            gg_out = torch.addcmul(o0.view(shp), x, o1.view(shp))
            if ggx is not None:
                gg_out = gg_out.addcmul_(ggx, o3.view(shp))
        if ctx.needs_input_grad[1]:
            gI = torch.addcmul(k0.view(shp), x, k1.view(shp)).addcmul_(g, k2.view(shp))
            if ggx is not None:
                gI = gI.addcmul_(ggx, k3.view(shp))
        return gg_out, gI, gW, None, None, None


class _BatchNormTrain(torch.autograd.Function):
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
        # the batch-norm backward with mixed formats is ~10x slower than one copy.
        g = _like_format(g, x)
        gx, gw, gb = _BatchNormTrainBackward.apply(g, x, w, mean, invstd, ctx.eps)
        return gx, gw, gb, None


def _batch_norm_train(x, w, b, eps):
    """Per-channel batch statistics, no running statistics. The custom double backward is
    used for float32/float64 outside torch.func transforms and forward-mode AD (custom
    autograd Functions would need jvp/vmap rules there); otherwise plain F.batch_norm."""
    if (x.dtype in (torch.float32, torch.float64) and not torch._C._are_functorch_transforms_active()
            and torch.autograd.forward_ad._current_level < 0 and (w is None or w.dtype == x.dtype)):
        return _BatchNormTrain.apply(x, w, b, eps)
    return F.batch_norm(x, None, None, w, b, True, 0.0, eps)


class _TaskBatchNorm(TaskModule):
    _per_sample_dims: tuple[int, ...] = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        super().__init__()
        bn = self._plain(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._adopt(bn)

    def _adopt(self, bn) -> None:
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias
        # The SAME buffer tensors as the plain module (read only: see the module docstring).
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    @classmethod
    def from_module(cls, m):
        self = cls.__new__(cls)
        TaskModule.__init__(self)
        self._adopt(m)
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")

    def _task_forward(self, h, params, T, layout, prefix):
        C = self.num_features
        nd = h.dim() - (2 if layout == _TN else 1)  # per-sample dims
        chan = h.shape[2] if layout == _TN else h.shape[1] // T
        if nd not in self._per_sample_dims or chan != C or (layout == _NT and h.shape[1] != T * C):
            shown = tuple(_to_tn(h, layout, T).shape)
            want = self._shape_doc.replace("C", str(C))
            raise ValueError(f"x for {prefix or type(self).__name__} must have shape {want}, got {shown}")
        p = _own_params(self, params, T, prefix)
        w, wb = p.get("weight", (None, False))
        b, bb = p.get("bias", (None, False))
        h = _to_nt(h, layout, T)
        if w is not None:
            w = w.flatten() if wb else w.repeat(T)
        if b is not None:
            b = b.flatten() if bb else b.repeat(T)
        use_running = not self.training and self.running_mean is not None
        if use_running:
            rm, rv = self.running_mean.repeat(T), self.running_var.repeat(T)
            out = F.batch_norm(h, rm, rv, w, b, False, 0.0, self.eps)
        else:
            # training=True with no running buffers: per-(task, channel) batch statistics, no update.
            out = _batch_norm_train(h, w, b, self.eps)
        return out, _NT


class TaskBatchNorm1d(_TaskBatchNorm):
    """BatchNorm over ``x [T, N, C]`` or ``[T, N, C, L]`` with per-task statistics and parameters.

    ``params``: ``weight [T, C]``, ``bias [T, C]``. Transductive (see the module docstring):
    batch statistics of each task in training mode; running statistics (if tracked) in eval
    mode; running statistics are never updated by task-batched calls.

    Equivalent PyTorch code (training mode)::

        torch.stack([F.batch_norm(x[t], None, None, weight[t], bias[t], True, 0.0, eps)
                     for t in range(T)])
    """

    _per_sample_dims = (1, 2)
    _shape_doc = "[T, N, C] or [T, N, C, L]"
    _plain = nn.BatchNorm1d


class TaskBatchNorm2d(_TaskBatchNorm):
    """BatchNorm over ``x [T, N, C, H, W]`` with per-task statistics and parameters.

    ``params``: ``weight [T, C]``, ``bias [T, C]``. Same semantics as :class:`TaskBatchNorm1d`.
    """

    _per_sample_dims = (3,)
    _shape_doc = "[T, N, C, H, W]"
    _plain = nn.BatchNorm2d


class TaskLayerNorm(TaskModule):
    """``nn.LayerNorm`` with per-task affine parameters: ``x [T, N, *, *normalized_shape]``.

    ``params``: ``weight [T, *normalized_shape]``, ``bias [T, *normalized_shape]``. Each example
    is normalised on its own (no statistics across examples or tasks).

    Equivalent PyTorch code::

        torch.stack([F.layer_norm(x[t], normalized_shape, weight[t], bias[t], eps) for t in range(T)])
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        super().__init__()
        self._adopt(nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype))

    def _adopt(self, m: nn.LayerNorm) -> None:
        self.normalized_shape, self.eps = tuple(m.normalized_shape), m.eps
        self.weight, self.bias = m.weight, m.bias

    @classmethod
    def from_module(cls, m: nn.LayerNorm) -> TaskLayerNorm:
        self = cls.__new__(cls)
        TaskModule.__init__(self)
        self._adopt(m)
        return self

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.weight is not None}"

    def _task_forward(self, h, params, T, layout, prefix):
        h = _to_tn(h, layout, T)
        ns = self.normalized_shape
        if h.dim() < 2 + len(ns) or tuple(h.shape[h.dim() - len(ns):]) != ns:
            raise ValueError(f"x for {prefix or 'TaskLayerNorm'} must have shape [T, N, *, *{ns}], "
                             f"got {tuple(h.shape)}")
        p = _own_params(self, params, T, prefix)
        w, wb = p.get("weight", (None, False))
        b, bb = p.get("bias", (None, False))
        if not wb and not bb:
            return F.layer_norm(h, ns, w, b, self.eps), _TN
        out = F.layer_norm(h, ns, None, None, self.eps)
        view = (T,) + (1,) * (h.dim() - 1 - len(ns)) + ns  # task t's affine on its examples
        if w is not None:
            out = out * (w.reshape(view) if wb else w)
        if b is not None:
            out = out + (b.reshape(view) if bb else b)
        return out, _TN


class TaskGroupNorm(TaskModule):
    """``nn.GroupNorm`` with per-task affine parameters: ``x [T, N, C, *]``.

    ``params``: ``weight [T, C]``, ``bias [T, C]``. Each example is normalised on its own (per
    group of channels; no statistics across examples or tasks).

    Equivalent PyTorch code::

        torch.stack([F.group_norm(x[t], num_groups, weight[t], bias[t], eps) for t in range(T)])
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__()
        self._adopt(nn.GroupNorm(num_groups, num_channels, eps, affine, device=device, dtype=dtype))

    def _adopt(self, m: nn.GroupNorm) -> None:
        self.num_groups, self.num_channels, self.eps = m.num_groups, m.num_channels, m.eps
        self.weight, self.bias = m.weight, m.bias

    @classmethod
    def from_module(cls, m: nn.GroupNorm) -> TaskGroupNorm:
        self = cls.__new__(cls)
        TaskModule.__init__(self)
        self._adopt(m)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"

    def _task_forward(self, h, params, T, layout, prefix):
        h = _to_tn(h, layout, T)
        C = self.num_channels
        if h.dim() < 3 or h.shape[2] != C:
            raise ValueError(f"x for {prefix or 'TaskGroupNorm'} must have shape [T, N, {C}, *], got {tuple(h.shape)}")
        p = _own_params(self, params, T, prefix)
        w, wb = p.get("weight", (None, False))
        b, bb = p.get("bias", (None, False))
        flat = h.flatten(0, 1)
        if not wb and not bb:
            return F.group_norm(flat, self.num_groups, w, b, self.eps).view(h.shape), _TN
        out = F.group_norm(flat, self.num_groups, None, None, self.eps).view(h.shape)
        view = (T, 1, C) + (1,) * (h.dim() - 3)  # task t's per-channel affine on its examples
        if w is not None:
            out = out * (w.reshape(view) if wb else w.reshape(view[2:]))
        if b is not None:
            out = out + (b.reshape(view) if bb else b.reshape(view[2:]))
        return out, _TN


def _relu(h, kw):
    return torch.relu(h)


def _tanh(h, kw):
    return torch.tanh(h)


def _sigmoid(h, kw):
    return torch.sigmoid(h)


def _identity(h, kw):
    return h


def _leaky_relu(h, kw):
    return F.leaky_relu(h, kw.get("negative_slope", 0.01))


def _elu(h, kw):
    return F.elu(h, kw.get("alpha", 1.0))


def _gelu(h, kw):
    return F.gelu(h, approximate=kw.get("approximate", "none"))


# Module-level functions (not lambdas) so that task modules pickle (torch.save(model)).
_ACTIVATIONS = {
    "relu": _relu,
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "identity": _identity,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "gelu": _gelu,
}


_MONOTONE = frozenset({"relu", "tanh", "sigmoid", "identity", "leaky_relu", "elu"})


class TaskActivation(TaskModule):
    """Elementwise activation (works in any layout). ``name``: one of relu, tanh, sigmoid,
    identity, leaky_relu (``negative_slope``), elu (``alpha``), gelu (``approximate``).
    Never in place (in-place activations would break double backward through saved outputs)."""

    def __init__(self, name: str = "relu", **kwargs):
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
        self.name, self.kwargs = name, dict(kwargs)
        self._fn = _ACTIVATIONS[name]

    def _monotone(self) -> bool:
        if self.name in ("leaky_relu", "elu"):
            return self.kwargs.get("negative_slope", self.kwargs.get("alpha", 1.0)) >= 0
        return self.name in _MONOTONE

    def extra_repr(self) -> str:
        return ", ".join([repr(self.name)] + [f"{k}={v!r}" for k, v in self.kwargs.items()])

    def _task_forward(self, h, params, T, layout, prefix):
        if params:
            _own_params(self, params, T, prefix)  # raises on unexpected keys
        return self._fn(h, self.kwargs), layout


class TaskDropout(TaskModule):
    """Elementwise dropout (any layout); active only in training mode."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def _task_forward(self, h, params, T, layout, prefix):
        if params:
            _own_params(self, params, T, prefix)
        return F.dropout(h, self.p, self.training), layout


class _MaxPool2dBackward(torch.autograd.Function):
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
            # copy gg to NCHW first (a transposing copy: 400 ms for [5, 1024, 84, 84] on one
            # CPU thread, 7x the gather) and hand NCHW to every later op
            N, C, h, w = idx.shape
            src = gg.contiguous(memory_format=torch.channels_last)
            src = src.permute(0, 2, 3, 1).reshape(N, -1, C)
            out = src.gather(1, idx.permute(0, 2, 3, 1).reshape(N, -1, C))
            return out.view(N, h, w, C).permute(0, 3, 1, 2), None, None, None
        out = gg.flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape)
        return out, None, None, None


class _MaxPool2d(torch.autograd.Function):
    """``F.max_pool2d`` (same kernel, same argmax and tie rule) whose backward is
    :class:`_MaxPool2dBackward`."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        cfg = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), ceil_mode)
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, *cfg)
        ctx.save_for_backward(x, idx)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, g):
        x, idx = ctx.saved_tensors
        return _MaxPool2dBackward.apply(g, x, idx, ctx.cfg), None, None, None, None, None


class _TaskPool2d(TaskModule):
    def _pool(self, h):  # pragma: no cover - abstract
        raise NotImplementedError

    def _task_forward(self, h, params, T, layout, prefix):
        if params:
            _own_params(self, params, T, prefix)
        if layout == _NT:  # channels are independent: pool [N, T*C, H, W] as is
            return self._pool(h), _NT
        if h.dim() not in (4, 5):
            raise ValueError(f"x for {prefix or type(self).__name__} must have shape [T, N, C, H, W], got {tuple(h.shape)}")
        out = self._pool(h.flatten(0, 1))
        return out.unflatten(0, (T, h.shape[1])), _TN


class TaskMaxPool2d(_TaskPool2d):
    """``F.max_pool2d`` per example (task-independent, any layout)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def _pool(self, h):
        if (h.dim() == 4 and not torch._C._are_functorch_transforms_active()
                and torch.autograd.forward_ad._current_level < 0):
            return _MaxPool2d.apply(h, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return F.max_pool2d(h, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


class TaskAvgPool2d(_TaskPool2d):
    """``F.avg_pool2d`` per example (task-independent, any layout)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def _pool(self, h):
        return F.avg_pool2d(h, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


class TaskFlatten(TaskModule):
    """``nn.Flatten(start_dim, end_dim)`` of each example (dims count the example's batch dim
    as 0, like ``nn.Flatten``; ``start_dim`` must be >= 1 so examples stay separate)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        if start_dim == 0:
            raise ValueError("TaskFlatten start_dim must not be 0 (it would merge the examples of a task)")
        self.start_dim, self.end_dim = start_dim, end_dim

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def _task_forward(self, h, params, T, layout, prefix):
        if params:
            _own_params(self, params, T, prefix)
        if layout == _NT and self.start_dim in (1, -(h.dim() - 1)) and self.end_dim == -1:
            # [N, T*C, *sp] -> [N, T, C*prod(sp)] -> [T, N, F]: a view of the conv output.
            N = h.shape[0]
            return h.reshape(N, T, -1).transpose(0, 1), _TN
        h = _to_tn(h, layout, T)
        s = self.start_dim + 1 if self.start_dim > 0 else self.start_dim
        e = self.end_dim + 1 if self.end_dim >= 0 else self.end_dim
        return h.flatten(s, e), _TN


class TaskSequential(TaskModule, nn.Sequential):
    """``nn.Sequential`` of task-batched modules; ``params`` keys are ``"<child>.<name>"`` as in
    the plain Sequential. Plain children are converted with :func:`to_task_batched`. The
    activations stay in the ``[N, T*C, H, W]`` layout across consecutive conv/BN/pool layers."""

    def __init__(self, *args):
        nn.Sequential.__init__(self, *args)
        for name, m in list(self._modules.items()):
            if not isinstance(m, TaskModule):
                self._modules[name] = to_task_batched(m)

    forward = TaskModule.forward

    def _task_forward(self, h, params, T, layout, prefix):
        groups = None
        if params is not None:
            groups = {name: {} for name in self._modules}
            for k, v in params.items():
                head, sep, rest = k.partition(".")
                g = groups.get(head) if sep else None
                if g is None:
                    raise ValueError(
                        f"params has unexpected key '{prefix}{k}'; expected '<child>.<param>' with child in "
                        f"{[prefix + n for n in self._modules]}"
                    )
                g[rest] = v
        items = list(self._modules.items())
        i = 0
        while i < len(items):
            name, m = items[i]
            if not isinstance(m, TaskModule):
                raise TypeError(f"TaskSequential child {prefix}{name} is {type(m).__name__}, not a task module")
            if (type(m) is TaskActivation and m._monotone() and i + 1 < len(items)
                    and type(items[i + 1][1]) is TaskMaxPool2d):
                # act(maxpool(x)) == maxpool(act(x)) for a non-decreasing act, with the same
                # first and second derivatives (the pool's argmax is the same, up to ties
                # where the act's derivative is 0): run the activation on the 4x smaller map.
                i += 1
                name2, m2 = items[i]
                h, layout = m2._task_forward(h, None if groups is None else groups[name2], T, layout,
                                             f"{prefix}{name2}.")
            h, layout = m._task_forward(h, None if groups is None else groups[name], T, layout, f"{prefix}{name}.")
            i += 1
        return h, layout


class TaskMLP(TaskSequential):
    """Task-batched MLP ``Linear (act Linear)*``: ``x [T, N, sizes[0]] -> [T, N, sizes[-1]]``.

    Parameter names ``"0.weight", "0.bias", "2.weight", ...`` as in the equivalent
    ``nn.Sequential(nn.Linear, act, nn.Linear, ...)``.

    Example (sinusoid regression, Finn et al. 2017)::

        >>> TaskMLP([1, 40, 40, 1], activation="relu")
    """

    def __init__(self, sizes, activation: str = "relu", bias: bool = True):
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least input and output sizes, got {sizes}")
        if activation not in ("relu", "tanh", "sigmoid", "identity"):
            raise ValueError(f"activation must be relu, tanh, sigmoid or identity, got {activation!r}")
        layers = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            if i:
                layers.append(TaskActivation(activation))
            layers.append(TaskLinear(a, b, bias=bias))
        super().__init__(*layers)
        self.sizes, self.activation = tuple(sizes), activation


class TaskConv4(TaskSequential):
    """MAML's Conv4 (Finn et al. 2017; Vinyals et al. 2016), task-batched:
    4 x [conv3x3(pad 1) + BatchNorm + ReLU + maxpool2], flatten, Linear to ``n_way`` logits.

    ``x [T, N, in_channels, image_size, image_size] -> [T, N, n_way]``. Parameter names
    ``"0.0.weight"`` (block 0 conv), ``"0.1.weight"`` (block 0 BN), ..., ``"5.weight"``
    (classifier), as in the equivalent plain ``nn.Sequential``. BatchNorm does not track running
    statistics (MAML's transductive setting: batch statistics in train and eval mode).
    """

    def __init__(self, in_channels: int = 1, n_way: int = 5, hidden: int = 64, image_size: int = 28):
        blocks, size = [], image_size
        for i in range(4):
            blocks.append(TaskSequential(
                TaskConv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
                TaskBatchNorm2d(hidden, track_running_stats=False),
                TaskActivation("relu"),
                TaskMaxPool2d(2),
            ))
            size //= 2
        if size < 1:
            raise ValueError(f"image_size must be >= 16 for four 2x2 max-pools, got {image_size}")
        super().__init__(*blocks, TaskFlatten(), TaskLinear(hidden * size * size, n_way))
        self.in_channels, self.n_way, self.hidden, self.image_size = in_channels, n_way, hidden, image_size


# --------------------------------------------------------------------------- conversion

def _act(name):
    return lambda m: TaskActivation(name)


_CONVERTERS = {
    nn.Linear: TaskLinear.from_module,
    nn.Conv2d: TaskConv2d.from_module,
    nn.BatchNorm1d: TaskBatchNorm1d.from_module,
    nn.BatchNorm2d: TaskBatchNorm2d.from_module,
    nn.ReLU: _act("relu"),
    nn.Tanh: _act("tanh"),
    nn.Sigmoid: _act("sigmoid"),
    nn.Identity: _act("identity"),
    nn.LeakyReLU: lambda m: TaskActivation("leaky_relu", negative_slope=m.negative_slope),
    nn.ELU: lambda m: TaskActivation("elu", alpha=m.alpha),
    nn.GELU: lambda m: TaskActivation("gelu", approximate=m.approximate),
    nn.Dropout: lambda m: TaskDropout(m.p),
    nn.Flatten: lambda m: TaskFlatten(m.start_dim, m.end_dim),
    nn.LayerNorm: TaskLayerNorm.from_module,
    nn.GroupNorm: TaskGroupNorm.from_module,
}


def _max_pool(m: nn.MaxPool2d):
    if m.return_indices:
        raise UnsupportedModuleError("MaxPool2d(return_indices=True)")
    return TaskMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


_CONVERTERS[nn.MaxPool2d] = _max_pool
_CONVERTERS[nn.AvgPool2d] = lambda m: TaskAvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                    m.count_include_pad, m.divisor_override)


def _convert(m: nn.Module, path: str) -> TaskModule:
    if isinstance(m, TaskModule):
        return m
    where = path or "<root>"
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        out = TaskSequential.__new__(TaskSequential)
        nn.Module.__init__(out)
        for name, child in m._modules.items():
            if child is None:
                continue
            out._modules[name] = _convert(child, f"{path}.{name}" if path else name)
        if m._parameters or m._buffers:
            raise UnsupportedModuleError(f"{where}: Sequential {type(m).__name__} with its own parameters/buffers")
        out.training = m.training
        return out
    for cls in type(m).__mro__:
        conv = _CONVERTERS.get(cls)
        if conv is not None:
            if type(m).forward is not cls.forward:
                raise UnsupportedModuleError(f"{where}: {type(m).__name__} overrides {cls.__name__}.forward")
            if (isinstance(m, nn.Flatten) and m.start_dim == 0):
                raise UnsupportedModuleError(f"{where}: Flatten(start_dim=0) merges the examples")
            try:
                out = conv(m)
            except UnsupportedModuleError as e:
                raise UnsupportedModuleError(f"{where}: {e}") from None
            out.training = m.training
            return out
    raise UnsupportedModuleError(f"{where}: {type(m).__name__} has no task-batched version")


def to_task_batched(module: nn.Module) -> TaskModule:
    """Convert ``module`` into the task-batched layers of this file.

    Supported: Linear, Conv2d (padding_mode='zeros'), BatchNorm1d/2d, LayerNorm, GroupNorm,
    ReLU, Tanh, Sigmoid, LeakyReLU, ELU, GELU, Identity, MaxPool2d (no return_indices), AvgPool2d, Flatten
    (start_dim >= 1), Dropout and (nested) Sequential whose forward is not overridden; task
    modules are returned as they are. The result holds the SAME Parameter and buffer objects
    under the same names (``dict(result.named_parameters())`` has the keys of
    ``dict(module.named_parameters())``), and copies each submodule's training flag at
    conversion time. Raises :class:`UnsupportedModuleError` (a TypeError) naming the first
    submodule it cannot convert, or when a parameter is shared by two submodules.

    Example::

        >>> net = to_task_batched(nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1)))
        >>> net(torch.randn(25, 10, 1)).shape
        torch.Size([25, 10, 1])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    seen = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise UnsupportedModuleError(f"parameter {name} is the same tensor as {seen[id(p)]} (tied weights)")
        seen[id(p)] = name
    return _convert(module, "")
