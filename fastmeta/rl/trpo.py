"""Trust-region step: conjugate gradient and a backtracking line search under a KL bound.

Schulman et al., "Trust Region Policy Optimization", ICML 2015 (appendix C): solve
``F x = g`` with a few conjugate-gradient iterations using only products ``F v``, scale the
direction to the trust region ``0.5 x^T F x = max_kl``, then shrink the step until the
surrogate improves and the measured KL is within the bound. Defaults as in pytorch-maml-rl.

Vectors are flat 1-D tensors (see :func:`flatten` / :func:`unflatten` for parameter dicts).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def flatten(tensors: dict[str, Tensor]) -> Tensor:
    """Concatenate a dict of tensors into one 1-D vector (dict order)."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split ``vec`` into tensors shaped as the values of ``like`` (same keys and order)."""
    n = sum(t.numel() for t in like.values())
    if vec.dim() != 1 or vec.numel() != n:
        raise ValueError(f"vec must be a 1-D tensor of {n} elements, got shape {tuple(vec.shape)}")
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vec[i : i + t.numel()].view_as(t)
        i += t.numel()
    return out


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10, return_product: bool = False):
    """Approximately solve ``A x = b`` for symmetric positive definite ``A`` given by
    ``fvp(v) = A v`` (Hestenes & Stiefel 1952), starting at ``x = 0``; stops after ``iters``
    products or when ``r^T r < residual_tol``. ``b`` is 1-D; returns ``x`` like ``b``.

    With ``return_product``: ``(x, A x)``, where ``A x = b - r`` comes from the residual CG
    carries. That residual is ``b`` minus the sum of ``alpha_k * fvp(p_k)``, the products already
    made, and ``x`` is the sum of ``alpha_k * p_k``. So ``b - r`` equals ``fvp(x)`` up to rounding,
    for any ``A`` (it does not rely on the directions staying conjugate) and without one more
    product. :func:`trust_region_step` takes it as ``product``.

    Raises ValueError for a non-1-D or non-finite ``b``, ``iters < 1``, or a product that is
    not finite or shows ``A`` is not positive definite (``p^T A p <= 0``).
    """
    if not isinstance(b, Tensor) or b.dim() != 1:
        raise ValueError(f"b must be a 1-D tensor, got {tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
    if not torch.isfinite(b).all():
        raise ValueError("b has non-finite entries")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    for _ in range(iters):
        if rr.item() < residual_tol:
            break
        Ap = fvp(p)
        if Ap.shape != p.shape:
            raise ValueError(f"fvp returned shape {tuple(Ap.shape)} for a vector of shape {tuple(p.shape)}")
        pAp = torch.dot(p, Ap)
        if not torch.isfinite(pAp) or pAp.item() <= 0:
            raise ValueError(f"conjugate_gradient: p^T A p = {pAp.item():.3e}; A must be symmetric positive definite")
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return (x, b - r) if return_product else x


def trust_region_step(direction: Tensor, fvp: Callable[[Tensor], Tensor], max_kl: float,
                      product: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(step, F direction)``: ``direction`` scaled so that ``0.5 step^T F step = max_kl``.
    ``product``: ``F direction`` when the caller has it (:func:`conjugate_gradient`'s
    ``return_product``); otherwise one ``fvp(direction)`` makes it."""
    if not max_kl > 0:
        raise ValueError(f"max_kl must be > 0, got {max_kl!r}")
    if product is not None and product.shape != direction.shape:
        raise ValueError(f"product must have the direction's shape {tuple(direction.shape)}, "
                         f"got {tuple(product.shape)}")
    Fd = fvp(direction) if product is None else product
    shs = 0.5 * torch.dot(direction, Fd)
    if not torch.isfinite(shs) or shs.item() <= 0:
        raise ValueError(f"trust_region_step: direction^T F direction = {2 * shs.item():.3e} must be > 0")
    return direction / torch.sqrt(shs / max_kl), Fd


def line_search(evaluate: Callable[[float], tuple[float, float]], old_loss: float, max_kl: float,
                steps: int = 15, backtrack: float = 0.8) -> tuple[float, int, float, float]:
    """Backtracking line search: try step sizes ``1, backtrack, backtrack^2, ...`` (``steps``
    tries) and accept the first with ``loss < old_loss`` and ``kl < max_kl``.

    ``evaluate(step_size) -> (loss, kl)`` applies the step and measures. Returns
    ``(step_size, tries, loss, kl)``; ``step_size = 0.0`` when no try was accepted (the caller
    keeps the old parameters), with the last try's loss and KL.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0 < backtrack < 1:
        raise ValueError(f"backtrack must be in (0, 1), got {backtrack!r}")
    size = 1.0
    loss, kl = math.inf, math.inf
    for i in range(steps):
        loss, kl = evaluate(size)
        if loss < old_loss and kl < max_kl:
            return size, i + 1, loss, kl
        size *= backtrack
    return 0.0, steps, loss, kl
