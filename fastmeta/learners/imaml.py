"""iMAML: meta-learning with implicit gradients.

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019.
Each task t adapts by (approximately) solving a proximally regularised problem::

    phi_t = argmin_phi  L_t^support(phi) + lam/2 ||phi - theta||^2

Its stationarity condition ``grad L(phi) + lam (phi - theta) = 0``, differentiated w.r.t.
theta, gives ``(H_t + lam I) dphi/dtheta = lam I`` (``H_t`` the support-loss Hessian at
phi_t), so the meta-gradient of task t's query loss is (``dphi/dtheta`` is symmetric)::

    g_t = lam (H_t + lam I)^-1 grad L_t^query(phi_t) = (I + H_t / lam)^-1 grad L_t^query(phi_t)

(the paper's equation 6 / Lemma 1), whatever the path the inner optimiser took. Here the
inner problem is solved by ``k`` gradient steps for all ``T`` tasks at once, and the ``T``
linear systems ``(I + H_t/lam) x_t = grad L_t^query`` by batched conjugate gradient
(:func:`conjugate_gradient`), each iteration one batched Hessian-vector product
(:func:`fastmeta.func.task_hvp`). Nothing of the inner trajectory is kept: memory is
independent of ``k`` (MAML's backward needs every iterate). The implicit gradient is exact
only at the inner optimum; with few steps it is the paper's approximation.

The inner descent is safeguarded: a step that raises a task's regularised support loss is
rejected and that task's step size halved (backtracking). Theorem 1 of the paper needs phi_t
within delta of the inner optimum; plain gradient descent diverges from it once the support
Hessian's largest eigenvalue exceeds ``2/lr - lam``, which happens in training (on sinusoid
regression with lr 0.01 the top eigenvalue grew past 1,000 within 100 meta-steps and the
adapted losses went to NaN), because nothing in the implicit gradient penalises curvature.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.func import task_function, task_losses
from fastmeta.learners._meta_loss import (
    MetaLossResult,
    check_batch,
    check_chunk,
    gradient_carrier,
    int_at_least,
    metric_name,
    positive_float,
    run_meta_loss,
    task_metric,
)
from fastmeta.func import inner_loop, task_hvp

Tensor = torch.Tensor


def _dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    """Per-task inner product over all tensors of two ``{name: [T, *shape]}`` dicts: ``[T]``."""
    return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)


def _per_task(s: Tensor, like: Tensor) -> Tensor:
    return s.reshape(-1, *[1] * (like.dim() - 1))


def _tolerance(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(v).__name__}")
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
    return float(v)


def conjugate_gradient(matvec: Callable[[dict], dict], b: dict[str, Tensor], steps: int,
                       tol: float = 0.0) -> dict[str, Tensor]:
    """Solve ``A_t x_t = b_t`` for ``T`` symmetric positive definite systems at once by
    conjugate gradient (Hestenes & Stiefel 1952), starting from ``x = 0``.

    Args:
        matvec: ``v -> A v`` on ``{name: [T, *shape]}`` dicts, task t's block applied to
            ``v[.][t]`` (e.g. batched Hessian-vector products).
        b: ``{name: [T, *shape]}`` right-hand sides.
        steps: at most this many iterations (``>= 1``); in exact arithmetic CG solves an
            ``n``-dimensional system in ``n``.
        tol: stop early once every task's residual ``||b - A x|| <= tol * ||b||`` (0: never).

    Returns:
        ``{name: [T, *shape]}`` the solutions. A task whose system shows non-positive
        curvature along a search direction (``A_t`` not positive definite there) keeps its
        last iterate from then on (truncated CG, as in Newton-CG) and a ``RuntimeWarning``
        names the tasks; a task with ``b_t = 0`` gets 0.

    Raises:
        FloatingPointError: ``matvec`` returned NaN or infinity (nothing CG can solve).
    """
    steps = int_at_least("steps", steps, 1)
    tol = _tolerance("tol", tol)
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    rr = _dot(r, r)
    stop = (tol * tol) * rr
    active = rr > 0
    for _ in range(steps):
        if tol > 0 and not bool((active & (rr > stop)).any()):
            break
        ap = matvec(p)
        pap = _dot(p, ap)
        if not bool(torch.isfinite(pap).all()):
            raise FloatingPointError(f"conjugate_gradient: matvec returned non-finite values for tasks "
                                     f"{torch.nonzero(~torch.isfinite(pap)).flatten().tolist()}")
        bent = active & (rr > 0) & (pap <= 0)
        if bool(bent.any()):
            warnings.warn("conjugate_gradient: some tasks' systems are not positive definite (p^T A p <= 0 "
                          "along a search direction); their solutions are truncated there (for iMAML: the "
                          "support Hessian has an eigenvalue below -lam: raise lam)", RuntimeWarning, stacklevel=2)
        active = active & (pap > 0) & (rr > 0)
        alpha = torch.where(active, rr / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        for k in x:
            x[k] = x[k] + _per_task(alpha, x[k]) * p[k]
            r[k] = r[k] - _per_task(alpha, r[k]) * ap[k]
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        for k in p:
            p[k] = r[k] + _per_task(beta, p[k]) * p[k]
        rr = rr_new
    return x


class iMAML(nn.Module):  # noqa: N801 - the paper's name
    """Implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019), task-batched.

    Args:
        model: any ``nn.Module`` (see :func:`fastmeta.func.task_function` for the paths).
        lr: inner learning rate (float > 0) of the ``k`` gradient steps on the regularised
            support loss ``L(phi) + lam/2 ||phi - theta||^2`` (they converge only if ``lr``
            is below ``2 / (lam + largest eigenvalue of H)``).
        lam: the proximal regularisation ``lambda > 0``. Larger: phi stays nearer theta and
            the systems are better conditioned (``(H + lam I)`` must be positive definite
            for CG; where it is not, e.g. a freshly initialised ReLU MLP whose support
            Hessian has eigenvalues below ``-lam``, that task's CG stops early: see
            :func:`conjugate_gradient`). The authors' Omniglot example
            (aravindr93/imaml_dev) uses lam 2, inner lr 0.1, 16 steps and 5 CG steps.
        steps: ``k >= 1`` inner steps (the default of :meth:`meta_loss`).
        cg_steps: conjugate-gradient iterations ``>= 1``.
        cg_tol: stop CG once every task's relative residual is below this (0: run all).

    ``meta_loss(support_x [T,S,...], support_y, query_x [T,Q,...], query_y, steps=None,
    loss_fn=F.cross_entropy, task_chunk=None) -> MetaLossResult``: ``loss`` is the mean
    query loss of the adapted parameters; ``loss.backward()`` adds the implicit meta-gradient
    ``mean_t (I + H_t/lam)^-1 grad L_t^query(phi_t)`` to each parameter's ``.grad``.
    Evaluation (``torch.no_grad()``) adapts (the same regularised inner problem) and predicts.

    Raises ``TypeError``/``ValueError`` for a non-module model, ``lr``/``lam`` not finite
    floats ``> 0``, ``steps``/``cg_steps`` not ints ``>= 1``, bad meta-batches.

    Example::

        >>> imaml = fastmeta.iMAML(TaskConv4(1, n_way=5), lr=0.1, lam=2.0, steps=10, cg_steps=5)
        >>> opt = torch.optim.Adam(imaml.parameters(), 1e-3)
        >>> res = imaml.meta_loss(sx, sy, qx, qy)
        >>> opt.zero_grad(); res.loss.backward(); opt.step()
    """

    def __init__(self, model: nn.Module, lr: float, lam: float = 1.0, steps: int = 1, cg_steps: int = 5,
                 cg_tol: float = 0.0):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.module = model
        self.lr = positive_float("lr", lr)
        self.lam = positive_float("lam", lam)
        self.steps = int_at_least("steps", steps, 1)
        self.cg_steps = int_at_least("cg_steps", cg_steps, 1)
        self.cg_tol = _tolerance("cg_tol", cg_tol)

    def forward(self, *args, **kwargs):
        """Calls the wrapped model (with the meta-learned parameters theta)."""
        return self.module(*args, **kwargs)

    def task_function(self):
        """The :class:`fastmeta.func.TaskFunction` of the model (cached)."""
        return task_function(self.module)

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, steps: int | None = None,
                    loss_fn: Callable = F.cross_entropy) -> dict[str, Tensor]:
        """``phi_t``: ``{name: [T, *shape]}`` after ``steps`` gradient steps on
        ``F_t(phi) = L_t(phi) + lam/2 ||phi - theta||^2`` from ``phi = theta``, all tasks at
        once: ``phi <- phi - lr_t * (grad L_t(phi) + lam (phi - theta))``. No autograd graph
        (``steps=0``: theta itself).

        Safeguard (backtracking): ``lr_t`` starts at ``lr``; a step that raises ``F_t`` (beyond
        float rounding, ``sqrt(eps) |F_t|``) or makes it non-finite is rejected and ``lr_t``
        halved, so ``F_t`` never rises and the iterates stay finite however large the
        curvature. A ``RuntimeWarning`` says so the first time (``lr`` is then above
        ``2 / (lam + largest eigenvalue of H)`` for some tasks). Costs one extra forward of
        the support set per step (modules that track running statistics see it)."""
        steps = self.steps if steps is None else int_at_least("steps", steps, 0)
        fn = self.task_function()
        theta = fn.expand(support_x.shape[0], {k: p.detach() for k, p in fn.params().items()})
        phi = theta
        with torch.no_grad():
            obj = self._objective(phi, theta, support_x, support_y, loss_fn)
            lr = torch.full_like(obj, self.lr)
            slack = torch.finfo(obj.dtype).eps ** 0.5
            for _ in range(steps):
                # one first-order inner_loop step is phi - lr * grad L(phi) through the model's
                # fastest gradient path (closed form for MLPs); per-task rates once any halved
                rate = self.lr if bool((lr == self.lr).all()) else {k: _per_task(lr, v) for k, v in phi.items()}
                half = inner_loop(fn, phi, support_x, support_y, 1, rate, first_order=True, loss_fn=loss_fn)
                cand = {k: half[k] - _per_task(lr * self.lam, v) * (v - theta[k]) for k, v in phi.items()}
                new = self._objective(cand, theta, support_x, support_y, loss_fn)
                ok = new <= obj + slack * obj.abs()  # False for NaN
                if not bool(ok.all()):
                    warnings.warn(f"iMAML: an inner step with lr={self.lr:g}, lam={self.lam:g} raised some tasks' "
                                  f"regularised support loss (their support Hessian has eigenvalues above "
                                  f"2/lr - lam); those steps were rejected and the tasks' step sizes halved. Lower "
                                  f"the inner lr or raise lam.", RuntimeWarning, stacklevel=2)
                phi = {k: torch.where(_per_task(ok, v), cand[k], v) for k, v in phi.items()}
                obj = torch.where(ok, new, obj)
                lr = torch.where(ok, lr, lr / 2)
        return phi

    def _objective(self, phi: dict[str, Tensor], theta: dict[str, Tensor], x: Tensor, y: Tensor,
                   loss_fn: Callable) -> Tensor:
        """``[T]``: each task's regularised support loss ``L_t(phi) + lam/2 ||phi - theta||^2``."""
        dist = {k: v - theta[k] for k, v in phi.items()}
        return task_losses(loss_fn, self.predict(phi, x), y) + self.lam / 2 * _dot(dist, dist)

    def predict(self, adapted: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model with per-task parameters ``adapted`` on ``x [T, N, *in]``."""
        return self.task_function()(adapted, x)

    def implicit_grad(self, phi: dict[str, Tensor], support_x: Tensor, support_y: Tensor,
                      query_grad: dict[str, Tensor], loss_fn: Callable = F.cross_entropy) -> dict[str, Tensor]:
        """``(I + H_t/lam)^-1 query_grad_t`` for every task (``H_t``: the support loss's
        Hessian at ``phi_t``) by :func:`conjugate_gradient` on batched HVPs: ``[T, *shape]``."""
        fn, lam = self.task_function(), self.lam

        def matvec(v):
            hv = task_hvp(fn, phi, support_x, support_y, v, loss_fn=loss_fn)
            return {k: v[k] + hv[k] / lam for k in v}

        return conjugate_gradient(matvec, query_grad, self.cg_steps, self.cg_tol)

    def _tasks(self, steps: int, loss_fn: Callable):
        def tasks_fn(sx, sy, qx, qy):
            fn = self.task_function()
            phi = self.adapt_tasks(sx, sy, steps, loss_fn)
            theta = fn.params()
            if not torch.is_grad_enabled() or not theta:
                with torch.no_grad():
                    out = self.predict(phi, qx)
                    return task_losses(loss_fn, out, qy), task_metric(out, qy)
            leaves = {k: v.detach().requires_grad_() for k, v in phi.items()}
            out = self.predict(leaves, qx)
            value = task_losses(loss_fn, out, qy)
            g = torch.autograd.grad(value.sum(), list(leaves.values()), allow_unused=True)
            g = {k: torch.zeros_like(v) if gk is None else gk for (k, v), gk in zip(leaves.items(), g)}
            meta = self.implicit_grad(phi, sx.detach(), sy, g, loss_fn)
            return gradient_carrier(value, theta, meta), task_metric(out.detach(), qy)

        return tasks_fn

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  steps: int | None = None, loss_fn: Callable = F.cross_entropy,
                  task_chunk: int | None = None) -> MetaLossResult:
        """Adapt every task and return a :class:`MetaLossResult` whose ``loss.backward()``
        puts the implicit meta-gradient in each parameter's ``.grad``.

        Args:
            support_x: ``[T, S, *in]``; support_y: ``[T, S]`` integer labels or ``[T, S, *out]``
                float targets. query_x: ``[T, Q, *in]``; query_y: ``[T, Q]`` or ``[T, Q, *out]``.
            steps: inner steps ``k >= 1`` (``None``: ``self.steps``).
            loss_fn: per-example loss (anything :func:`fastmeta.func.task_losses` accepts);
                each task's loss is its mean over its examples.
            task_chunk: adapt this many tasks at a time (same gradient, bounded memory);
                None or ``"auto"``: all tasks at once.

        Returns:
            ``loss`` (value: mean query loss at ``phi``; gradient: the implicit
            meta-gradient averaged over tasks), ``metric``, per-task values. The data gets
            no gradient.
        """
        check_batch(support_x, support_y, query_x, query_y)
        steps = self.steps if steps is None else int_at_least("steps", steps, 1)
        return run_meta_loss(self._tasks(steps, loss_fn), (support_x, support_y, query_x, query_y),
                             list(self.parameters()), check_chunk(task_chunk), metric_name(query_y))
