"""``gaussian_product``: the product of a variable number of diagonal Gaussian factors, per task.

Rakelly et al., "Efficient Off-Policy Meta-Reinforcement Learning via Probabilistic Context
Variables" (PEARL), ICML 2019, section 4.1: the posterior over the latent context is the
product of one Gaussian factor per transition of the context.
"""

from __future__ import annotations

import math

import torch

from fastmeta.ops import checks, registry

_STEM = "gaussian_product"
MIN_VAR = 1e-7  # PEARL's clamp of the factors' variances (product_of_gaussians)

registry.register(
    "gaussian_product",
    [registry.triton_backend(), registry.cpp_backend(), registry.reference_backend()],
)


def gaussian_product_ref(
    mu: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None = None, min_var: float = MIN_VAR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch product of Gaussians (the oracle and the always-available backend).

    Same contract as :func:`gaussian_product` without the input checks; twice differentiable.
    Factors with ``mask == 0`` are replaced before any arithmetic, so padding may hold anything
    (even NaN) and receives a zero gradient.
    """
    b, c, _ = mu.shape
    w = mu.new_ones(b, c) if mask is None else mask.detach().to(mu.dtype)
    w = w.unsqueeze(-1)
    valid = w > 0
    # clamp like PEARL; a negative variance is invalid and becomes NaN (the caller raises)
    v = torch.where(var < 0, math.nan, var.clamp_min(min_var))
    prec = w / torch.where(valid, v, 1.0)
    var_out = 1.0 / prec.sum(1)
    mu_out = var_out * (prec * torch.where(valid, mu, 0.0)).sum(1)
    return mu_out, var_out


# ---- registered ops (compiled / Triton entry points behind one autograd op) -------------


@torch.library.custom_op("fastmeta::gaussian_product_fwd", mutates_args=())
def _fwd(
    mu: torch.Tensor, var: torch.Tensor, weights: torch.Tensor, min_var: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu_out [B,D], var_out [B,D])`` for factors ``[B,C,D]`` weighted by ``weights [B,C]``."""
    return registry.kernel(backend, _STEM, "gaussian_product_fwd")(mu, var, weights, min_var)


@_fwd.register_fake
def _(mu, var, weights, min_var, backend):
    b, _, d = mu.shape
    return mu.new_empty(b, d), mu.new_empty(b, d)


@torch.library.custom_op("fastmeta::gaussian_product_bwd", mutates_args=())
def _bwd(
    grad_mu: torch.Tensor, grad_var: torch.Tensor, mu: torch.Tensor, var: torch.Tensor,
    weights: torch.Tensor, mu_out: torch.Tensor, var_out: torch.Tensor, min_var: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad mu [B,C,D], grad var [B,C,D])`` from the output gradients ``[B,D]``."""
    return registry.kernel(backend, _STEM, "gaussian_product_bwd")(
        grad_mu, grad_var, mu, var, weights, mu_out, var_out, min_var
    )


@_bwd.register_fake
def _(grad_mu, grad_var, mu, var, weights, mu_out, var_out, min_var, backend):
    return torch.empty_like(mu), torch.empty_like(var)


def _save(ctx, mu, var, weights, min_var, backend, output):
    ctx.save_for_backward(mu, var, weights, *output)
    ctx.min_var, ctx.backend = min_var, backend


def _grads(ctx, grad_mu, grad_var, bwd):
    """(grad mu, grad var) through ``bwd`` (the registered op or the kernel itself), or, under
    create_graph=True, through the reference, so that double backward is exact."""
    mu, var, weights, mu_out, var_out = ctx.saved_tensors
    grad_mu = torch.zeros_like(mu_out) if grad_mu is None else grad_mu
    grad_var = torch.zeros_like(var_out) if grad_var is None else grad_var
    if torch.is_grad_enabled():
        wanted = [t for t in (mu, var) if t.requires_grad]
        outs = gaussian_product_ref(mu, var, weights, ctx.min_var)
        got = iter(torch.autograd.grad(outs, wanted, (grad_mu, grad_var), create_graph=True))
        return tuple(next(got) if t.requires_grad else None for t in (mu, var))
    return bwd(grad_mu.contiguous(), grad_var.contiguous(), mu, var, weights, mu_out, var_out,
               ctx.min_var)


def _setup(ctx, inputs, output):
    _save(ctx, *inputs, output)


def _backward(ctx, grad_mu, grad_var):
    g_mu, g_var = _grads(ctx, grad_mu, grad_var, lambda *args: _bwd(*args, ctx.backend))
    return g_mu, g_var, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


class _Eager(torch.autograd.Function):
    """The same op for eager mode: the kernels behind a plain autograd.Function (the custom
    op's Python autograd wrapper costs more than the kernel at PEARL's sizes:
    ``bench/results/design_notes.md``); torch.compile traces the registered op instead (it has
    the fake)."""

    @staticmethod
    def forward(ctx, mu, var, weights, min_var, backend):
        out = registry.kernel(backend, _STEM, "gaussian_product_fwd")(mu, var, weights, min_var)
        _save(ctx, mu, var, weights, min_var, backend, out)
        return out

    @staticmethod
    def backward(ctx, grad_mu, grad_var):
        bwd = registry.kernel(ctx.backend, _STEM, "gaussian_product_bwd")
        g_mu, g_var = _grads(ctx, grad_mu, grad_var, bwd)
        return g_mu, g_var, None, None, None


# ---- checks --------------------------------------------------------------------------------


def _can_read_data() -> bool:
    """Value checks read tensors on the host: not while torch.compile traces or under torch.func
    transforms (vmap cannot read a batched value)."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def _weights(mask, b: int, c: int, like: torch.Tensor) -> torch.Tensor:
    """The mask as ``[B, C]`` factor weights in ``like``'s dtype (ones when ``mask`` is None).

    A negative or NaN weight raises here (one reduction); a row without a valid factor makes the
    output infinite and is named by :func:`_check_output`, so a valid call pays no pass for it.
    """
    if mask is None:
        return like.new_ones(b, c)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape [B, C] or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask must be a bool, integer or floating tensor, got {mask.dtype}")
    if tuple(mask.shape) != (b, c):
        raise ValueError(f"mask must have shape [B, C] = {(b, c)}, got {tuple(mask.shape)}")
    checks.same_device(mu=like, mask=mask)
    if mask.dtype != torch.bool and _can_read_data() and not bool(mask.min() >= 0):
        bad = (~(mask >= 0)).nonzero()[0]
        i, j = int(bad[0]), int(bad[1])
        raise ValueError(
            f"mask must be >= 0 (a factor weight; 0 = padding), got {mask[i, j].item()} at [{i}, {j}]"
        )
    return mask.detach().to(like.dtype).contiguous()


def _check_output(mu_out, var_out, mu, var, weights) -> None:
    """The result must be finite; if not, name the row or the valid factor that made it so."""
    if math.isfinite(float(mu_out.detach().sum()) + float(var_out.detach().sum())):
        return
    if bool(torch.isfinite(mu_out).all()) and bool(torch.isfinite(var_out).all()):
        return  # only the sums overflowed
    empty = ~(weights > 0).any(1)
    if bool(empty.any()):
        rows = empty.nonzero()[:, 0].tolist()
        raise ValueError(
            f"mask: row {rows[0]} has no valid factor (every row needs at least one nonzero "
            f"mask entry); {len(rows)} such rows: {rows[:10]}"
        )
    if not bool(torch.isfinite(weights).all()):
        i, j = (int(x) for x in (~torch.isfinite(weights)).nonzero()[0])
        raise ValueError(f"mask must be finite, got {weights[i, j].item()} at [{i}, {j}]")
    valid = (weights > 0).unsqueeze(-1)
    for name, t, bad in (
        ("mu", mu, valid & ~torch.isfinite(mu)),
        ("var", var, valid & torch.isnan(var)),
        ("var", var, valid & (var < 0)),
    ):
        if bool(bad.any()):
            i, j, k = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"{name}[{i}, {j}, {k}] = {t[i, j, k].item()} in a valid factor (mask != 0); mu "
                "must be finite and var >= 0 (not NaN) wherever mask != 0"
            )
    flat = ~((torch.isfinite(var) & valid).any(-2))  # [B, D]: every valid factor has var = inf
    if bool(flat.any()):
        i, k = (int(x) for x in flat.nonzero()[0])
        raise ValueError(
            f"var[{i}, :, {k}] is inf in every valid factor of row {i}: the product has zero "
            "precision (infinite variance) there"
        )
    raise ValueError(
        "gaussian_product overflowed: the result is not finite although every valid factor is "
        "(precisions 1/var or mu/var out of the dtype's range; raise min_var or use float64)"
    )


# ---- public function ---------------------------------------------------------------------


def gaussian_product(
    mu: torch.Tensor,
    var: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    min_var: float = MIN_VAR,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product of diagonal Gaussian factors over a variable-length context, per task.

    For every task ``b`` and latent dimension ``d``, with factor weights ``w_c = mask[b, c]``
    and clamped variances ``v_c = max(var[b, c, d], min_var)``::

        var_out = 1 / sum_c (w_c / v_c)
        mu_out  = var_out * sum_c (w_c * mu[b, c, d] / v_c)

    the normalised product of the Gaussians N(mu_c, v_c) (each raised to the power w_c), as
    PEARL's context encoder combines one factor per transition (Rakelly et al. 2019, sec. 4.1).
    Variances below ``min_var`` are raised to it as PEARL does (``torch.clamp(var, min=1e-7)``),
    so a factor of variance 0 has a finite precision; their gradient w.r.t. ``var`` is 0 there.

    Args:
        mu: ``[B, C, D]`` floating means of C factors for each of B tasks.
        var: ``[B, C, D]`` variances, same dtype and device; ``>= 0`` wherever ``mask != 0``.
        mask: ``[B, C]`` or None (every factor counts). Bool or integer/floating weights
            ``>= 0``: ``0`` marks padding of a shorter context (its ``mu``/``var`` are ignored,
            even NaN, and get a zero gradient); fractional weights temper a factor. Every row
            needs at least one nonzero entry. Not differentiated.
        min_var: the clamp, a finite float ``> 0`` (default ``1e-7``, PEARL's).
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"`` (default: the first that
            fits, see ``fastmeta.backends()``; ``FASTMETA_BACKEND`` also forces one).

    Returns:
        ``(mu_out [B, D], var_out [B, D])``, differentiable w.r.t. ``mu`` and ``var`` (twice:
        a ``create_graph`` backward differentiates the reference).

    Raises:
        TypeError: non-float ``mu``/``var``, mismatched dtypes, a complex or non-tensor mask.
        ValueError: shape or device mismatch, an empty dimension, a mask entry that is negative
            or not finite, a row with no valid factor (named), NaN/Inf ``mu`` or NaN/negative
            ``var`` in a valid factor (named), a result that overflows the dtype. The checks that
            read data are skipped while ``torch.compile`` traces and under ``torch.func``
            transforms.

    Example::

        >>> mu, var = torch.randn(16, 100, 5), torch.rand(16, 100, 5) + 0.1
        >>> lengths = torch.randint(1, 101, (16,))
        >>> mask = torch.arange(100) < lengths[:, None]          # [16, 100] bool
        >>> z_mu, z_var = fastmeta.ops.gaussian_product(mu, var, mask)
        >>> z_mu.shape, z_var.shape
        (torch.Size([16, 5]), torch.Size([16, 5]))

    Equivalent PyTorch code (PEARL's ``product_of_gaussians`` with a mask)::

        w = mask.to(mu.dtype)[..., None]                          # [B, C, 1]
        prec = w / torch.clamp(var, min=min_var)                  # padding must be finite here
        var_out = 1.0 / prec.sum(1)
        mu_out = var_out * (prec * mu).sum(1)
    """
    checks.float_tensor("mu", mu, 3, "[B, C, D]")
    checks.float_tensor("var", var, 3, "[B, C, D]")
    checks.same_dtype(mu=mu, var=var)
    checks.same_device(mu=mu, var=var)
    if mu.shape != var.shape:
        raise ValueError(f"var must have the shape of mu {tuple(mu.shape)}, got {tuple(var.shape)}")
    b, c, d = mu.shape
    checks.nonempty(B=b, C=c, D=d)
    min_var = checks.scalar("min_var", min_var)
    if min_var <= 0:
        raise ValueError(f"min_var must be > 0, got {min_var}")
    weights = _weights(mask, b, c, mu)
    name = registry.select("gaussian_product", [mu, var], backend)
    if name == "reference" or torch._C._are_functorch_transforms_active():
        # (torch.func transforms run neither custom ops nor autograd.Functions without vmap
        # rules: the reference's plain torch ops serve them)
        out = gaussian_product_ref(mu, var, weights, min_var)
    elif torch.compiler.is_compiling():  # the registered op: it has the fake tracing needs
        out = _fwd(mu.contiguous(), var.contiguous(), weights, min_var, name)
    elif torch.is_grad_enabled() and (mu.requires_grad or var.requires_grad):
        out = _Eager.apply(mu.contiguous(), var.contiguous(), weights, min_var, name)
    else:
        out = registry.kernel(name, _STEM, "gaussian_product_fwd")(
            mu.contiguous(), var.contiguous(), weights, min_var
        )
    if _can_read_data():
        _check_output(*out, mu, var, weights)
    return out
