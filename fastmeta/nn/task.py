"""Task-batched layers: one set of parameters per task, all tasks in one call.

Files: this one holds the layers; ``task_layout`` the two activation layouts and the shared
checks; ``task_autograd`` the hand-written autograd Functions (weight-gradient layout, double
backwards); ``task_models`` the containers (TaskSequential, TaskMLP, TaskConv4) and the
conversion of plain modules. ``fastmeta.nn`` exports the public names of all of them.

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
  group (:class:`fastmeta.nn.task_autograd.GroupedConvBackwardFunction`).
* :class:`TaskBatchNorm1d` / :class:`TaskBatchNorm2d`: ``F.batch_norm`` on the same
  ``[N, T*C, ...]`` layout; statistics are per channel, hence per task.
* :class:`~fastmeta.nn.task_models.TaskSequential` keeps the ``[N, T*C, H, W]`` layout through consecutive
  conv / BN / activation / pool / dropout layers and converts only at the ends (the exit to
  ``[T, N, ...]`` -- e.g. at a Flatten before the classifier -- is a view, not a copy).

BatchNorm is transductive, as in MAML (Finn et al. 2017): in training mode every task is
normalised with its own batch statistics; in eval mode the running statistics are used if
the module tracks them, otherwise the batch statistics again. Task-batched calls NEVER update
the running statistics: the T tasks run with T different (adapted) parameter sets, so their
activations do not come from one model and averaging them into one running estimate would
describe none of them (and an inner loop would update them once per step and per HVP
recomputation). Update them, if needed, with an ordinary (unbatched) forward of the module.

:func:`~fastmeta.nn.task_models.to_task_batched` converts a plain module (Linear, Conv2d, BatchNorm1d/2d, ReLU / Tanh /
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

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta import _malloc
from fastmeta.nn.task_autograd import (
    GroupedConvFunction,
    MaxPool2dFunction,
    TaskLinearFunction,
    batch_norm_train,
    pair,
)
from fastmeta.nn.task_layout import (
    CHANNELS_LAST_MIN_PIXELS,
    NT,
    TN,
    batched,
    check_task_input,
    own_params,
    to_nt,
    to_tn,
)

__all__ = [
    "TaskActivation",
    "TaskAvgPool2d",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "TaskConv1d",
    "TaskConv2d",
    "TaskDropout",
    "TaskFlatten",
    "TaskGroupNorm",
    "TaskLayerNorm",
    "TaskLinear",
    "TaskMaxPool2d",
    "TaskModule",
    "UnsupportedModuleError",
]

class UnsupportedModuleError(TypeError):
    """Raised by :func:`~fastmeta.nn.task_models.to_task_batched` for a module it has no task-batched version of."""


class TaskModule(nn.Module):
    """Base class: ``forward(x [T, N, *in], params=None) -> [T, N, *out]``.

    Subclasses implement ``_task_forward(h, params, T, layout, prefix) -> (h, layout)``, which
    receives the activations in either internal layout and returns them in the layout it
    prefers (so that consecutive conv/BN/pool layers never permute)."""

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        T = check_task_input(x, params)
        _malloc.tune_for(x)  # large task-batched tensors: keep freed memory mapped (see _malloc)
        h, layout = self._task_forward(x, params, T, TN, "")
        return to_tn(h, layout, T)

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
        if layout != TN:
            h = to_tn(h, layout, T)
        shape = h.shape
        if len(shape) < 3 or shape[-1] != self.in_features:
            raise ValueError(
                f"x for {prefix or 'TaskLinear'} must have shape [T, N, *, {self.in_features}], got {tuple(shape)}"
            )
        if params is None:  # shared parameters: one matmul over all T*N rows
            return F.linear(h, self.weight, self.bias), TN
        p = own_params(self, params, T, prefix)
        w, wb = p["weight"]
        b, bb = p.get("bias", (None, False))
        if not wb and not bb:
            return F.linear(h, w, b), TN
        x3 = h if len(shape) == 3 else h.reshape(T, -1, self.in_features)
        out = TaskLinearFunction.apply(x3, batched(w, wb, T), None if b is None else batched(b, bb, T))
        if len(shape) != 3:
            out = out.reshape(*shape[:-1], self.out_features)
        return out, TN


class _TaskConv(TaskModule):
    """What TaskConv1d and TaskConv2d share: the configuration of the plain conv they adopt, its
    repr, and the input check (``_spatial`` spatial dimensions per sample)."""

    _spatial = 2
    _shape_doc = "H, W"
    _plain = nn.Conv2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, device=None, dtype=None):
        super().__init__()
        conv = self._plain(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           device=device, dtype=dtype)
        self._copy_config(conv)
        self.weight, self.bias = conv.weight, conv.bias

    def _copy_config(self, m) -> None:
        self.in_channels, self.out_channels = m.in_channels, m.out_channels
        self.kernel_size, self.stride, self.padding = m.kernel_size, m.stride, m.padding
        self.dilation, self.groups = m.dilation, m.groups

    @classmethod
    def from_module(cls, m):
        if m.padding_mode != "zeros":
            raise UnsupportedModuleError(f"{type(m).__name__} with padding_mode={m.padding_mode!r} (only 'zeros' "
                                         f"is task-batched)")
        self = cls.__new__(cls)
        TaskModule.__init__(self)
        self._copy_config(m)
        self.weight, self.bias = m.weight, m.bias
        return self

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")

    def _check_input(self, h, T, layout, prefix) -> None:
        C, d = self.in_channels, self._spatial
        if (layout == TN and (h.dim() != d + 3 or h.shape[2] != C)) or \
                (layout == NT and (h.dim() != d + 2 or h.shape[1] != T * C)):
            shown = tuple(to_tn(h, layout, T).shape)
            raise ValueError(f"x for {prefix or type(self).__name__} must have shape [T, N, {C}, {self._shape_doc}], "
                             f"got {shown}")


class TaskConv2d(_TaskConv):
    """2-D convolution with per-task weights: ``x [T, N, C, H, W] -> [T, N, O, H', W']``.

    One grouped ``F.conv2d`` (``groups = T * groups``) on the ``[N, T*C, H, W]`` layout.
    ``params``: ``weight [T, O, C/groups, kh, kw]``, ``bias [T, O]``. Only
    ``padding_mode='zeros'``.

    Equivalent PyTorch code::

        torch.stack([F.conv2d(x[t], weight[t], bias[t], stride, padding, dilation, groups)
                     for t in range(T)])
    """

    def _task_forward(self, h, params, T, layout, prefix):
        C = self.in_channels
        self._check_input(h, T, layout, prefix)
        p = own_params(self, params, T, prefix)
        w, wb = p["weight"]
        b, bb = p.get("bias", (None, False))
        if not wb and not bb:
            # Shared weights: [N, T*C, H, W] is [N*T, C, H, W] in memory, and [T, N, ...] flattens too.
            if layout == NT:
                N = h.shape[0]
                out = F.conv2d(h.reshape(N * T, C, *h.shape[2:]), w, b, self.stride, self.padding,
                               self.dilation, self.groups)
                return out.reshape(N, T * self.out_channels, *out.shape[2:]), NT
            out = F.conv2d(h.flatten(0, 1), w, b, self.stride, self.padding, self.dilation, self.groups)
            return out.unflatten(0, (T, h.shape[1])), TN
        h = to_nt(h, layout, T)
        if h.dim() == 4 and h.device.type == "cpu":
            if h.shape[-1] * h.shape[-2] >= CHANNELS_LAST_MIN_PIXELS:
                h = h.contiguous(memory_format=torch.channels_last)
            else:
                h = h.contiguous()
        w = batched(w, wb, T).flatten(0, 1)
        if b is not None:
            b = batched(b, bb, T).flatten()
        if (isinstance(self.padding, str) or h.device.type != "cpu"
                or torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0):
            out = F.conv2d(h, w, b, self.stride, self.padding, self.dilation, self.groups * T)
        else:
            out = GroupedConvFunction.apply(h, w, b, (pair(self.stride), pair(self.padding), pair(self.dilation),
                                               self.groups * T))
        return out, NT


class TaskConv1d(_TaskConv):
    """1-D convolution with per-task weights: ``x [T, N, C, L] -> [T, N, O, L']``.

    One grouped ``F.conv1d`` (``groups = T * groups``) on the ``[N, T*C, L]`` layout.
    ``params``: ``weight [T, O, C/groups, k]``, ``bias [T, O]``. Only ``padding_mode='zeros'``.

    Equivalent PyTorch code::

        torch.stack([F.conv1d(x[t], weight[t], bias[t], stride, padding, dilation, groups)
                     for t in range(T)])
    """

    _spatial = 1
    _shape_doc = "L"
    _plain = nn.Conv1d

    def _task_forward(self, h, params, T, layout, prefix):
        self._check_input(h, T, layout, prefix)
        p = own_params(self, params, T, prefix)
        w, wb = p["weight"]
        b, bb = p.get("bias", (None, False))
        cfg = (self.stride, self.padding, self.dilation)
        if not wb and not bb:  # shared weights: one conv over the T*N examples
            h = to_tn(h, layout, T)
            out = F.conv1d(h.flatten(0, 1), w, b, *cfg, self.groups)
            return out.unflatten(0, (T, h.shape[1])), TN
        h = to_nt(h, layout, T)
        w = batched(w, wb, T).flatten(0, 1)
        if b is not None:
            b = batched(b, bb, T).flatten()
        return F.conv1d(h, w, b, *cfg, self.groups * T), NT


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
        nd = h.dim() - (2 if layout == TN else 1)  # per-sample dims
        chan = h.shape[2] if layout == TN else h.shape[1] // T
        if nd not in self._per_sample_dims or chan != C or (layout == NT and h.shape[1] != T * C):
            shown = tuple(to_tn(h, layout, T).shape)
            want = self._shape_doc.replace("C", str(C))
            raise ValueError(f"x for {prefix or type(self).__name__} must have shape {want}, got {shown}")
        p = own_params(self, params, T, prefix)
        w, wb = p.get("weight", (None, False))
        b, bb = p.get("bias", (None, False))
        h = to_nt(h, layout, T)
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
            out = batch_norm_train(h, w, b, self.eps)
        return out, NT


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
        h = to_tn(h, layout, T)
        ns = self.normalized_shape
        if h.dim() < 2 + len(ns) or tuple(h.shape[h.dim() - len(ns):]) != ns:
            raise ValueError(f"x for {prefix or 'TaskLayerNorm'} must have shape [T, N, *, *{ns}], "
                             f"got {tuple(h.shape)}")
        p = own_params(self, params, T, prefix)
        w, wb = p.get("weight", (None, False))
        b, bb = p.get("bias", (None, False))
        if not wb and not bb:
            return F.layer_norm(h, ns, w, b, self.eps), TN
        out = F.layer_norm(h, ns, None, None, self.eps)
        view = (T,) + (1,) * (h.dim() - 1 - len(ns)) + ns  # task t's affine on its examples
        if w is not None:
            out = out * (w.reshape(view) if wb else w)
        if b is not None:
            out = out + (b.reshape(view) if bb else b)
        return out, TN


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
        h = to_tn(h, layout, T)
        C = self.num_channels
        if h.dim() < 3 or h.shape[2] != C:
            raise ValueError(f"x for {prefix or 'TaskGroupNorm'} must have shape [T, N, {C}, *], got {tuple(h.shape)}")
        p = own_params(self, params, T, prefix)
        w, wb = p.get("weight", (None, False))
        b, bb = p.get("bias", (None, False))
        flat = h.flatten(0, 1)
        if not wb and not bb:
            return F.group_norm(flat, self.num_groups, w, b, self.eps).view(h.shape), TN
        out = F.group_norm(flat, self.num_groups, None, None, self.eps).view(h.shape)
        view = (T, 1, C) + (1,) * (h.dim() - 3)  # task t's per-channel affine on its examples
        if w is not None:
            out = out * (w.reshape(view) if wb else w.reshape(view[2:]))
        if b is not None:
            out = out + (b.reshape(view) if bb else b.reshape(view[2:]))
        return out, TN


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
            own_params(self, params, T, prefix)  # raises on unexpected keys
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
            own_params(self, params, T, prefix)
        return F.dropout(h, self.p, self.training), layout


class _TaskPool2d(TaskModule):
    def _pool(self, h):  # pragma: no cover - abstract
        raise NotImplementedError

    def _task_forward(self, h, params, T, layout, prefix):
        if params:
            own_params(self, params, T, prefix)
        if layout == NT:  # channels are independent: pool [N, T*C, H, W] as is
            return self._pool(h), NT
        if h.dim() not in (4, 5):
            raise ValueError(f"x for {prefix or type(self).__name__} must have shape [T, N, C, H, W], got {tuple(h.shape)}")
        out = self._pool(h.flatten(0, 1))
        return out.unflatten(0, (T, h.shape[1])), TN


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
            return MaxPool2dFunction.apply(h, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
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
            own_params(self, params, T, prefix)
        if layout == NT and self.start_dim in (1, -(h.dim() - 1)) and self.end_dim == -1:
            # [N, T*C, *sp] -> [N, T, C*prod(sp)] -> [T, N, F]: a view of the conv output.
            N = h.shape[0]
            return h.reshape(N, T, -1).transpose(0, 1), TN
        h = to_tn(h, layout, T)
        s = self.start_dim + 1 if self.start_dim > 0 else self.start_dim
        e = self.end_dim + 1 if self.end_dim >= 0 else self.end_dim
        return h.flatten(s, e), TN
