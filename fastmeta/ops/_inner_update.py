"""``inner_update``: the MAML inner step ``theta' = theta - lr * g`` for every tensor of every
task in one fused call (a multi-tensor apply).

Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017,
eq. (1); per-element learned learning rates: Li et al., "Meta-SGD: Learning to Learn Quickly
for Few-Shot Learning", 2017. Parameters are task-batched (``[T, *shape]`` per tensor, see
DESIGN.md); the update is differentiable in the parameters, the gradients and the learning
rates, twice (second-order MAML differentiates through it; Meta-SGD learns ``lr``).

The compiled backends (``cuda``: one multi-tensor CUDA kernel, ``cpp``: one ``at::parallel_for``
over all tensors) read a scalar, per-tensor, per-element ``[*shape]`` (shared by the tasks) or
per-task learning rate, and parameters given as ``p.expand(T, *shape)``, through broadcasting
index arithmetic: nothing is materialised at ``[T, *shape]`` except the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastmeta.ops import checks, registry

_STEM = "inner_update"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _uniform(*tensors, **_) -> list[str]:
    """The fused kernels take one dtype and one device for the whole list."""
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    reasons = []
    if len(dtypes) > 1:
        names = sorted(str(d).replace("torch.", "") for d in dtypes)
        reasons.append(f"tensors of several dtypes ({', '.join(names)}) in one call")
    if len(devices) > 1:
        reasons.append(f"tensors on several devices ({', '.join(sorted(map(str, devices)))})")
    return reasons


def _uniform_key(*tensors, **_) -> bool:
    """What ``_uniform`` decides, cheaply (no sets, no strings): the registry's memo key,
    computed on every call."""
    dtype, device = tensors[0].dtype, tensors[0].device
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            return False
    return True


registry.register(
    "inner_update",
    [registry.cuda_backend(_uniform), registry.cpp_backend(_uniform), registry.reference_backend()],
    key=_uniform_key,
)
# The gradient w.r.t. the learning rates (a reduction, see _lr_grad_fwd): a fused C++ kernel,
# else plain torch ops. Only the fused update calls it, whose tensors are already one dtype on
# one device (no limits to check); it follows the tensors, not FASTMETA_BACKEND (the update it
# differentiates was already forced).
_LR_GRAD = "inner_update_lr_grad"
registry.register(_LR_GRAD, [registry.cpp_backend(), registry.composite_backend()], env_names=())


# ---- argument normalisation -----------------------------------------------------------------


def _items(params, grads):
    """(keys or None, container type, params list, grads list), validated."""
    if isinstance(params, Mapping):
        keys = list(params.keys())
        plist = [params[k] for k in keys]
        if isinstance(grads, Mapping):
            missing = [k for k in keys if k not in grads]
            extra = [k for k in grads if k not in params]
            if missing or extra:
                raise ValueError(
                    f"grads must have the same keys as params: missing {missing}, "
                    f"unexpected {extra}"
                )
            glist = [grads[k] for k in keys]
        elif isinstance(grads, (list, tuple)):
            glist = list(grads)
        else:
            raise TypeError(
                "grads must be a dict (same keys as params) or a list/tuple, "
                f"got {type(grads).__name__}"
            )
        names = [repr(k) for k in keys]
        kind = type(params) if isinstance(params, dict) else dict
    elif isinstance(params, (list, tuple)):
        if not isinstance(grads, (list, tuple)):
            raise TypeError(
                f"params is a {type(params).__name__}, so grads must be a list/tuple of tensors, "
                f"got {type(grads).__name__}"
            )
        keys, plist, glist = None, list(params), list(grads)
        names = [str(i) for i in range(len(plist))]
        kind = tuple if isinstance(params, tuple) else list
    else:
        raise TypeError(
            "params must be a dict[str, Tensor] or a list/tuple of tensors, "
            f"got {type(params).__name__}"
        )
    if len(glist) != len(plist):
        raise ValueError(
            f"got {len(glist)} grads for {len(plist)} params; they must pair up one to one")
    for name, p, g in zip(names, plist, glist):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{name}] must be a torch.Tensor, got {type(p).__name__}")
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{name}] must be a torch.Tensor, got {type(g).__name__}")
        if p.dtype not in _FLOATS:
            raise TypeError(f"params[{name}] must be a floating tensor, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{name}] has dtype {g.dtype} but params[{name}] has "
                            f"{p.dtype}; they must match")
        if g.shape != p.shape:
            raise ValueError(
                f"grads[{name}] has shape {tuple(g.shape)} but params[{name}] has "
                f"{tuple(p.shape)}; "
                "they must match"
            )
        if g.device != p.device:
            raise ValueError(f"grads[{name}] is on {g.device} but params[{name}] is on {p.device}")
    return keys, kind, names, plist, glist


def _placed(name: str, lr: torch.Tensor, p: torch.Tensor, pname: str) -> torch.Tensor:
    """A validated tensor ``lr`` on ``p``'s device (a CPU 0-d rate moves there) in ``p``'s dtype."""
    if lr.device != p.device:
        if lr.dim() == 0 and lr.device.type == "cpu":
            lr = lr.to(p.device)
        else:
            raise ValueError(f"{name} is on {lr.device} but params[{pname}] is on {p.device}")
    return lr if lr.dtype == p.dtype else lr.to(p.dtype)


_ONE_OF = "a dict/list with one tensor per parameter"


def _lrs(lr, keys, names, plist) -> tuple[list[torch.Tensor], float]:
    """``(per-tensor lr list or [], alpha)``: the update is ``p - alpha * lr_i * g``."""
    if isinstance(lr, torch.Tensor):
        lr = checks.lr_value("lr", lr, one_of=_ONE_OF).reshape(())
        return [_placed("lr", lr, p, n) for p, n in zip(plist, names)], 1.0
    if isinstance(lr, (Mapping, torch.nn.ParameterDict)):
        if keys is None:
            raise TypeError(
                "lr is a dict but params is a list; pass lr as a list (same order) instead")
        missing = [k for k in keys if k not in lr]
        extra = [k for k in lr if k not in keys]
        if missing or extra:
            raise ValueError(f"lr must have the same keys as params: missing {missing}, "
                             f"unexpected {extra}")
        values = [lr[k] for k in keys]
    elif isinstance(lr, (list, tuple)):
        if len(lr) != len(plist):
            raise ValueError(
                f"got {len(lr)} learning rates for {len(plist)} params; they must pair up")
        values = list(lr)
    else:
        return [], checks.lr_value("lr", lr, one_of=_ONE_OF)
    out = []
    for v, p, n in zip(values, plist, names):
        name = f"lr[{n}]"
        v = checks.lr_value(name, v, p, n)
        if isinstance(v, torch.Tensor):
            out.append(_placed(name, v, p, n))
        else:
            out.append(torch.full((), v, dtype=p.dtype, device=p.device))
    return out, 1.0


def _pack(kind, keys, outs):
    if keys is not None:
        return kind(zip(keys, outs)) if kind is not dict else dict(zip(keys, outs))
    return tuple(outs) if kind is tuple else list(outs)


# ---- reference (oracle; always-available backend; twice differentiable) ------------------


def inner_update_ref(params, grads, lr):
    """Plain-PyTorch ``p - lr * g`` per tensor, with the same contract as :func:`inner_update`."""
    keys, kind, names, plist, glist = _items(params, grads)
    lrs, alpha = _lrs(lr, keys, names, plist)
    if lrs:
        outs = [p - lr_i * g for p, g, lr_i in zip(plist, glist, lrs)]
    else:
        outs = [p - alpha * g for p, g in zip(plist, glist)]
    return _pack(kind, keys, outs)


# ---- the op: one autograd formulation over the registered kernels ----------------------------
#
# The kernels are registered as torch.library ops (fake implementations, so torch.compile traces
# them into its graph) WITHOUT an autograd formula of their own: differentiation is one
# autograd.Function per op (_Update, _LrGrad), in eager mode and under torch.compile alike
# (Dynamo traces an autograd.Function's forward and backward). Eager calls reach the kernels
# directly, without the registered op's Python dispatch: measured on the sinusoid MLP (6 tensors,
# T = 25, 1 thread), the custom op's own autograd wrapper cost ~95 us a call against ~30 us for
# the autograd.Function (bench/results/dispatch.md).


@torch.library.custom_op("fastmeta::inner_update_fwd", mutates_args=())
def _fwd(
    params: list[torch.Tensor], grads: list[torch.Tensor], lrs: list[torch.Tensor], alpha: float,
    backend: str,
) -> list[torch.Tensor]:
    """``out_i = params_i - alpha * lrs_i * grads_i`` (``params`` empty: 0, ``lrs`` empty: 1);
    ``params_i`` and ``lrs_i`` broadcast to ``grads_i``'s shape, which every ``out_i`` has."""
    return registry.kernel(backend, _STEM, "inner_update")(params, grads, lrs, alpha)


@_fwd.register_fake
def _(params, grads, lrs, alpha, backend):
    return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]


def _lr_grad(grads, grad_outs, lrs, alpha):
    """``-alpha * (grads_i * grad_outs_i).sum_to_size(lrs_i.shape)`` by the backend the
    registry's ``inner_update_lr_grad`` table picks: the fused kernel (one pass, no
    ``[T, *shape]`` temporary) or plain torch ops."""
    name = registry.select(_LR_GRAD, grads)
    if name == "composite":
        return [(g * go).sum_to_size(lr.shape).mul(-alpha).contiguous()
                for g, go, lr in zip(grads, grad_outs, lrs)]
    return registry.kernel(name, _STEM, _LR_GRAD)(grads, grad_outs, lrs, alpha)


@torch.library.custom_op("fastmeta::inner_update_lr_grad", mutates_args=())
def _lr_grad_fwd(
    grads: list[torch.Tensor], grad_outs: list[torch.Tensor], lrs: list[torch.Tensor], alpha: float,
) -> list[torch.Tensor]:
    """``out_i = -alpha * (grads_i * grad_outs_i).sum_to_size(lrs_i.shape)`` (``lrs`` only give
    the shapes)."""
    return _lr_grad(grads, grad_outs, lrs, alpha)


@_lr_grad_fwd.register_fake
def _(grads, grad_outs, lrs, alpha):
    return [torch.empty_like(lr, memory_format=torch.contiguous_format) for lr in lrs]


def _run(params, grads, lrs, alpha, backend):
    """The update's kernel, not differentiated: the registered op while torch.compile traces
    (it has the fake implementation tracing needs), else the kernel itself."""
    if torch.compiler.is_compiling():
        return _fwd(list(params), list(grads), list(lrs), alpha, backend)
    return registry.kernel(backend, _STEM, "inner_update")(params, grads, lrs, alpha)


def _run_lr_grad(grads, grad_outs, lrs, alpha, backend=None):
    """The lr-gradient reduction, not differentiated (see :func:`_run`; it follows its tensors,
    not the update's ``backend``)."""
    if torch.compiler.is_compiling():
        return _lr_grad_fwd(list(grads), list(grad_outs), list(lrs), alpha)
    return _lr_grad(grads, grad_outs, lrs, alpha)


class _Update(torch.autograd.Function):
    """``out_i = params_i - alpha * lrs_i * grads_i``, differentiable in all three lists to any
    order: the backward is this op again (d grads) and :class:`_LrGrad` (d lrs)."""

    @staticmethod
    def forward(ctx, backend, alpha, n_params, n_lrs, *flat):
        n = len(flat) - n_params - n_lrs
        params, grads, lrs = flat[:n_params], flat[n_params : n_params + n], flat[n_params + n :]
        ctx.alpha, ctx.backend = alpha, backend
        ctx.param_shapes = [p.shape for p in params]
        ctx.out_meta = [(g.shape, g.dtype, g.device) for g in grads]
        ctx.n_lrs = len(lrs)
        ctx.lr_grad = any(lr.requires_grad for lr in lrs)
        ctx.g_grad = any(g.requires_grad for g in grads)
        saved_g = list(grads) if ctx.lr_grad else []
        saved_lr = list(lrs) if (ctx.g_grad or ctx.lr_grad) else []
        ctx.n_saved_g = len(saved_g)
        ctx.save_for_backward(*saved_g, *saved_lr)
        return tuple(_run(params, grads, lrs, alpha, backend))

    @staticmethod
    def backward(ctx, *grad_outs):
        gos = [
            go if go is not None else torch.zeros(s, dtype=d, device=dev)
            for go, (s, d, dev) in zip(grad_outs, ctx.out_meta)
        ]
        saved = ctx.saved_tensors
        grads, lrs = list(saved[: ctx.n_saved_g]), list(saved[ctx.n_saved_g :])
        alpha, backend = ctx.alpha, ctx.backend
        # (torch.compile differentiates once: its backward graph takes the kernels themselves)
        compiling = torch.compiler.is_compiling()
        update = _run if compiling else _update
        lr_grad = _run_lr_grad if compiling else _lr_grad_op
        d_params = [go.sum_to_size(s) for go, s in zip(gos, ctx.param_shapes)]
        # d grads_i = -alpha * lr_i * go_i: the update with no params (they read as 0)
        d_grads = update([], gos, lrs, alpha, backend) if ctx.g_grad else [None] * len(gos)
        d_lrs = lr_grad(grads, gos, lrs, alpha, backend) if ctx.lr_grad else [None] * ctx.n_lrs
        return (None, None, None, None, *d_params, *d_grads, *d_lrs)


def _update(params, grads, lrs, alpha, backend):
    return list(_Update.apply(backend, alpha, len(params), len(lrs), *params, *grads, *lrs))


class _LrGrad(torch.autograd.Function):
    """``d lr_i = -alpha * sum over lr_i's broadcast dims of grads_i * grad_outs_i``. Its own
    gradient is the update with no params: d grads_i = -alpha * A_i * grad_outs_i and
    d grad_outs_i = -alpha * A_i * grads_i for the cotangent A_i of d lr_i."""

    @staticmethod
    def forward(ctx, backend, alpha, *flat):
        n = len(flat) // 3
        grads, grad_outs, lrs = flat[:n], flat[n : 2 * n], flat[2 * n :]
        ctx.alpha, ctx.backend, ctx.n = alpha, backend, n
        ctx.save_for_backward(*grads, *grad_outs)
        return tuple(_run_lr_grad(grads, grad_outs, lrs, alpha))

    @staticmethod
    def backward(ctx, *cots):
        saved = ctx.saved_tensors
        grads, grad_outs = list(saved[: ctx.n]), list(saved[ctx.n :])
        cots = [c if c is not None else torch.zeros((), dtype=g.dtype, device=g.device)
                for c, g in zip(cots, grads)]
        update = _run if torch.compiler.is_compiling() else _update
        d_grads = update([], grad_outs, cots, ctx.alpha, ctx.backend)
        d_grad_outs = update([], grads, cots, ctx.alpha, ctx.backend)
        return (None, None, *d_grads, *d_grad_outs, *([None] * ctx.n))


def _lr_grad_op(grads, grad_outs, lrs, alpha, backend):
    return list(_LrGrad.apply(backend, alpha, *grads, *grad_outs, *lrs))


# ---- public function -----------------------------------------------------------------------


def inner_update(params, grads, lr, *, backend: str | None = None):
    """One task-batched gradient step ``theta' = theta - lr * g`` for every tensor, fused.

    Args:
        params: ``dict[str, Tensor]`` or a list/tuple of tensors, each ``[T, *shape]`` (any
            shape works; ``[T, *shape]`` is the task-batched convention). May be
            ``p.expand(T, *shape)`` views of shared parameters (read without copying).
        grads: the gradients, same container as ``params`` (a dict with the same keys, or a
            list/tuple in the same order; a list/tuple also pairs with a dict ``params`` by
            order), each with its parameter's shape, dtype and device.
        lr: the learning rate, one of
            * a Python float, or a 0-d floating tensor (may require grad): one rate for all;
            * a dict or ``nn.ParameterDict`` (same keys as ``params``) or a list (same order)
              with one entry per tensor,
              each a float or a floating tensor broadcastable to its parameter: ``[]`` (one
              rate per tensor), ``[*shape]`` (per element, shared by the T tasks: Meta-SGD),
              ``[T, *shape]`` (per task and element), or e.g. ``[T, 1, ..., 1]`` (per task).
            Tensor rates are cast to the parameters' dtype; a 0-d CPU rate may serve CUDA
            parameters.
        backend: force ``"cuda"``, ``"cpp"`` or ``"reference"`` (default: the first that
            fits; the fused backends need one dtype and one device for the whole call).

    Returns:
        The updated parameters in the container type of ``params`` (a dict keeps its keys and
        their order), each ``[T, *shape]`` in the parameters' dtype, contiguous.
        Differentiable w.r.t. ``params``, ``grads`` and tensor ``lr`` entries, and twice
        (second-order MAML; gradcheck and gradgradcheck pass on every backend).

    The kernel runs behind one ``autograd.Function`` (directly when nothing requires grad);
    ``torch.compile`` traces that Function around the registered op
    ``fastmeta::inner_update_fwd``; inside ``torch.func`` transforms (vmap, grad, jvp) the
    reference's plain torch ops run.

    Example::

        >>> fn = fastmeta.func.task_function(model)
        >>> params = fn.expand(T)                                   # dict of [T, *shape]
        >>> loss = fastmeta.func.task_losses(F.cross_entropy, fn(params, x), y).sum()
        >>> grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        >>> params = fastmeta.ops.inner_update(params, grads, 0.4)

    Equivalent PyTorch code::

        new = {k: params[k] - lr * grads[k] for k in params}                 # float / 0-d lr
        new = {k: params[k] - lr[k] * grads[k] for k in params}              # dict lr

    Raises:
        TypeError: a container or entry of the wrong type, a non-float ``lr`` (an int tensor,
            a string, a bool), dtype mismatch between a parameter and its gradient.
        ValueError: key or length mismatch, shape mismatch (also an ``lr`` entry that does not
            broadcast to its parameter, e.g. another T), device mismatch, non-finite float lr.
    """
    keys, kind, names, plist, glist = _items(params, grads)
    lrs, alpha = _lrs(lr, keys, names, plist)
    if not plist:
        return _pack(kind, keys, [])
    tensors = [*glist, *plist, *lrs]
    # (each grad and lr has its parameter's dtype and device, checked above: the parameters
    # decide what the backends' one-dtype-one-device limit sees)
    name = registry.select("inner_update", plist, backend)
    if name == "reference" or torch._C._are_functorch_transforms_active():
        # (torch.func transforms run neither custom ops nor autograd.Functions without vmap
        # rules: the reference's plain torch ops serve them)
        if lrs:
            outs = [p - lr_i * g for p, g, lr_i in zip(plist, glist, lrs)]
        else:
            outs = [p - alpha * g for p, g in zip(plist, glist)]
    elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = _update(plist, glist, lrs, alpha, name)
    else:
        # nothing to differentiate (e.g. inside inner_loop's own autograd.Function): the kernel
        # without the autograd.Function around it
        outs = _run(plist, glist, lrs, alpha, name)
    return _pack(kind, keys, outs)


__all__ = ["inner_update", "inner_update_ref"]
