"""Reptile: first-order meta-learning by moving the initialisation towards adapted parameters.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018
(Algorithm 2, the batched version)::

    for each task t of the meta-batch:  phi_t = k steps of SGD on task t's loss, from theta
    theta <- theta + epsilon * mean_t (phi_t - theta)

Here the ``k`` steps are full-batch gradient steps on each task's SUPPORT set, taken for all
``T`` tasks at once (``fastmeta.func.task_function`` + ``fastmeta.func.inner_loop`` in its
first-order mode, no graph), and the outer update is left to a PyTorch optimiser: the
``loss`` of :meth:`Reptile.meta_loss` back-propagates ``theta - mean_t phi_t`` into each
parameter's ``.grad``, so ``torch.optim.SGD(lr=epsilon)`` is exactly Reptile's update and
Adam etc. work too. The query set is used only to report the adapted parameters' loss and
accuracy (or MSE). Memory: the ``T`` adapted parameter sets, independent of ``k``.

Cost of the report: one forward of the adapted parameters on the query set. Reptile's update
does not need it, and with many queries it is not small: 15 queries per class against 1 shot
make that forward (600 images for T=8, 5-way) about as expensive as the whole 5-step
adaptation (5 forwards and backwards of 40 images) -- measured in
bench/results/reptile_imaml.md. ``meta_loss(support_x, support_y)`` without a query set
reports on the support set instead (one forward of the support examples).
"""

from __future__ import annotations

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
from fastmeta.func import inner_loop

Tensor = torch.Tensor


class Reptile(nn.Module):
    """Reptile (Nichol, Achiam & Schulman 2018), task-batched.

    Args:
        model: any ``nn.Module`` (task-batched models and models built from supported layers
            take the fast batched path, others ``torch.func``; see
            :func:`fastmeta.func.task_function`).
        lr: the inner learning rate (a float > 0).
        steps: ``k >= 1`` inner SGD steps per task (the default of :meth:`meta_loss`).

    ``meta_loss(support_x [T,S,...], support_y, query_x [T,Q,...], query_y, steps=None,
    loss_fn=F.cross_entropy, task_chunk=None) -> MetaLossResult``: ``result.loss.backward()``
    adds ``theta - mean_t phi_t`` to every parameter's ``.grad`` (its value is the query loss
    of the adapted parameters, for logging; without ``query_x``/``query_y`` the support loss
    of the adapted parameters). Evaluation (``torch.no_grad()``) adapts and predicts like MAML.

    Raises ``TypeError``/``ValueError`` for a non-module model, ``lr`` not a finite float
    ``> 0``, ``steps`` not an int ``>= 1`` and badly shaped meta-batches.

    Example::

        >>> reptile = fastmeta.Reptile(TaskConv4(1, n_way=5), lr=1e-2, steps=5)
        >>> opt = torch.optim.SGD(reptile.parameters(), lr=1.0)   # epsilon = 1
        >>> res = reptile.meta_loss(sx, sy, qx, qy)                # sx [T, 5, 1, 28, 28]
        >>> opt.zero_grad(); res.loss.backward(); opt.step()       # theta += mean(phi - theta)
        >>> res.accuracy                                           # after k steps, on the query
    """

    def __init__(self, model: nn.Module, lr: float, steps: int = 1):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.module = model
        self.lr = positive_float("lr", lr)
        self.steps = int_at_least("steps", steps, 1)

    def forward(self, *args, **kwargs):
        """Calls the wrapped model (with the meta-learned parameters theta)."""
        return self.module(*args, **kwargs)

    def task_function(self):
        """The :class:`fastmeta.func.TaskFunction` of the model (cached)."""
        return task_function(self.module)

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, steps: int | None = None,
                    loss_fn: Callable = F.cross_entropy) -> dict[str, Tensor]:
        """``phi_t``: ``{name: [T, *shape]}`` after ``steps`` (default ``self.steps``) SGD steps
        from theta on each task's support set, all tasks at once
        (``steps=0``: theta itself, e.g. to plot the initialisation). No autograd graph."""
        steps = self.steps if steps is None else int_at_least("steps", steps, 0)
        fn = self.task_function()
        theta = {k: p.detach() for k, p in fn.params().items()}
        with torch.no_grad():
            return inner_loop(fn, fn.expand(support_x.shape[0], theta), support_x, support_y, steps, self.lr,
                              first_order=True, loss_fn=loss_fn)

    def predict(self, adapted: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model with per-task parameters ``adapted`` on ``x [T, N, *in]``."""
        return self.task_function()(adapted, x)

    def _tasks(self, steps: int, loss_fn: Callable):
        def tasks_fn(sx, sy, qx, qy):
            phi = self.adapt_tasks(sx, sy, steps, loss_fn)
            with torch.no_grad():
                out = self.predict(phi, qx)
                value = task_losses(loss_fn, out, qy)
            theta = self.task_function().params()
            step = {k: p.detach() - phi[k] for k, p in theta.items()}  # theta - phi_t, [T, *shape]
            return gradient_carrier(value, theta, step), task_metric(out, qy)

        return tasks_fn

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor | None = None,
                  query_y: Tensor | None = None, steps: int | None = None,
                  loss_fn: Callable = F.cross_entropy,
                  task_chunk: int | None = None) -> MetaLossResult:
        """Adapt every task (``steps`` SGD steps on its support set, default ``self.steps``)
        and return a :class:`MetaLossResult` whose ``loss.backward()`` sets each parameter's
        gradient to ``theta - mean_t phi_t``.

        Args:
            support_x: ``[T, S, *in]``; support_y: ``[T, S]`` integer labels or ``[T, S, *out]``
                float targets. query_x: ``[T, Q, *in]``; query_y: ``[T, Q]`` or ``[T, Q, *out]``;
                used only for the report (``loss``'s value, ``metric``); both ``None``: the
                report is on the support set (cheaper when ``Q > S``; the gradient is the same).
            steps: inner steps ``k >= 1`` (``None``: ``self.steps``).
            loss_fn: per-example loss (``F.cross_entropy``, ``F.mse_loss``, ...; anything
                :func:`fastmeta.func.task_losses` accepts); each task's loss is its mean.
            task_chunk: adapt this many tasks at a time (same gradient, bounded memory);
                None or ``"auto"``: all tasks at once.

        Returns:
            ``loss`` (value: mean query loss of the adapted parameters; gradient: theta -
            mean phi), ``metric`` (query accuracy or MSE after adaptation), per-task values.
            The data gets no gradient.

        Raises:
            ValueError: only one of ``query_x`` and ``query_y`` given; bad shapes (see
                :class:`Reptile`).
        """
        if (query_x is None) != (query_y is None):
            raise ValueError("query_x and query_y must both be given or both be None (then the "
                             f"report is on the support set); got query_x={_shape(query_x)}, "
                             f"query_y={_shape(query_y)}")
        if query_x is None:
            query_x, query_y = support_x, support_y
        check_batch(support_x, support_y, query_x, query_y)
        steps = self.steps if steps is None else int_at_least("steps", steps, 1)
        return run_meta_loss(self._tasks(steps, loss_fn), (support_x, support_y, query_x, query_y),
                             list(self.parameters()), check_chunk(task_chunk), metric_name(query_y))


def _shape(t) -> str:
    return "None" if t is None else (f"a tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor)
                                     else type(t).__name__)
