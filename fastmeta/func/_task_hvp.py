"""``task_hvp``: Hessian-vector products of T tasks at once, ``H_t v_t`` for every task t.

The inner objective of a meta-batch is the SUM over tasks of each task's mean loss
(fastmeta.func.task_losses), so its Hessian w.r.t. the per-task parameters ``[T, *shape]``
is block-diagonal: ONE Hessian-vector product of the summed loss gives all T per-task
products. Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation 1994
(the R-operator); forward-over-reverse as in torch.func's ``hessian``/``jvp(grad)`` recipe.

This is a *model-level* op: it takes a module (or a :class:`fastmeta.func.TaskFunction`) and
runs its forward, so it is not a ``torch.library`` custom op (a schema cannot carry a module
or a loss function; the tensor-level analytic kernels it calls, ``fastmeta.ops.mlp_grad_hvp``,
are). Its results carry no autograd graph: it feeds the backward of
:func:`fastmeta.func.inner_loop` (and TRPO/iMAML-style solvers), which never differentiate it.

Backends (``fastmeta.ops.registry`` table ``task_hvp``, first that fits wins, in this order
except ``func``, which is tried after ``reference`` (see ``_BACKENDS`` for the measurement);
``FASTMETA_BACKEND`` forces only these names: ``cpp`` etc. force the kernels beneath):

* ``analytic`` -- the model is a pure Linear/activation stack (``TaskFunction.mlp`` is set)
  and ``loss_fn`` is ``F.cross_entropy`` or ``F.mse_loss``: closed-form gradient and R-op
  through ``fastmeta.ops.mlp_grad_hvp`` (which has its own C++ CPU / Triton / reference
  backends, chosen by its own registry entry). The table ``task_grad`` (``analytic``, else
  ``reference``) picks how :func:`fastmeta.func.inner_loop` computes its forward gradients.
* ``func`` -- any module: ``torch.func.jvp`` of ``torch.func.grad`` of the summed per-task
  loss (forward-over-reverse; one forward and one backward pass, each carrying a tangent).
* ``reference`` -- any module: double backward (``autograd.grad(g, params, v)`` of the
  gradient built with ``create_graph=True``); the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta.func._losses import task_losses
from fastmeta.func._task_function import TaskFunction, task_function
from fastmeta.ops import mlp_grad, mlp_grad_hvp, registry

HVP_OP = "task_hvp"
GRAD_OP = "task_grad"
_LOSSES = ((F.cross_entropy, "cross_entropy"), (F.mse_loss, "mse"))


def _loss_name(loss_fn) -> str | None:
    """The analytic kernels' name for ``loss_fn`` (by identity: any callable may be passed)."""
    return next((name for f, name in _LOSSES if f is loss_fn), None)


# ---- backend tables ----------------------------------------------------------------------------


def _analytic_limits(*tensors, fn, loss_fn) -> list[str]:
    reasons = []
    if fn.mlp is None:
        why = f" ({fn.reason})" if getattr(fn, "reason", "") else ""
        reasons.append(f"the model is not a pure Linear/activation stack (TaskFunction.mlp is None){why}")
    if _loss_name(loss_fn) is None:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        reasons.append(f"loss_fn {name} is not F.cross_entropy or F.mse_loss")
    return reasons


def _analytic_key(*tensors, fn, loss_fn) -> tuple[bool, bool]:
    """What the analytic backend's verdict depends on (the registry memoises on it)."""
    return fn.mlp is not None, _loss_name(loss_fn) is not None


# fastmeta.ops.mlp_grad_hvp always imports (its own backends decide the kernel): always available
_ANALYTIC = registry.Backend("analytic", frozenset({"cpu", "cuda"}), registry.ALL_FLOATS, registry.always,
                             _analytic_limits)
_REFERENCE = registry.Backend("reference", registry.ANY_DEVICE, registry.ALL_FLOATS, registry.always)
# Priority: analytic, then double backward, then torch.func. Forward-over-reverse is no
# faster than double backward on Conv4 and slower on small MLPs (its first call also loads
# torch's jvp decompositions), so "func" runs only when forced; measured in
# bench/results/inner_loop_hvp.md.
_BACKENDS = (_ANALYTIC, _REFERENCE,
             registry.Backend("func", registry.ANY_DEVICE, registry.ALL_FLOATS, registry.always))
registry.register(HVP_OP, _BACKENDS, key=_analytic_key, env_names=[b.name for b in _BACKENDS])
registry.register(GRAD_OP, (_ANALYTIC, _REFERENCE), key=_analytic_key, env_names=("analytic", "reference"))


# ---- validation shared with inner_loop ---------------------------------------------------------


def task_fn(model):
    """``model`` as a :class:`fastmeta.func.TaskFunction` (nn.Module -> cached task_function)."""
    if isinstance(model, TaskFunction):
        return model
    if isinstance(model, torch.nn.Module):
        return task_function(model)
    raise TypeError(f"model must be an nn.Module or a fastmeta.func.TaskFunction, got {type(model).__name__}")


def check_param_dict(fn, name: str, params, T: int | None = None) -> int:
    """Validate a per-task dict ``{param name: [T, *shape]}`` against ``fn``; returns T."""
    if not isinstance(params, dict):
        raise TypeError(f"{name} must be a dict name -> Tensor [T, *shape], got {type(params).__name__}")
    names = tuple(fn.names)
    unknown = [k for k in params if k not in names]
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; the model's parameters are {list(names)}")
    missing = [k for k in names if k not in params]
    if missing:
        raise ValueError(f"{name} is missing keys {missing}; expected one [T, *shape] tensor for each of {list(names)}")
    own = fn.params()
    first = None
    for k in names:
        t = params[k]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{k!r}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}[{k!r}] must be a floating tensor, got {t.dtype}")
        shape = tuple(own[k].shape)
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
            raise ValueError(f"{name}[{k!r}] must have shape [T, {', '.join(map(str, shape))}], got {tuple(t.shape)}")
        if T is None:
            T, first = t.shape[0], k
        elif t.shape[0] != T:
            where = f"{name}[{first!r}]" if first is not None else "the data"
            raise ValueError(f"mismatched task count T: {name}[{k!r}] has T={t.shape[0]} but {where} has T={T}")
    return T


def check_data(x, y, xname: str, yname: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{xname} must be a torch.Tensor [T, N, *in], got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{yname} must be a torch.Tensor [T, N, ...], got {type(y).__name__}")
    if x.dim() < 2 or y.dim() < 2:
        bad, t = (xname, x) if x.dim() < 2 else (yname, y)
        raise ValueError(f"{bad} must have shape [T, N, ...], got {tuple(t.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"mismatched tasks/examples: {xname} has [T, N] = {list(x.shape[:2])} but {yname} has {list(y.shape[:2])}"
        )
    return x.shape[0]


# ---- the three backends ------------------------------------------------------------------------


def _leaves(params: dict, names) -> dict:
    return {k: params[k].detach().requires_grad_() for k in names}


def _summed_losses(fn, params, x, y, loss_fn):
    return task_losses(loss_fn, fn(params, x), y)


def _zeros_for_none(grads, tensors):
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def grad_reference(fn, params, x, y, loss_fn):
    """``(losses [T], grads dict)`` by one backward of the summed loss (no graph kept)."""
    names = tuple(fn.names)
    with torch.enable_grad():
        p = _leaves(params, names)
        losses = _summed_losses(fn, p, x, y, loss_fn)
        g = torch.autograd.grad(losses.sum(), list(p.values()), allow_unused=True)
    return losses.detach(), dict(zip(names, _zeros_for_none(g, p.values())))


def grad_graph(fn, params, x, y, loss_fn):
    """``(leaves, grads, nbytes)``: the per-task gradients of the summed loss at fresh leaves
    made from ``params``, with their graph (``create_graph=True``) kept for
    :func:`hvp_from_graph`; ``nbytes``: the storage the graph's saved tensors hold (each
    storage counted once; the inputs' storages included)."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(t.device, st.data_ptr())] = st.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        p = _leaves(params, tuple(fn.names))
        leaves = list(p.values())
        losses = _summed_losses(fn, p, x, y, loss_fn)
        g = torch.autograd.grad(losses.sum(), leaves, create_graph=True, allow_unused=True)
    return leaves, g, sum(storages.values())


def hvp_from_graph(names, leaves, g, v: list):
    """``(grads, hvps)`` dicts from :func:`grad_graph`'s output and the vectors ``v`` (a list
    in ``names`` order): the double backward of ``g`` with ``v``, which frees the graph."""
    live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
    hv = [None] * len(names)
    if live:
        out = torch.autograd.grad([g[i] for i in live], leaves, grad_outputs=[v[i] for i in live],
                                  allow_unused=True)
        hv = list(out)
    gd = [None if gi is None else gi.detach() for gi in g]
    grads = dict(zip(names, _zeros_for_none(gd, leaves)))
    return grads, dict(zip(names, _zeros_for_none(hv, leaves)))


def hvp_reference(fn, params, x, y, v, loss_fn, x_grad: bool = False):
    """``(losses, grads, hvps)``; with ``x_grad`` also ``(d g / d x)^T v`` (the mixed second
    derivative, ``[T, N, *in]``) from the same double backward, for inner_loop's gradient
    w.r.t. the support inputs."""
    names = tuple(fn.names)
    with torch.enable_grad():
        p = _leaves(params, names)
        leaves = list(p.values())
        if x_grad:
            x = x.detach().requires_grad_()
        losses = _summed_losses(fn, p, x, y, loss_fn)
        g = torch.autograd.grad(losses.sum(), leaves, create_graph=True, allow_unused=True)
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        hv = [None] * (len(names) + 1)
        if live:
            out = torch.autograd.grad(
                [g[i] for i in live], leaves + ([x] if x_grad else []),
                grad_outputs=[v[names[i]] for i in live], allow_unused=True,
            )
            hv = list(out) + ([] if x_grad else [None])
    g = [None if gi is None else gi.detach() for gi in g]
    result = (
        losses.detach(),
        dict(zip(names, _zeros_for_none(g, leaves))),
        dict(zip(names, _zeros_for_none(hv[: len(names)], leaves))),
    )
    if x_grad:
        return (*result, torch.zeros_like(x) if hv[-1] is None else hv[-1])
    return result


def _hvp_func(fn, params, x, y, v, loss_fn):
    names = tuple(fn.names)

    def total(p):
        losses = _summed_losses(fn, p, x, y, loss_fn)
        return losses.sum(), losses.detach()

    # make_dual refuses overlapping memory such as fn.expand(T)'s stride-0 views: contiguous()
    primals = {k: params[k].detach().contiguous() for k in names}
    tangents = {k: v[k].detach().to(primals[k].dtype).contiguous() for k in names}
    with torch.enable_grad():
        g, hv, losses = torch.func.jvp(torch.func.grad(total, has_aux=True), (primals,), (tangents,), has_aux=True)
    return losses, {k: g[k] for k in names}, {k: hv[k] for k in names}


def mlp_lists(fn, params):
    spec = fn.mlp
    weights = [params[w] for w in spec.weights]
    if all(b is None for b in spec.biases):
        return weights, None
    # a Linear without bias: a zero bias whose gradient/HVP is dropped
    biases = [
        params[b] if b is not None else w.new_zeros(w.shape[0], w.shape[1])
        for b, w in zip(spec.biases, weights)
    ]
    return weights, biases


def _mlp_dict(fn, ws, bs):
    spec = fn.mlp
    out = dict(zip(spec.weights, ws))
    if bs is not None:
        out.update({b: t for b, t in zip(spec.biases, bs) if b is not None})
    return {k: out[k] for k in fn.names}


def grad_analytic(fn, params, x, y, loss_fn):
    weights, biases = mlp_lists(fn, {k: t.detach() for k, t in params.items()})
    with torch.no_grad():
        losses, gw, gb = mlp_grad(weights, biases, x, y, fn.mlp.activation, _loss_name(loss_fn))
    return losses, _mlp_dict(fn, gw, gb)


def _hvp_analytic(fn, params, x, y, v, loss_fn):
    weights, biases = mlp_lists(fn, {k: t.detach() for k, t in params.items()})
    vw, vb = mlp_lists(fn, {k: t.detach() for k, t in v.items()})
    with torch.no_grad():
        losses, gw, gb, hw, hb = mlp_grad_hvp(
            weights, biases, x, y, vw, vb, fn.mlp.activation, _loss_name(loss_fn)
        )
    return losses, _mlp_dict(fn, gw, gb), _mlp_dict(fn, hw, hb)


_IMPLS = {"analytic": _hvp_analytic, "func": _hvp_func, "reference": hvp_reference}
_GRAD_IMPLS = {"analytic": grad_analytic, "reference": grad_reference}


def run_backend(name, fn, params, x, y, v, loss_fn):
    """Unchecked entry for inner_loop's backward: ``(losses, grads, hvps)``."""
    return _IMPLS[name](fn, params, x, y, v, loss_fn)


def run_grad(name, fn, params, x, y, loss_fn):
    """Unchecked entry for inner_loop's forward (``name`` from the ``task_grad`` table):
    ``(losses [T], grads dict)``, no graph kept."""
    return _GRAD_IMPLS[name](fn, params, x, y, loss_fn)


# ---- reference and public function -------------------------------------------------------------


def task_hvp_ref(model, params, x, y, v, loss_fn=F.cross_entropy):
    """Plain double backward, ``dict`` of ``H_t v_t`` (the oracle; see :func:`task_hvp`)."""
    fn = task_fn(model)
    return hvp_reference(fn, params, x, y, v, loss_fn)[2]


def task_hvp(
    model,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    v: dict[str, torch.Tensor],
    loss_fn=F.cross_entropy,
    backend: str | None = None,
    return_grad: bool = False,
):
    """Hessian-vector products of T tasks at once: ``H_t v_t`` with ``H_t`` the Hessian of task
    t's mean loss w.r.t. its own parameters.

    Args:
        model: an ``nn.Module`` (converted once by :func:`fastmeta.func.task_function`) or a
            :class:`fastmeta.func.TaskFunction`.
        params: ``{name: [T, *shape]}`` for every requires-grad parameter of ``model`` (e.g.
            ``fn.expand(T)`` or adapted parameters).
        x: ``[T, N, *in]`` inputs; y: ``[T, N, ...]`` targets (what ``loss_fn`` expects).
        v: ``{name: [T, *shape]}`` the vectors, same keys and shapes as ``params``.
        loss_fn: per-example loss accepting ``(out, y)`` (``reduction=`` when it has one);
            each task's loss is its mean over N (:func:`fastmeta.func.task_losses`).
        backend: force ``"analytic"``, ``"func"`` or ``"reference"`` (see the module doc);
            a forced backend that cannot serve the call raises ``BackendError`` saying why.
        return_grad: also return the losses and gradients computed on the way.

    Returns:
        ``{name: [T, *shape]}`` the products ``H_t v_t``; with ``return_grad``, the tuple
        ``(losses [T], grads {name: [T, *shape]}, hvps)``. No autograd graph (detached).
        Parameters the loss does not depend on get zeros.

    Example::

        >>> fn = fastmeta.func.task_function(fastmeta.nn.TaskMLP([1, 40, 40, 1], "relu"))
        >>> p = fn.expand(25)
        >>> hv = fastmeta.func.task_hvp(fn, p, x, y, {k: torch.randn_like(t) for k, t in p.items()},
        ...                            loss_fn=F.mse_loss)

    Equivalent PyTorch code::

        p = {k: t.detach().requires_grad_() for k, t in params.items()}
        losses = task_losses(loss_fn, fn(p, x), y)              # [T]
        g = torch.autograd.grad(losses.sum(), list(p.values()), create_graph=True)
        hv = torch.autograd.grad(g, list(p.values()), grad_outputs=list(v.values()))
    """
    fn = task_fn(model)
    T = check_data(x, y, "x", "y")
    check_param_dict(fn, "params", params, T)
    check_param_dict(fn, "v", v, T)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    tensors = [params[fn.names[0]], x] if fn.names else [x]
    name = registry.select(HVP_OP, tensors, backend, fn=fn, loss_fn=loss_fn)
    losses, grads, hv = run_backend(name, fn, params, x, y, v, loss_fn)
    return (losses, grads, hv) if return_grad else hv
