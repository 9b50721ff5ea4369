"""Containers and models of task-batched layers, and the conversion of plain modules into them.

* :class:`TaskSequential` keeps the ``[N, T*C, H, W]`` layout (:mod:`fastmeta.nn.task_layout`)
  through consecutive conv / BN / activation / pool / dropout layers and converts only at the
  ends; :class:`TaskMLP` and :class:`TaskConv4` are the standard few-shot models built from it.
* :func:`to_task_batched` converts a plain module into the layers of :mod:`fastmeta.nn.task`
  (and these containers), sharing the SAME Parameter and buffer objects under the same names.
"""

from __future__ import annotations

import itertools

from torch import nn

from fastmeta.nn.task import (
    TaskActivation,
    TaskAvgPool2d,
    TaskBatchNorm1d,
    TaskBatchNorm2d,
    TaskConv1d,
    TaskConv2d,
    TaskDropout,
    TaskFlatten,
    TaskGroupNorm,
    TaskLayerNorm,
    TaskLinear,
    TaskMaxPool2d,
    TaskModule,
    UnsupportedModuleError,
)

__all__ = ["TaskConv4", "TaskMLP", "TaskSequential", "to_task_batched"]


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
    nn.Conv1d: TaskConv1d.from_module,
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
    """Convert ``module`` into the task-batched layers of :mod:`fastmeta.nn.task`.

    Supported: Linear, Conv1d/Conv2d (padding_mode='zeros'), BatchNorm1d/2d, LayerNorm, GroupNorm,
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
