"""``mlp_grad`` / ``mlp_grad_hvp``: per-task loss, gradient and exact Hessian-vector product of
a small MLP, for T tasks at once, analytically (no autograd graph).

Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation 6(1), 1994: the
R-operator ``R{f} = d/dr f(theta + r v)|_{r=0}`` pushed through the forward pass, the loss and
the backward pass gives ``H v`` for the cost of about two extra passes. Per task ``t`` and
layer ``l = 1..L`` (nn.Linear layout, ``W_l [out, in]``)::

    z_l = a_{l-1} W_l^T + b_l,  a_l = act(z_l) (l < L),  out = z_L,  a_0 = x
    R{z_l} = R{a_{l-1}} W_l^T + a_{l-1} V_l^T + vb_l,  R{a_l} = act'(z_l) R{z_l},  R{a_0} = 0
    g_L = dloss/dz_L,  R{g_L} = (d^2 loss / dz_L^2) R{z_L}
        mse:  g = 2 (z - y) / (N out),           R{g} = 2 R{z} / (N out)
        CE:   g = (softmax(z) - onehot(y)) / N,  R{g} = p * (R{z} - <p, R{z}>) / N
    grad W_l = g_l^T a_{l-1},   hvp W_l = R{g_l}^T a_{l-1} + g_l^T R{a_{l-1}}
    grad b_l = sum_n g_l,       hvp b_l = sum_n R{g_l}
    g_{l-1} = act'(z_{l-1}) * (g_l W_l)
    R{g_{l-1}} = act'(z_{l-1}) * (R{g_l} W_l + g_l V_l) + act''(z_{l-1}) R{z_{l-1}} * (g_l W_l)

The loss of a meta-batch is the sum over tasks of each task's mean loss, so these are each
task's own gradient and Hessian-block times its own ``v_t``. Everything is batched over T
(``bmm``); the C++ CPU and Triton backends run the whole recursion in one op call.

Backends (``fastmeta.ops.registry``, first that fits): ``triton`` (CUDA; one program per
task, layer widths and N up to ``TRITON_MAX_WIDTH``/``TRITON_MAX_N`` = 64, any float dtype,
fp32 inside), ``cpp`` (CPU, float32/float64; batched GEMMs in one op call), ``reference``
(torch double backward; any device and dtype). Timings against double backward,
torch.func and a per-task loop: ``bench/results/inner_loop_hvp.md``.

Not differentiable: the results are constants (``torch.no_grad`` semantics; inputs that
require grad are detached). They feed ``inner_loop``'s hand-written backward. For gradients
that are themselves differentiable use ordinary autograd on the model (or ``task_hvp`` with
``backend="reference"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta.ops import checks, registry

_STEM = "mlp_hvp"
ACTIVATIONS = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3}
LOSSES = {"mse": 0, "cross_entropy": 1}

# Triton: one program per task holds the whole MLP, padded to one square block of width
# BLOCK_W and one block of BLOCK_N rows; its register/SRAM tiles bound the shapes it takes.
TRITON_MAX_WIDTH = 64
TRITON_MAX_N = 64


def _triton_limits(*tensors, widths=(), n=0, **_):
    reasons = []
    if widths and max(widths) > TRITON_MAX_WIDTH:
        reasons.append(
            f"layer width {max(widths)} > {TRITON_MAX_WIDTH} (the Triton kernel keeps a task's "
            f"whole MLP in one [{TRITON_MAX_WIDTH} x {TRITON_MAX_WIDTH}] tile per layer)"
        )
    if n > TRITON_MAX_N:
        reasons.append(f"N = {n} rows per task > {TRITON_MAX_N} (one row block per task)")
    return reasons


_BACKENDS = [
    registry.triton_backend(_triton_limits),
    registry.cpp_backend(),
    registry.reference_backend(),
]
registry.register("mlp_grad", _BACKENDS)
registry.register("mlp_grad_hvp", _BACKENDS)


# ---- reference (oracle; always-available backend) ------------------------------------------


def mlp_forward_ref(
    weights: list[torch.Tensor], biases: list[torch.Tensor] | None, x: torch.Tensor,
    activation: str = "relu",
) -> torch.Tensor:
    """``[T, N, out_L]`` output of the task-batched MLP (activation after every layer but the
    last)."""
    act = {"identity": lambda t: t, "relu": torch.relu, "tanh": torch.tanh,
           "sigmoid": torch.sigmoid}[activation]
    h = x
    for i, w in enumerate(weights):
        h = torch.bmm(h, w.transpose(1, 2))
        if biases is not None:
            h = h + biases[i].unsqueeze(1)
        if i + 1 < len(weights):
            h = act(h)
    return h


def mlp_losses_ref(
    weights: list[torch.Tensor], biases: list[torch.Tensor] | None, x: torch.Tensor,
    y: torch.Tensor, activation: str = "relu", loss: str = "mse",
) -> torch.Tensor:
    """``[T]`` per-task mean loss (differentiable, any order)."""
    out = mlp_forward_ref(weights, biases, x, activation)
    T = out.shape[0]
    if loss == "mse":
        return F.mse_loss(out, y, reduction="none").reshape(T, -1).mean(1)
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").reshape(T, -1).mean(1)


def _ref(weights, biases, x, y, v_w, v_b, activation, loss, hvp):
    with torch.enable_grad():
        ws = [w.detach().requires_grad_() for w in weights]
        bs = [b.detach().requires_grad_() for b in biases] if biases is not None else None
        params = ws + (bs or [])
        losses = mlp_losses_ref(ws, bs, x.detach(), y, activation, loss)
        grads = torch.autograd.grad(losses.sum(), params, create_graph=hvp)
        if not hvp:
            out = [g.detach() for g in grads]
            return (losses.detach(), out[: len(ws)], out[len(ws):] if bs is not None else None)
        vs = list(v_w) + (list(v_b) if bs is not None else [])
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        hv = torch.autograd.grad(dot, params, allow_unused=True, materialize_grads=True)
    g = [t.detach() for t in grads]
    h = [t.detach() for t in hv]
    L = len(ws)
    nb = bs is not None
    return (losses.detach(), g[:L], g[L:] if nb else None, h[:L], h[L:] if nb else None)


def mlp_grad_ref(weights, biases, x, y, activation="relu", loss="mse"):
    """Double-backward-free reference of :func:`mlp_grad` (one torch.autograd.grad)."""
    return _ref(weights, biases, x, y, None, None, activation, loss, hvp=False)


def mlp_grad_hvp_ref(weights, biases, x, y, v_w, v_b, activation="relu", loss="mse"):
    """Reference of :func:`mlp_grad_hvp`: torch double backward on the per-task losses.
    ``v_b=None`` with biases means a zero direction for the biases."""
    if biases is not None and v_b is None:
        v_b = [torch.zeros_like(b) for b in biases]
    return _ref(weights, biases, x, y, v_w, v_b, activation, loss, hvp=True)


# ---- registered ops (not differentiable) ---------------------------------------------------

# backend: "cpp" or "triton" (the reference backend is plain autograd and is called directly:
# autograd does not run inside a custom op's kernel).
@torch.library.custom_op("fastmeta::mlp_grad_fwd", mutates_args=())
def _grad_fwd(
    weights: list[torch.Tensor], biases: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    activation: int, loss: int, backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Per-task (losses [T], grad_w, grad_b); ``biases == []`` means no biases (then
    ``grad_b == []``). No autograd formula: backward through it raises."""
    fn = registry.kernel(backend, _STEM, "mlp_grad_fwd")
    losses, gw, gb = fn(weights, biases, x, y, activation, loss)
    return losses, list(gw), list(gb)


@_grad_fwd.register_fake
def _(weights, biases, x, y, activation, loss, backend):
    return (x.new_empty(x.shape[0]), [torch.empty_like(w) for w in weights],
            [torch.empty_like(b) for b in biases])


@torch.library.custom_op("fastmeta::mlp_grad_hvp_fwd", mutates_args=())
def _grad_hvp_fwd(
    weights: list[torch.Tensor], biases: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    v_w: list[torch.Tensor], v_b: list[torch.Tensor], activation: int, loss: int, backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
           list[torch.Tensor]]:
    """Per-task (losses, grad_w, grad_b, hvp_w, hvp_b); ``biases == []`` means no biases (then
    ``v_b``, ``grad_b`` and ``hvp_b`` are ``[]``). No autograd formula."""
    fn = registry.kernel(backend, _STEM, "mlp_grad_hvp_fwd")
    losses, gw, gb, hw, hb = fn(weights, biases, x, y, v_w, v_b, activation, loss)
    return losses, list(gw), list(gb), list(hw), list(hb)


@_grad_hvp_fwd.register_fake
def _(weights, biases, x, y, v_w, v_b, activation, loss, backend):
    return (x.new_empty(x.shape[0]), [torch.empty_like(w) for w in weights],
            [torch.empty_like(b) for b in biases], [torch.empty_like(w) for w in weights],
            [torch.empty_like(b) for b in biases])


# ---- validation ------------------------------------------------------------------------------


def _tensor_list(name: str, seq, length: int | None, shape_doc: str) -> list[torch.Tensor]:
    if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors {shape_doc}, got {type(seq).__name__}")
    if length is None and len(seq) == 0:
        raise ValueError(f"{name} must hold at least one layer, got an empty list")
    if length is not None and len(seq) != length:
        raise ValueError(f"{name} must hold {length} tensors (one per layer), got {len(seq)}")
    for i, t in enumerate(seq):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name}[{i}] must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    return list(seq)


def _check(weights, biases, x, y, v_w, v_b, activation, loss, hvp):
    """Validate; returns (weights, biases|None, x, y, v_w, v_b|None, act, loss code, widths)."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    weights = _tensor_list("weights", weights, None, "[T, out, in]")
    L = len(weights)
    checks.float_tensor("x", x, 3, "[T, N, in]")
    T, N, width = x.shape
    checks.nonempty(T=T, N=N, in_features=width)
    widths = [width]
    for i, w in enumerate(weights):
        checks.float_tensor(f"weights[{i}]", w, 3, "[T, out, in]")
        checks.same_dtype(x=x, **{f"weights[{i}]": w})
        checks.same_device(x=x, **{f"weights[{i}]": w})
        if w.shape[0] != T:
            raise ValueError(f"mismatched task count T: x has T={T}, weights[{i}] has {w.shape[0]}")
        if w.shape[2] != widths[-1]:
            what = "x's feature size" if i == 0 else f"weights[{i - 1}]'s out size"
            raise ValueError(
                f"weights[{i}] has in={w.shape[2]} but {what} is {widths[-1]} (shape "
                f"{tuple(w.shape)}, expected [T, out, {widths[-1]}])"
            )
        checks.nonempty(**{f"weights[{i}] out": w.shape[1]})
        widths.append(w.shape[1])
    if biases is not None:
        biases = _tensor_list("biases", biases, L, "[T, out]")
        for i, b in enumerate(biases):
            checks.float_tensor(f"biases[{i}]", b, 2, "[T, out]")
            checks.same_dtype(x=x, **{f"biases[{i}]": b})
            checks.same_device(x=x, **{f"biases[{i}]": b})
            if tuple(b.shape) != (T, widths[i + 1]):
                raise ValueError(f"biases[{i}] must have shape [T, out] = {(T, widths[i + 1])}, "
                                 f"got {tuple(b.shape)}")
    out = widths[-1]
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    checks.same_device(x=x, y=y)
    if loss == "mse":
        if not y.is_floating_point():
            raise TypeError(
                f"y must be a floating tensor [T, N, out] for loss='mse', got {y.dtype}")
        checks.same_dtype(x=x, y=y)
        if tuple(y.shape) != (T, N, out):
            raise ValueError(f"y must have shape [T, N, out] = {(T, N, out)} for loss='mse', "
                             f"got {tuple(y.shape)}")
    else:
        y = checks.label_tensor("y", y, (T, N), "[T, N] (class indices, loss='cross_entropy')")
        checks.labels_in_range("y", y, out, "out, the last layer's width")
    if hvp:
        v_w = _direction("v_w", v_w, "weights", weights, x, "[T, out, in]")
        if v_b is not None:
            if biases is None:
                raise ValueError("v_b was given but biases is None; pass v_b=None")
            v_b = _direction("v_b", v_b, "biases", biases, x, "[T, out]")
    return (weights, biases, x, y, v_w, v_b, ACTIVATIONS[activation], LOSSES[loss], widths)


def _direction(name: str, vs, like_name: str, like: list, x, shape_text: str) -> list:
    """The HVP direction ``vs``: one tensor per entry of ``like``, same shape, x's dtype/device."""
    vs = _tensor_list(name, vs, len(like), shape_text)
    for i, (v, ref) in enumerate(zip(vs, like)):
        checks.same_dtype(x=x, **{f"{name}[{i}]": v})
        checks.same_device(x=x, **{f"{name}[{i}]": v})
        if v.shape != ref.shape:
            raise ValueError(f"{name}[{i}] must have the shape of {like_name}[{i}] "
                             f"{tuple(ref.shape)}, got {tuple(v.shape)}")
    return vs


def _run(op, entry: str, backend: str, *args):
    """Run a compiled backend. Eager calls go straight to the kernel: the ops have no autograd
    formula to dispatch to and run under no_grad, so the custom-op layer would only add Python
    dispatch (a noticeable share of a small MLP's HVP: bench/results/inner_loop_hvp.md). Under
    torch.compile the registered op (with its fake implementation) is what gets traced."""
    if torch.compiler.is_compiling():
        return op(*args, backend)
    return registry.kernel(backend, _STEM, entry)(*args)


# ---- public functions ----------------------------------------------------------------------


def mlp_grad(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    activation: str = "relu",
    loss: str = "mse",
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-task loss and gradient of a task-batched MLP, analytically, for all T tasks at once.

    Args:
        weights: L >= 1 tensors ``[T, out_l, in_l]`` (nn.Linear layout), ``in_1 = in``,
            ``in_{l+1} = out_l``.
        biases: L tensors ``[T, out_l]``, or None (no biases).
        x: ``[T, N, in]`` inputs.
        y: ``loss="mse"``: ``[T, N, out_L]`` float targets; ``loss="cross_entropy"``:
            ``[T, N]`` integer class indices in ``[0, out_L)``.
        activation: ``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"identity"``, applied after
            every layer but the last.
        loss: ``"mse"`` (per-task mean over ``N * out_L`` elements, as ``F.mse_loss``) or
            ``"cross_entropy"`` (per-task mean over N).
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns:
        ``(losses [T], grad_w, grad_b)``: ``grad_w[l]`` like ``weights[l]``, ``grad_b`` like
        ``biases`` (None without biases). Constants: not differentiable (no_grad semantics).

    Example::

        >>> w = [torch.randn(25, 40, 1), torch.randn(25, 40, 40), torch.randn(25, 1, 40)]
        >>> losses, gw, gb = fastmeta.ops.mlp_grad(w, None, x, y, "relu", "mse")

    Equivalent PyTorch code::

        losses = torch.stack([F.mse_loss(model_t(x[t]), y[t]) for t in range(T)])
        grads = torch.autograd.grad(losses.sum(), weights + biases)
    """
    weights, biases, x, y, _, _, act, lc, widths = _check(
        weights, biases, x, y, None, None, activation, loss, hvp=False)
    tensors = [x, *weights]
    name = registry.select("mlp_grad", tensors, backend, widths=tuple(widths), n=x.shape[1])
    if name == "reference":
        return mlp_grad_ref(weights, biases, x, y, activation, loss)
    with torch.no_grad():
        losses, gw, gb = _run(_grad_fwd, "mlp_grad_fwd", name, weights, biases or [], x, y,
                              act, lc)
    return losses, list(gw), (list(gb) if biases is not None else None)


def mlp_grad_hvp(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    v_w: list[torch.Tensor],
    v_b: list[torch.Tensor] | None,
    activation: str = "relu",
    loss: str = "mse",
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor],
           list[torch.Tensor] | None]:
    """Per-task loss, gradient and exact Hessian-vector product of a task-batched MLP.

    For every task t: ``losses[t]``, the gradient of ``losses[t]`` w.r.t. task t's parameters
    and ``H_t v_t`` (``H_t`` the Hessian of ``losses[t]`` w.r.t. them), computed with
    Pearlmutter's R-operator in one forward + R-forward + backward + R-backward sweep
    (including the activation's second-derivative term for tanh and sigmoid).

    Args:
        weights, biases, x, y, activation, loss: as :func:`mlp_grad`.
        v_w: L tensors shaped like ``weights`` (the direction for the weights).
        v_b: L tensors shaped like ``biases``, or None (a zero direction for the biases;
            must be None when ``biases`` is None).
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"`` (double backward).

    Returns:
        ``(losses [T], grad_w, grad_b, hvp_w, hvp_b)``; ``grad_b``/``hvp_b`` None without
        biases. Constants: not differentiable (no_grad semantics; inputs are detached).

    Example::

        >>> losses, gw, gb, hw, hb = fastmeta.ops.mlp_grad_hvp(w, b, x, y, vw, vb, "tanh", "mse")

    Equivalent PyTorch code::

        losses = per_task_mean_loss(mlp(weights, biases, x), y)          # [T]
        g = torch.autograd.grad(losses.sum(), params, create_graph=True)
        hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)
    """
    weights, biases, x, y, v_w, v_b, act, lc, widths = _check(
        weights, biases, x, y, v_w, v_b, activation, loss, hvp=True)
    if biases is not None and v_b is None:
        v_b = [torch.zeros_like(b) for b in biases]
    tensors = [x, *weights]
    name = registry.select("mlp_grad_hvp", tensors, backend, widths=tuple(widths), n=x.shape[1])
    if name == "reference":
        return mlp_grad_hvp_ref(weights, biases, x, y, v_w, v_b, activation, loss)
    with torch.no_grad():
        losses, gw, gb, hw, hb = _run(_grad_hvp_fwd, "mlp_grad_hvp_fwd", name, weights,
                                      biases or [], x, y, v_w, v_b or [], act, lc)
    nb = biases is not None
    return losses, list(gw), (list(gb) if nb else None), list(hw), (list(hb) if nb else None)
