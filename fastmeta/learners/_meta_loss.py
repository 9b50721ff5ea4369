"""What the episodic meta-learners share (MAML family, Reptile, iMAML): meta-batch and value
checks, :class:`MetaLossResult`, the task-chunked meta-loss driver :func:`run_meta_loss` and
:func:`gradient_carrier` (a loss whose gradient is a meta-gradient computed by other means)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


# ---- validation -----------------------------------------------------------------------------


def check_chunk(task_chunk) -> int | str | None:
    """``task_chunk`` of a meta-loss: an int >= 1 (tasks per chunk), None (all tasks at once) or
    ``"auto"`` (the learner's choice; all at once where it has none)."""
    if task_chunk is None or task_chunk == "auto":
        return task_chunk
    if isinstance(task_chunk, bool) or not isinstance(task_chunk, int) or task_chunk < 1:
        raise ValueError(f"task_chunk must be 'auto', None or an int >= 1 (tasks per chunk), got {task_chunk!r}")
    return task_chunk


def positive_float(name: str, v) -> float:
    """A finite python number ``> 0`` (``bool`` is not one) as a ``float``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return v


def int_at_least(name: str, v, lo: int) -> int:
    """An ``int`` (``bool`` is not one) ``>= lo``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int >= {lo}, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v}")
    return v


def check_batch(support_x, support_y, query_x, query_y) -> int:
    """Shapes of a meta-batch: ``x [T, N, ...]``, ``y [T, N, ...]``; returns ``T``."""
    named = dict(support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [T, N, ...], got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape [T, N, ...] (tasks first), got {tuple(t.shape)}")
    for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
        if tuple(named[x].shape[:2]) != tuple(named[y].shape[:2]):
            raise ValueError(f"{x} {tuple(named[x].shape)} and {y} {tuple(named[y].shape)} must agree on "
                             f"[T, N] (tasks, examples per task)")
    ts = {name: t.shape[0] for name, t in named.items()}
    if len(set(ts.values())) != 1:
        raise ValueError("mismatched number of tasks T: " + ", ".join(f"{k} has {v}" for k, v in ts.items()))
    for name in ("support_x", "query_x"):
        if not named[name].is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {named[name].dtype}")
        if named[name].shape[0] == 0 or named[name].shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(named[name].shape)}; need T >= 1 and N >= 1")
    return support_x.shape[0]


# ---- results and the chunked meta-loss ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetaLossResult:
    """What ``meta_loss`` returns.

    Attributes:
        loss: scalar, the query loss averaged over the ``T`` tasks (call ``backward()`` on it).
        metric: scalar (no grad), the query accuracy (integer labels) or the query MSE (float
            targets), averaged over tasks.
        task_loss: ``[T]`` per-task query losses (no grad).
        task_metric: ``[T]`` per-task accuracy or MSE (no grad).
        metric_name: what ``metric`` and ``task_metric`` hold: ``"accuracy"`` or ``"mse"``
            (the names :attr:`EvalResult.metric <fastmeta.learners.EvalResult.metric>` uses).

    Not a tuple: read ``result.loss`` and ``result.metric`` by name.
    """

    loss: Tensor
    metric: Tensor
    task_loss: Tensor
    task_metric: Tensor
    metric_name: str

    @property
    def accuracy(self) -> Tensor | None:
        """``metric`` when it is the query accuracy, else None."""
        return self.metric if self.metric_name == "accuracy" else None

    @property
    def mse(self) -> Tensor | None:
        """``metric`` when it is the query MSE, else None."""
        return self.metric if self.metric_name == "mse" else None


def metric_name(y: Tensor) -> str:
    return "mse" if y.is_floating_point() else "accuracy"


@torch.no_grad()
def task_metric(out: Tensor, y: Tensor) -> Tensor:
    """Per-task query accuracy (``y`` integer ``[T, Q]``, ``out`` logits ``[T, Q, C]``) or mean
    squared error (``y`` floating, same number of elements as ``out``): ``[T]``."""
    if y.is_floating_point():
        return (out.reshape(y.shape) - y).square().flatten(1).mean(1)
    return (out.argmax(-1) == y).to(out.dtype).flatten(1).mean(1)


class _ChunkedMetaLoss(torch.autograd.Function):
    """The meta-loss of ``T`` tasks, computed ``task_chunk`` tasks at a time with each
    chunk's graph freed before the next: forward computes every chunk's loss AND its gradients
    w.r.t. the learner's parameters (and any data that requires grad), keeps only the summed
    gradients, and backward scales them by the incoming gradient. Memory: one chunk's graph
    plus one copy of the parameters. The loss is differentiable once (no double backward)."""

    @staticmethod
    def forward(ctx, tasks_fn, spans, n_data, *tensors):
        data, T = tensors[:n_data], tensors[0].shape[0]
        need = ctx.needs_input_grad[3:]
        grads: list[Tensor | None] = [None] * len(tensors)
        losses, metrics = [], []
        for a, b in spans:
            with torch.enable_grad():
                chunk = [d[a:b].detach().requires_grad_() if need[i] else d[a:b] for i, d in enumerate(data)]
                loss_t, metric_t = tasks_fn(*chunk)
                wrt = [i for i in range(len(tensors)) if need[i]]
                inputs = [chunk[i] if i < n_data else tensors[i] for i in wrt]
                gs = torch.autograd.grad(loss_t.sum(), inputs, allow_unused=True) if inputs else ()
            for i, g in zip(wrt, gs):
                if g is None:
                    continue
                if i < n_data:
                    if grads[i] is None:
                        grads[i] = torch.zeros_like(data[i])
                    grads[i][a:b] = g
                else:
                    grads[i] = g if grads[i] is None else grads[i] + g
            losses.append(loss_t.detach())
            metrics.append(metric_t)
            del loss_t, chunk, gs
        ctx.grads = [None if g is None else g / T for g in grads]
        task_loss, task_metric_ = torch.cat(losses), torch.cat(metrics)
        ctx.mark_non_differentiable(task_loss, task_metric_)
        return task_loss.mean(), task_loss, task_metric_

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _g_task_loss, _g_task_metric):
        return (None, None, None, *[None if g is None else grad_loss * g for g in ctx.grads])


def run_meta_loss(tasks_fn, data: Sequence[Tensor], params: Sequence[Tensor], task_chunk: int | None,
                   metric_name: str) -> MetaLossResult:
    """``tasks_fn(*data_slice) -> (task_loss [t] differentiable, task_metric [t])`` over all
    tasks at once (``task_chunk`` None or ``"auto"``), or ``task_chunk`` tasks at a time (see
    :class:`_ChunkedMetaLoss`)."""
    T = data[0].shape[0]
    if task_chunk is None or task_chunk == "auto" or task_chunk >= T:
        loss_t, metric_t = tasks_fn(*data)
        return MetaLossResult(loss_t.mean(), metric_t.mean(), loss_t.detach(), metric_t, metric_name)
    spans = [(a, min(a + task_chunk, T)) for a in range(0, T, task_chunk)]
    params = [p for p in params if p.requires_grad]
    wants_grad = torch.is_grad_enabled() and (params or any(d.requires_grad for d in data))
    if not wants_grad:
        pieces = [tasks_fn(*(d[a:b] for d in data)) for a, b in spans]
        loss_t = torch.cat([p[0].detach() for p in pieces])
        metric_t = torch.cat([p[1] for p in pieces])
        return MetaLossResult(loss_t.mean(), metric_t.mean(), loss_t, metric_t, metric_name)
    loss, loss_t, metric_t = _ChunkedMetaLoss.apply(tasks_fn, spans, len(data), *data, *params)
    return MetaLossResult(loss, metric_t.mean(), loss_t, metric_t, metric_name)


def gradient_carrier(value: Tensor, params: dict[str, Tensor], grads: dict[str, Tensor]) -> Tensor:
    """Per-task losses ``[T]`` whose VALUE is ``value`` (detached) and whose gradient w.r.t.
    each shared parameter ``params[k]`` (``[*shape]``) is ``grads[k][t]`` (``[T, *shape]``,
    treated as constants): the mean over tasks then back-propagates ``mean_t grads[k][t]``.
    Reptile and iMAML compute their meta-gradients without differentiating through the inner
    loop and hand them to autograd this way, so ``loss.backward()`` and any optimiser work
    (and :func:`run_meta_loss`'s chunking sums them like any loss)."""
    value = value.detach()
    if not torch.is_grad_enabled() or not params:
        return value
    s = sum((p * grads[k].detach()).flatten(1).sum(1) for k, p in params.items())
    return value + (s - s.detach())  # s - s.detach() is exactly 0: the value is untouched
