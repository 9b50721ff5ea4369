"""TaskFunction: run any nn.Module on T tasks at once, each with its own parameters."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastmeta.func import _fx
from fastmeta.func._call import call_with, param_slots
from fastmeta.nn.task import TaskActivation, TaskLinear, TaskModule, UnsupportedModuleError
from fastmeta.nn.task_layout import TN, check_task_input, to_tn
from fastmeta.nn.task_models import TaskSequential, to_task_batched

_MLP_ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")


@dataclass(frozen=True)
class MLPSpec:
    """A pure ``Linear (act Linear)*`` stack, for the analytic HVP (``fastmeta.ops.mlp_grad_hvp``).

    weights: parameter name of each Linear weight ``[out, in]``, input to output.
    biases: parameter name of each Linear bias, or None where the Linear has no bias.
    activation: "relu", "tanh", "sigmoid" or "identity", applied after every Linear but the last.
    """

    weights: tuple[str, ...]
    biases: tuple[str | None, ...]
    activation: str


def _mlp_spec(task: TaskModule) -> MLPSpec | None:
    if isinstance(task, TaskLinear):
        layers, prefix = [("", task)], ""
    elif isinstance(task, TaskSequential):
        layers = list(task._modules.items())
        prefix = "."
    else:
        return None
    if not layers or len(layers) % 2 == 0:
        return None
    acts = set()
    weights, biases = [], []
    for i, (name, m) in enumerate(layers):
        if i % 2 == 0:
            if type(m) is not TaskLinear or not m.weight.requires_grad:
                return None
            if m.bias is not None and not m.bias.requires_grad:
                return None
            pre = name + prefix if prefix else ""
            weights.append(pre + "weight")
            biases.append(pre + "bias" if m.bias is not None else None)
        else:
            if type(m) is not TaskActivation or m.name not in _MLP_ACTIVATIONS:
                return None
            acts.add(m.name)
    if len(acts) > 1:
        return None
    return MLPSpec(tuple(weights), tuple(biases), acts.pop() if acts else "identity")


class _Fingerprint:
    """Cheap identity of a module tree, checked on every call: the training flag of every
    submodule, the identity of every child module / parameter / buffer (``.to()`` replaces
    buffers, ``net[0] = ...`` replaces children) and every parameter's requires_grad (it
    changes ``names``). A few microseconds for small models."""

    __slots__ = ("dicts", "flags", "grads", "ids", "params", "states")

    def __init__(self, module: nn.Module):
        mods = list(module.modules())
        # Hold the modules' __dict__s and parameter dicts, never the modules themselves: the
        # per-module cache is weak, and a strong reference to the root would keep it alive.
        self.states = [m.__dict__ for m in mods]
        self.dicts = [d for m in mods for d in (m._modules, m._parameters, m._buffers)]
        self.params = [p for m in mods for p in m._parameters.values() if p is not None]
        self.flags = [st["training"] for st in self.states]
        self.ids = [id(v) for d in self.dicts for v in d.values()]
        self.grads = [p.requires_grad for p in self.params]

    def unchanged(self) -> bool:
        return (
            [st["training"] for st in self.states] == self.flags
            and [id(v) for d in self.dicts for v in d.values()] == self.ids
            and [p.requires_grad for p in self.params] == self.grads
        )


class TaskFunction:
    """``module`` as a function of per-task parameters: ``fn(params, x) -> [T, N, *out]``.

    Attributes:
        module: the user's module (its parameters are shared, never copied).
        path: "batched" (every submodule has a task-batched layer in ``fastmeta.nn``),
            "traced" (a module with its own forward, traced with ``torch.fx``: every leaf module
            runs as its task-batched layer, the forward's own tensor operations on the
            ``[T*N, ...]`` examples; see ``fastmeta/func/_fx.py``), "vmap"
            (``torch.func.vmap`` of ``torch.func.functional_call`` over the tasks) or "loop"
            (a per-task ``functional_call`` loop, when vmap failed on this module).
        reason: why "vmap" or "loop" was chosen ("" for "batched" and "traced"). When tracing
            itself fails (``torch.fx`` raises) a one-line warning says so at planning time.
        mapping: on the "traced" path, one line per graph node (leaf -> task layer, or the
            operation kept); see :func:`explain`.
        names: names of the ``requires_grad`` parameters, in ``named_parameters()`` order;
            the keys ``params`` must have.
        mlp: an :class:`MLPSpec` iff the module is a pure ``Linear (act Linear)*`` stack.

    Call: ``fn(params, x)`` with ``params`` a dict ``name -> [T, *shape]`` (or None: the
    module's own parameters for every task) and ``x [T, N, *in]``.

    Equivalent PyTorch code (for a module without shared submodules, see below)::

        torch.stack([torch.func.functional_call(module, {n: p[t] for n, p in params.items()}, (x[t],))
                     for t in range(T)])

    Tied weights: a Parameter held by several submodules, or reached through a submodule
    registered under two names (learn2learn's ``OmniglotCNN``), is ONE key of ``params`` (its
    first name in ``named_parameters()``) and is substituted everywhere it is held; the module
    holds its own Parameters again after every call, also when the call raises.
    ``torch.func.functional_call`` would leave such a module holding the per-task tensors. The
    batched path (``nn.Sequential`` conversion) refuses tied weights; the traced path serves
    them (each use reads the first name's tensor), else they take the vmap or loop path.

    Path choice is cached (:func:`task_function`); each call compares a cheap fingerprint of
    the module tree (submodules, training flags, parameter/buffer identities, requires_grad)
    and re-plans when it changed. In-place edits of attributes that are not parameters or
    buffers (e.g. ``conv.stride = 2``) are not detected: call ``task_function(m, refresh=True)``.

    Buffers (e.g. BatchNorm running statistics) are shared by the tasks. The batched and traced
    paths never update running statistics (see ``fastmeta.nn.task``: in training mode each task
    is normalised with its own batch statistics, the running buffers stay as they are); the
    vmap path fails on modules that update buffers in place and such modules run on the loop
    path, which updates them once per task.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self._module_ref = weakref.ref(module)
        self._plan(module)

    @property
    def module(self) -> nn.Module:
        m = self._module_ref()
        if m is None:
            raise RuntimeError("the module of this TaskFunction was garbage collected")
        return m

    def _plan(self, module: nn.Module) -> None:
        self._fp = _Fingerprint(module)
        named = dict(module.named_parameters())
        self.names = tuple(n for n, p in named.items() if p.requires_grad)
        self._shapes = {n: tuple(p.shape) for n, p in named.items()}
        self._slots = param_slots(module)
        self._task = None
        self._traced = None
        self.mapping = ()
        self.mlp = None
        self._probed = False
        try:
            self._task = to_task_batched(module)
        except UnsupportedModuleError as e:
            traced, why, trace_failed = _fx.trace(module)
            if traced is not None:
                self._traced, self.mapping = traced, tuple(traced.mapping)
                self.path, self.reason = "traced", ""
                return
            self.path = "vmap"
            traced_why = "" if why == str(e) else f"; not on the traced path ({why})"
            self.reason = f"{type(module).__name__} is not task-batchable ({e}){traced_why}; using torch.func.vmap"
            if trace_failed:
                warnings.warn(f"fastmeta.func: {self.reason}", stacklevel=4)
            return
        self.path, self.reason = "batched", ""
        self.mlp = _mlp_spec(self._task)
        if self._task is module:  # already task-batched: no strong reference (the cache is weak)
            self._task = None

    def refresh(self) -> None:
        """Re-plan (after a structural edit that the fingerprint does not see)."""
        self._plan(self.module)

    def params(self) -> dict[str, nn.Parameter]:
        """The module's own (unbatched) ``requires_grad`` parameters, name -> Parameter."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def expand(self, T: int, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{name: p.expand(T, *p.shape)}``: differentiable (gradients sum over the T tasks into
        ``p``), no copy. ``params`` defaults to :meth:`params`."""
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        if params is None:
            params = self.params()
        return {n: p.expand(T, *p.shape) for n, p in params.items()}

    def _check_params(self, params, T: int) -> None:
        if params is None:
            return
        shapes = self._shapes
        for n in self.names:
            if n not in params:
                raise ValueError(f"params is missing '{n}': expected shape {(T, *shapes[n])} (T={T} from x.shape[0])")
        for n, v in params.items():
            shape = shapes.get(n)
            if shape is None:
                raise ValueError(f"params has unexpected key '{n}'; the module's parameters are {list(self.names)}")
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"params['{n}'] must be a torch.Tensor, got {type(v).__name__}")
            if tuple(v.shape) != (T, *shape):
                raise ValueError(
                    f"params['{n}'] has shape {tuple(v.shape)}, expected [T, *{shape}] = {(T, *shape)} "
                    f"(T={T} from x.shape[0])"
                )

    def __call__(self, params: Mapping[str, torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if not self._fp.unchanged():
            self._plan(module)
        T = check_task_input(x, params)
        if self.path == "batched":
            task = module if self._task is None else self._task
            h, layout = task._task_forward(x, params, T, TN, "")
            return to_tn(h, layout, T)
        self._check_params(params, T)
        if self.path == "traced":
            try:
                return self._traced(params, x)
            except _fx.NotPerExampleError as e:
                self.path, self._traced = "vmap", None
                self.reason = (f"{type(module).__name__}: the traced forward is not per example at these "
                               f"shapes ({e}); using torch.func.vmap")
                warnings.warn(f"fastmeta.func: {self.reason}", stacklevel=2)
        if self.path == "vmap":
            if self._probed:
                return self._vmap(module, params, x)
            try:
                out = self._vmap(module, params, x)
                self._probed = True
                return out
            except Exception as e:  # noqa: BLE001 - any vmap failure: try the loop
                err = e
            out = self._loop(module, params, x)  # raises the user's error if the loop fails too
            self.path = "loop"
            self.reason = (f"torch.func.vmap failed on {type(module).__name__} "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                           f"running the tasks one by one")
            warnings.warn(f"fastmeta.func: {self.reason}", stacklevel=2)
            return out
        return self._loop(module, params, x)

    def _vmap(self, module, params, x):
        from torch.func import vmap

        if params is None:
            return vmap(lambda xt: module(xt), randomness="different")(x)
        slots = self._slots
        # randomness="different": dropout etc. draw independently per task, as in the loop
        return vmap(lambda p, xt: call_with(module, slots, p, xt), in_dims=(0, 0),
                    randomness="different")(dict(params), x)

    def _loop(self, module, params, x):
        if params is None:
            return torch.stack([module(x[t]) for t in range(x.shape[0])])
        items = list(params.items())
        return torch.stack(
            [call_with(module, self._slots, {n: v[t] for n, v in items}, x[t]) for t in range(x.shape[0])]
        )

    def __repr__(self) -> str:
        m = self._module_ref()
        return (f"TaskFunction({type(m).__name__ if m is not None else '<dead>'}, path={self.path!r}, "
                f"mlp={self.mlp is not None}, reason={self.reason!r})")


_CACHE: weakref.WeakKeyDictionary[nn.Module, TaskFunction] = weakref.WeakKeyDictionary()


def task_function(module: nn.Module, refresh: bool = False) -> TaskFunction:
    """The :class:`TaskFunction` of ``module`` (cached per module; ``refresh=True`` re-plans).

    Path: "batched" if :func:`fastmeta.nn.to_task_batched` converts every submodule (task
    modules are accepted as they are); otherwise "traced" if ``torch.fx`` traces the forward
    and every leaf module and operation in it has a task-batched form (``fastmeta/func/_fx.py``;
    tied weights are refused); otherwise "vmap" (``torch.func``), probed on the first call; if
    vmap raises there, "loop" with a one-time warning saying why. ``fn.reason`` says why
    vmap/loop was chosen (a warning too when ``torch.fx`` could not trace the module);
    :func:`explain` prints it with the traced mapping.

    Example::

        >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> fn = task_function(net)
        >>> fn.path, fn.mlp.activation
        ('batched', 'relu')
        >>> fn(fn.expand(25), torch.randn(25, 10, 1)).shape
        torch.Size([25, 10, 1])
    """
    if isinstance(module, TaskFunction):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    fn = _CACHE.get(module)
    if fn is None:
        fn = _CACHE[module] = TaskFunction(module)
    elif refresh:
        fn.refresh()
    return fn


def explain(module: nn.Module) -> str:
    """How ``task_function(module)`` runs ``module`` on T tasks: the path, why (for vmap/loop),
    and on the "traced" path the mapping of every graph node (leaf module -> task-batched
    layer, or the tensor operation kept as it is). Print it: ``print(explain(model))``.

    The vmap -> loop switch happens on the first call (see :class:`TaskFunction`); before it
    the path reads "vmap".
    """
    fn = task_function(module)
    lines = [f"{type(fn.module).__name__}: path={fn.path!r}"]
    if fn.reason:
        lines.append(f"  reason: {fn.reason}")
    lines += [f"  {line}" for line in fn.mapping]
    return "\n".join(lines)
