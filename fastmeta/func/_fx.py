"""Task-batched execution of a module with its own ``forward``, by tracing it with ``torch.fx``.

``torch.fx.symbolic_trace`` records the module's forward as a graph of leaf-module calls
(``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``, ...) and tensor operations (``x.view``,
``x.mean(dim=...)``, ``+``, ``F.relu``, ...). :class:`TracedTaskModel` runs that graph on T
tasks at once:

* every leaf module is replaced by its task-batched layer (:func:`fastmeta.nn.to_task_batched`,
  sharing the Parameters and buffers) and gets its own per-task parameters;
* between layers the activations are ``[T*N, *per_example]`` (task t, example n at row
  ``t*N + n``), so the forward's own operations -- ``x.view(x.size(0), -1)``,
  ``x.mean(dim=[2, 3])``, indexing ``x[:, :k]``, residual adds -- see an ordinary batch of
  examples and keep working. Consecutive task layers (conv -> BN -> ReLU -> pool) pass their
  internal layout to each other directly; it is folded into ``[T*N, ...]`` only where a graph
  operation reads it.

* functional layers whose weights are the module's own Parameters -- ``F.conv2d(x, self.w, self.b,
  stride, padding, dilation, groups)``, ``F.linear(x, w, b)``, ``F.batch_norm(x, running_mean,
  running_var, weight, bias, training, momentum, eps)``, as in the MAML-PyTorch ``Learner``
  that indexes its own ``ParameterList`` -- run as the same task-batched layers (a functional
  batch norm with ``training=True`` uses each task's batch statistics and, like the task
  layers, does not update the running statistics it is given); so do ``F.max_pool2d`` and
  ``F.avg_pool2d`` (staying in the layout of the conv layers around them).

Operations are accepted only when they act on each example separately (elementwise ops, view/
reshape that keep the first dimension, reductions and indexing over dimensions >= 1, ...):
anything that could mix the examples of different tasks in one batch (a reduction over all
dimensions, ``.item()``), a parameter or buffer used directly in the forward other than as a
functional layer's weight (a ``get_attr`` node: ``x * self.scale``), a leaf without a
task-batched layer are refused with a reason, and the caller
(:class:`fastmeta.func.TaskFunction`) falls back to ``torch.func.vmap``. Tied weights are served: every use of a Parameter reachable under
several names reads the per-task tensor of its first name in ``named_parameters()``.

The trace is taken once (at planning time), with every forward argument after the first bound
to its default value; Python control flow and attributes read by the forward (e.g. an image
size used in a ``view``) are frozen at that time.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastmeta import _malloc
from fastmeta.nn.task import TaskModule, UnsupportedModuleError, _TaskBatchNorm
from fastmeta.nn.task_layout import TN, to_tn
from fastmeta.nn.task_models import to_task_batched

# Kinds of the values flowing through the graph (decided statically, per node).
_BATCH = "batch"  # tensor whose dim 0 is the T*N examples
_TUPLE = "batch tuple"  # tuple of such tensors (x.max(dim=1))
_SIZE = "size"  # x.size() / x.shape of a batch tensor (entry 0 is T*N)
_B = "T*N"  # the int x.size(0)
_META = "constant"  # anything else not derived from the examples (ints, dtypes, ...)
_PARAM = "parameter"  # a parameter or buffer of the module read by the forward (get_attr)

_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.tanh, torch.sigmoid, torch.exp,
    torch.log, torch.abs, torch.clamp, torch.sqrt, torch.square, torch.where,
    F.relu, F.relu6, F.elu, F.selu, F.gelu, F.leaky_relu, F.silu, F.mish, F.softplus, F.hardtanh,
    F.tanh, F.sigmoid, F.dropout, F.dropout2d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad, F.interpolate,
}
# ops that may run on a task layer's internal layout directly (all tensor operands in the same
# layout and shape, the rest Python numbers): a residual add of two conv branches stays a view
_LAYOUT_FREE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                torch.mul, torch.relu, torch.tanh, torch.sigmoid, F.relu, F.leaky_relu, F.elu, F.gelu, F.silu,
                "add", "sub", "mul", "relu", "tanh", "sigmoid", "__add__", "__mul__", "__sub__"}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "relu", "tanh", "sigmoid", "exp", "log", "abs", "sqrt",
    "square", "clamp", "contiguous", "float", "double", "type_as", "__add__", "__mul__", "__sub__",
    "__truediv__", "__radd__", "__rmul__",
}
# (positional index of dim, keyword) for ops over a dimension; dim 0 (the examples) is refused
_DIM_FUNCS = {
    torch.mean: 1, torch.sum: 1, torch.amax: 1, torch.amin: 1, torch.logsumexp: 1, torch.softmax: 1,
    torch.log_softmax: 1, F.softmax: 1, F.log_softmax: 1, F.normalize: 2, torch.flatten: 1,
    torch.cat: 1, torch.stack: 1, torch.max: 1, torch.min: 1,
}
_DIM_METHODS = {"mean": 1, "sum": 1, "amax": 1, "amin": 1, "logsumexp": 1, "softmax": 1, "log_softmax": 1,
                "flatten": 1, "max": 1, "min": 1, "std": 1, "var": 1, "norm": 2, "unsqueeze": 1, "squeeze": 1}
_DIM_KW = {F.normalize: "dim", torch.flatten: "start_dim", "flatten": "start_dim", "norm": "dim"}
_TUPLE_OPS = {torch.max, torch.min, "max", "min"}  # with a dim: (values, indices)
_META_FUNCS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.floordiv,
               torch._assert, getattr, fx._symbolic_trace._assert_is_none}


# functional layers taken as task layers when their weights are the module's own Parameters:
# the signatures their fx nodes are bound with


def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...


def _linear(input, weight, bias=None): ...


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5): ...


def _max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False): ...


def _avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None): ...


_FUNCTIONAL = {torch.conv2d: _conv2d, F.linear: _linear, F.batch_norm: _batch_norm}
# functional pools run as task layers (in the conv run's own layout, no fold to [T*N, ...] and
# back); one they cannot take (return_indices=True) stays a kept per-example operation
_FUNCTIONAL_POOLS = {F.max_pool2d: _max_pool2d, F.avg_pool2d: _avg_pool2d}


class _AnyBatchNorm(_TaskBatchNorm):
    """``F.batch_norm``'s task layer: per-sample ``[C]``, ``[C, L]`` or ``[C, H, W]``."""

    _per_sample_dims = (1, 2, 3)
    _shape_doc = "[T, N, C, *spatial]"



def _name(target) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


class _Refused(Exception):
    pass


def _attr(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _functional_pool(node) -> tuple[TaskModule, str] | None:
    """``(layer, mapping text)`` for ``F.max_pool2d`` / ``F.avg_pool2d`` on the examples with
    constant arguments, or None (then it is kept as a per-example operation)."""
    try:
        bound = inspect.signature(_FUNCTIONAL_POOLS[node.target]).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = dict(bound.arguments)
    a.pop("input")
    if any(isinstance(v, fx.Node) for v in a.values()) or a.pop("return_indices", False):
        return None
    try:
        plain = nn.MaxPool2d(**a) if node.target is F.max_pool2d else nn.AvgPool2d(**a)
        layer = to_task_batched(plain)
    except (TypeError, ValueError):  # arguments the module form does not take: keep the call
        return None
    return layer, f"{_name(node.target)} -> {type(layer).__name__}({layer.extra_repr()})"


def _functional_layer(node, attrs, canonical) -> tuple[TaskModule, tuple, list, str]:
    """``(layer, keys, covered names, mapping text)`` for a functional-layer node whose weights
    are the module's Parameters, or raise _Refused."""
    what = _name(node.target)
    try:
        bound = inspect.signature(_FUNCTIONAL[node.target]).bind(*node.args, **node.kwargs)
    except TypeError as e:
        raise _Refused(f"{what}: {e}") from None
    if not node.args:
        raise _Refused(f"{what}: the input must be passed positionally")
    bound.apply_defaults()
    a = dict(bound.arguments)
    names = {}

    def tensor(key, parameter):
        v = a[key]
        if v is None:
            return None
        t = attrs.get(v) if isinstance(v, fx.Node) else None
        if t is None or (parameter and not isinstance(t, nn.Parameter)):
            raise _Refused(f"{what}: {key} must be {'a Parameter' if parameter else 'a tensor'} of the module "
                           f"read in the forward (self.<name>)")
        names[key] = v.target
        return t

    for key, v in a.items():
        if key not in ("input", "weight", "bias", "running_mean", "running_var") and isinstance(v, fx.Node):
            raise _Refused(f"{what}: {key} is computed in the forward; it must be a constant")
    w, b = tensor("weight", True), tensor("bias", True)
    if node.target is F.batch_norm:
        rm, rv = tensor("running_mean", False), tensor("running_var", False)
        if (w is None) != (b is None) or (rm is None) != (rv is None):
            raise _Refused(f"{what}: give both weight and bias (or neither), both running statistics (or neither)")
        ref = w if w is not None else rm
        if ref is None:
            raise _Refused(f"{what} without weights or running statistics: no channel count")
        plain = nn.BatchNorm1d(ref.shape[0], a["eps"], a["momentum"], affine=w is not None,
                               track_running_stats=rm is not None, device="meta")
        plain.weight, plain.bias = w, b
        plain._buffers.update(running_mean=rm, running_var=rv, num_batches_tracked=None)
        layer = _AnyBatchNorm.from_module(plain)
        layer.train(bool(a["training"]))
    elif w is None:
        raise _Refused(f"{what} without a weight")
    elif node.target is torch.conv2d:
        g = a["groups"]
        plain = nn.Conv2d(w.shape[1] * g, w.shape[0], tuple(w.shape[2:]), a["stride"], a["padding"],
                          a["dilation"], g, bias=b is not None, device="meta")
        plain.weight, plain.bias = w, b
        layer = to_task_batched(plain)
    else:
        plain = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        plain.weight, plain.bias = w, b
        layer = to_task_batched(plain)
    keys = tuple((own, canonical[id(p)]) for own, p in layer._parameters.items() if p is not None)
    covered = [canonical[id(attrs[t])] for k, t in a.items()
               if k in ("running_mean", "running_var") and isinstance(t, fx.Node) and id(attrs[t]) in canonical]
    args = ", ".join(f"{k}={v}" for k, v in names.items())
    return layer, keys, covered, f"{what}({args}) -> {type(layer).__name__}({layer.extra_repr()})"


class NotPerExampleError(ValueError):
    """Raised by a traced call whose operation turned out, at this input's shapes, to work
    across the examples (the caller falls back to another path)."""


class _Ref:
    """Stands for a graph value in a step's arguments (no torch.fx object outlives planning: a
    traced graph references its tracer, which holds the user's root module)."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"%{self.name}"


@dataclass
class _Op:
    """What the executor needs of one graph node."""

    op: str
    target: object
    args: tuple
    kwargs: dict
    inputs: tuple  # the _Refs it reads
    out: _Ref
    desc: str
    kind: str | None
    min_dim: int = 0  # dim=-1 is dim 0 of a 1-D tensor: such an operand must have 2+ dims


def _subst(a, f):
    return fx.node.map_aggregate(a, lambda v: f(v) if isinstance(v, _Ref) else v)


@dataclass
class _Step:
    node: object  # fx.Node while planning, _Op after
    op: str  # "input", "const", "layer", "call", "output"
    layer: TaskModule | None = None
    prefix: str = ""
    keys: tuple = ()  # (own name, full name) of the layer's parameters
    free: list = field(default_factory=list)  # nodes whose value is dead after this step
    layout_free: bool = False


class _Lazy:
    """A value produced by a task layer, in that layer's internal layout."""

    __slots__ = ("folded", "h", "layout")

    def __init__(self, h, layout):
        self.h, self.layout, self.folded = h, layout, None


def _tn(v, T):
    """``[T, N, ...]`` form of a value (for a task layer)."""
    if isinstance(v, _Lazy):
        return v.h, v.layout
    return v.unflatten(0, (T, v.shape[0] // T)), TN


def _fold(v, T, B):
    """``[T*N, ...]`` form of a value (for a graph operation)."""
    if not isinstance(v, _Lazy):
        return v
    if v.folded is None:
        h = to_tn(v.h, v.layout, T)
        v.folded = h.reshape(B, *h.shape[2:])
    return v.folded


class TracedTaskModel:
    """``module``'s traced forward on T tasks at once (see the module docstring).

    Build with :func:`trace`; call ``model(params, x)`` with ``x [T, N, *in]`` and ``params``
    ``{name: [T, *shape]}`` (or None: the module's own parameters for every task) -> ``[T, N, *out]``.

    Attributes:
        mapping: one line per graph node: the leaf module and its task-batched layer, or the
            operation kept as it is.
    """

    def __init__(self, steps: list[_Step], mapping: list[str]):
        self._steps = steps
        self.mapping = mapping

    def __call__(self, params, x: torch.Tensor) -> torch.Tensor:
        T, N = x.shape[0], x.shape[1]
        B = T * N
        _malloc.tune_for(x)  # large task-batched tensors: keep freed memory mapped (see _malloc)
        env = {}
        for st in self._steps:
            node = st.node
            if st.op == "layer":
                h, layout = _tn(env[node.args[0]], T)
                sub = None
                if params is not None:
                    sub = {own: params[full] for own, full in st.keys if full in params}
                h, layout = st.layer._task_forward(h, sub, T, layout, st.prefix)
                env[node.out] = _Lazy(h, layout)
            elif st.op == "call":
                if st.layout_free:
                    lazy = _same_layout(node, env)
                    if lazy is not None:
                        a, kw = _subst((node.args, node.kwargs), lambda n: env[n].h)
                        fn = getattr(a[0], node.target) if node.op == "call_method" else node.target
                        env[node.out] = _Lazy(fn(*(a[1:] if node.op == "call_method" else a), **kw), lazy.layout)
                        for n in st.free:
                            env.pop(n, None)
                        continue
                args, kwargs = _subst((node.args, node.kwargs), lambda n: _fold(env[n], T, B))
                if node.min_dim:
                    first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
                    if isinstance(first, torch.Tensor) and first.dim() < node.min_dim:
                        raise NotPerExampleError(f"{node.desc} with dim=-1 on a "
                                         f"{first.dim()}-D tensor would work across the examples")
                fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
                if node.op == "call_method":
                    args = args[1:]
                out = fn(*args, **kwargs)
                if isinstance(out, torch.Tensor) and node.kind == _BATCH and (out.dim() == 0 or out.shape[0] != B):
                    raise NotPerExampleError(f"{node.desc} produced shape "
                                     f"{tuple(out.shape)}, expected T*N={B} examples first")
                env[node.out] = out
            elif st.op == "input":
                env[node.out] = x.reshape(B, *x.shape[2:])
            elif st.op == "const":
                env[node.out] = node.args[0] if node.args else None
            elif st.op == "param":  # read by the functional layers that follow, as their weights
                continue
            else:  # output
                v = env[node.args[0]]
                if isinstance(v, _Lazy):
                    return to_tn(v.h, v.layout, T)
                if v.shape[0] != B:
                    raise NotPerExampleError(f"the output has shape {tuple(v.shape)}, "
                                     f"expected T*N={B} examples first")
                return v.unflatten(0, (T, N))
            for n in st.free:
                env.pop(n, None)
        raise RuntimeError("traced graph without output")  # pragma: no cover


def _same_layout(node, env):
    """The first operand if every tensor operand is a task layer's output in one layout and
    shape (and the others are not tensors), else None."""
    first = None
    for a in node.inputs:
        v = env[a]
        if not isinstance(v, _Lazy):
            return None
        if first is None:
            first = v
        elif v.layout != first.layout or v.h.shape != first.h.shape:
            return None
    return first


def _dims(node) -> list | None:
    """The dim argument(s) of a dimension-wise node (``node.args`` counts ``self`` of a method
    as 0, like the tensor of a function), or None when absent."""
    pos = _DIM_FUNCS[node.target] if node.op == "call_function" else _DIM_METHODS[node.target]
    key = _DIM_KW.get(node.target, "dim")
    d = node.kwargs.get(key, node.args[pos] if len(node.args) > pos else None)
    if d is None:
        return None
    return list(d) if isinstance(d, (list, tuple)) else [d]


def _min_dim(node) -> int:
    dim_op = (node.op == "call_function" and node.target in _DIM_FUNCS) or \
        (node.op == "call_method" and node.target in _DIM_METHODS)
    if not dim_op or node.target in ("unsqueeze", "squeeze"):
        return 0
    return 2 if -1 in (_dims(node) or ()) else 0


def _kind(node: fx.Node, kinds: dict) -> str:
    """Static kind of a graph operation's result, or raise _Refused with the reason."""

    def k(a):
        return kinds.get(a, _META) if isinstance(a, fx.Node) else _META

    args = list(node.args) + list(node.kwargs.values())
    flat = []
    fx.node.map_arg(args, flat.append)
    arg_kinds = {k(a) for a in flat}
    what = f"{node.op} {_name(node.target)}"
    target = node.target
    first = k(node.args[0]) if node.args else _META
    if not arg_kinds & {_BATCH, _TUPLE, _SIZE, _B}:
        if node.op == "call_function" and target in _META_FUNCS:
            return _META
        raise _Refused(f"{what} does not involve the examples (a constant computed in the forward)")
    if target is operator.getitem:
        if first == _TUPLE:
            return _BATCH
        if first == _SIZE:
            return _B if node.args[1] == 0 else _META
        if first == _META:
            return _META
        idx = node.args[1]
        lead = idx[0] if isinstance(idx, tuple) and idx else idx
        if (first == _BATCH and isinstance(lead, slice) and lead == slice(None)
                and not any(isinstance(i, fx.Node) for i in (idx if isinstance(idx, tuple) else (idx,)))):
            return _BATCH
        raise _Refused(f"{what} {idx!r}: indexing must keep dim 0 whole (x[:, ...])")
    if target is getattr:
        if node.args[1] == "shape":
            return _SIZE
        if node.args[1] in ("dtype", "device", "ndim"):
            return _META
        raise _Refused(f"{what} {node.args[1]!r}")
    if node.op == "call_method" and target == "size":
        if first != _BATCH:
            raise _Refused(f"{what} of a non-example value")
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return _SIZE if d is None else (_B if d == 0 else _META)
    if node.op == "call_method" and target in ("dim", "numel"):
        if target == "numel":
            raise _Refused(f"{what}: the number of elements counts every task's examples")
        return _META
    if node.op == "call_method" and target in ("view", "reshape"):
        shape = node.args[1:] if len(node.args) > 1 else node.kwargs.get("shape", ())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        if first == _BATCH and shape and (k(shape[0]) == _B or shape[0] == -1) \
                and all(k(s) in (_META, _B) or isinstance(s, int) for s in shape[1:]):
            if shape[0] == -1 and not all(isinstance(s, int) and s >= 0 for s in shape[1:]):
                raise _Refused(f"{what}{tuple(shape)}: with -1 first, the other sizes must be constants")
            return _BATCH
        raise _Refused(f"{what}{tuple(shape)}: the new shape must start with x.size(0) (or -1)")
    if _BATCH not in arg_kinds:
        raise _Refused(f"{what} on sizes of the examples")
    if (node.op == "call_function" and target in _DIM_FUNCS) or (node.op == "call_method" and target in _DIM_METHODS):
        dims = _dims(node)
        if dims is None:
            if target in (torch.flatten, "flatten", torch.cat, torch.stack):
                dims = [0]
            else:
                raise _Refused(f"{what} without a dim reduces over all examples of all tasks")
        if not all(isinstance(d, int) and (d >= 1 or d == -1) for d in dims):
            raise _Refused(f"{what} over dim {dims}: only dims >= 1 (or -1) keep the examples apart")
        return _TUPLE if target in _TUPLE_OPS else _BATCH
    if (node.op == "call_function" and target in _ELEMENTWISE_FUNCS) or \
            (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
        return _BATCH
    raise _Refused(f"{what} is not known to act on each example separately")


def trace(module: nn.Module) -> tuple[TracedTaskModel | None, str, bool]:
    """``(model, "", False)``, or ``(None, reason, trace_failed)`` when ``module`` cannot run on
    the traced task-batched path (``trace_failed``: ``torch.fx`` itself could not trace it)."""
    try:
        sig = inspect.signature(module.forward)
        extra = list(sig.parameters.values())[1:]
        concrete = {}
        for prm in extra:
            if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
                continue
            if prm.default is prm.empty:
                return None, f"forward takes a second argument without a default ({prm.name})", False
            concrete[prm.name] = prm.default
        gm = fx.symbolic_trace(module, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - any tracing failure: report it, use the other paths
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"torch.fx could not trace it ({type(e).__name__}: {msg})", True
    try:
        return _build(module, gm.graph), "", False
    except _Refused as e:
        return None, str(e), False


def _build(module: nn.Module, graph: fx.Graph) -> TracedTaskModel:
    # tied weights (one Parameter reachable under several names, e.g. a submodule registered
    # twice): every use reads the per-task tensor of its first name, so it is adapted once per
    # task and its gradient sums over the uses
    canonical = {id(p): n for n, p in module.named_parameters()}
    attrs: dict = {}  # get_attr node -> the tensor it reads
    kinds: dict = {}
    steps, mapping = [], []
    covered = set()
    placeholders = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            steps.append(_Step(node, "input" if placeholders == 1 else "const"))
            kinds[node] = _BATCH if placeholders == 1 else _META
            mapping.append(f"{node.name}: input [T, N, ...] -> [T*N, ...]" if placeholders == 1
                           else f"{node.name}: bound to {node.args[0] if node.args else None!r}")
        elif node.op == "get_attr":
            t = _attr(module, node.target)
            if not isinstance(t, torch.Tensor):
                raise _Refused(f"the forward reads {node.target} ({type(t).__name__}), not a parameter or buffer")
            attrs[node], kinds[node] = t, _PARAM
            steps.append(_Step(node, "param"))
            mapping.append(f"{node.name}: reads {node.target}")
        elif node.op == "call_module":
            leaf = module.get_submodule(node.target)
            if len(node.args) != 1 or node.kwargs or kinds.get(node.args[0]) != _BATCH:
                raise _Refused(f"{node.target} ({type(leaf).__name__}) is called with other than one example tensor")
            try:
                layer = to_task_batched(leaf)
            except UnsupportedModuleError as e:
                raise _Refused(f"{node.target}: {str(e).removeprefix('<root>: ')}") from None
            keys = tuple((n, canonical[id(p)]) for n, p in leaf._parameters.items() if p is not None)
            covered.update(full for _, full in keys)
            steps.append(_Step(node, "layer", layer, f"{node.target}.", keys))
            kinds[node] = _BATCH
            mapping.append(f"{node.target}: {type(leaf).__name__} -> {type(layer).__name__}"
                           + (f"({layer.extra_repr()})" if layer.extra_repr() else ""))
        elif (node.op == "call_function" and node.target in _FUNCTIONAL and node.args
              and kinds.get(node.args[0]) == _BATCH):
            try:
                layer, keys, stats, text = _functional_layer(node, attrs, canonical)
            except (TypeError, ValueError) as e:  # arguments the module form rejects (UnsupportedModuleError too)
                raise _Refused(f"{_name(node.target)}: {e}") from None
            covered.update(full for _, full in keys)
            covered.update(stats)
            steps.append(_Step(node, "layer", layer, f"{node.name}.", keys))
            kinds[node] = _BATCH
            mapping.append(f"{node.name}: {text}")
        elif (node.op == "call_function" and node.target in _FUNCTIONAL_POOLS and node.args
              and kinds.get(node.args[0]) == _BATCH and (pool := _functional_pool(node)) is not None):
            steps.append(_Step(node, "layer", pool[0], f"{node.name}.", ()))
            kinds[node] = _BATCH
            mapping.append(f"{node.name}: {pool[1]}")
        elif node.op in ("call_function", "call_method"):
            read = [a.target for a in node.all_input_nodes if kinds.get(a) == _PARAM]
            if read:
                raise _Refused(f"the forward reads {read[0]} directly in {node.op} {_name(node.target)} (a "
                               f"parameter or buffer used outside its module and outside F.conv2d / F.linear / "
                               f"F.batch_norm, e.g. x * self.scale)")
            kinds[node] = _kind(node, kinds)
            steps.append(_Step(node, "call", layout_free=kinds[node] == _BATCH and node.target in _LAYOUT_FREE))
            mapping.append(f"{node.name}: {node.op} {_name(node.target)} (kept; {kinds[node]})")
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or kinds.get(out) != _BATCH:
                raise _Refused("the forward must return one tensor of examples")
            steps.append(_Step(node, "output"))
    missing = [n for n, p in module.named_parameters() if n not in covered]
    if missing:
        raise _Refused(f"parameters {missing} are not used by a task-batchable leaf module of the forward")
    # free each value after its last use (memory: activations are kept by autograd, not by env)
    last = {}
    for i, st in enumerate(steps):
        fx.node.map_arg((st.node.args, st.node.kwargs), lambda n, i=i: last.__setitem__(n, i))
    refs = {st.node: _Ref(st.node.name) for st in steps}
    for n, i in last.items():
        steps[i].free.append(refs[n])
    for st in steps:
        n = st.node
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), refs.__getitem__)
        st.node = _Op(n.op, n.target, args, kwargs, tuple(refs[a] for a in n.all_input_nodes), refs[n],
                      n.format_node(), kinds.get(n), _min_dim(n) if st.op == "call" else 0)
    return TracedTaskModel(steps, mapping)


__all__ = ["NotPerExampleError", "TracedTaskModel", "trace"]
