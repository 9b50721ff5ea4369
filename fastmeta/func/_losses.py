"""task_losses: each task's mean loss of a task-batched output, in one call where possible."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

# Losses whose reduction="mean" is the plain mean of reduction="none" (no class weights).
_ELEMENTWISE_FNS = {
    F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
    F.binary_cross_entropy_with_logits, F.soft_margin_loss,
}
_CLASS_FNS = {F.cross_entropy, F.nll_loss}  # mean divides by the number of non-ignored targets
_ELEMENTWISE_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.SoftMarginLoss)


def _module_none(m: nn.Module):
    """(callable(out, y) -> unreduced loss, ignore_index or None) for a supported loss module."""
    if getattr(m, "reduction", None) != "mean":
        return None
    if type(m) in _ELEMENTWISE_MODULES:
        kw = {"beta": m.beta} if isinstance(m, nn.SmoothL1Loss) else {}
        if isinstance(m, nn.HuberLoss):
            kw = {"delta": m.delta}
        fn = {nn.MSELoss: F.mse_loss, nn.L1Loss: F.l1_loss, nn.SmoothL1Loss: F.smooth_l1_loss,
              nn.HuberLoss: F.huber_loss, nn.SoftMarginLoss: F.soft_margin_loss}[type(m)]
        return functools.partial(fn, reduction="none", **kw), None
    if type(m) is nn.BCEWithLogitsLoss and m.weight is None:
        return functools.partial(F.binary_cross_entropy_with_logits, pos_weight=m.pos_weight, reduction="none"), None
    if type(m) is nn.CrossEntropyLoss and m.weight is None:
        return functools.partial(F.cross_entropy, ignore_index=m.ignore_index, label_smoothing=m.label_smoothing,
                                 reduction="none"), m.ignore_index
    if type(m) is nn.NLLLoss and m.weight is None:
        return functools.partial(F.nll_loss, ignore_index=m.ignore_index, reduction="none"), m.ignore_index
    return None


def _fast(loss_fn):
    """How to get an unreduced loss from ``loss_fn`` (or None: use the per-task loop)."""
    if loss_fn in _ELEMENTWISE_FNS:
        return functools.partial(loss_fn, reduction="none"), None
    if loss_fn in _CLASS_FNS:
        return functools.partial(loss_fn, reduction="none"), -100
    if isinstance(loss_fn, nn.Module):
        return _module_none(loss_fn)
    if isinstance(loss_fn, functools.partial):
        kw = loss_fn.keywords or {}
        if "reduction" in kw or kw.get("weight") is not None or loss_fn.args:
            return None
        if loss_fn.func in _ELEMENTWISE_FNS:
            return functools.partial(loss_fn, reduction="none"), None
        if loss_fn.func in _CLASS_FNS:
            return functools.partial(loss_fn, reduction="none"), kw.get("ignore_index", -100)
        return None
    # Any other callable with a `reduction` keyword: trust that "mean" == mean of "none".
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return None
    if "reduction" in sig.parameters:
        return functools.partial(loss_fn, reduction="none"), None
    return None


def task_losses(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-task mean loss ``[T]`` of a task-batched output.

    Args:
        loss_fn: a loss with PyTorch's conventions, e.g. ``F.cross_entropy``, ``F.mse_loss``,
            an ``nn`` loss module, or any ``loss_fn(out_t, y_t) -> scalar``.
        out: ``[T, N, *out]`` model outputs (e.g. logits ``[T, N, C]``).
        y: ``[T, N, *]`` targets (class indices ``[T, N]`` for cross-entropy).

    Returns ``[T]``: ``losses[t] == loss_fn(out[t], y[t])``. Fast path (one call over all
    tasks) for F.cross_entropy / F.nll_loss (ignore_index honoured), the elementwise losses
    (mse, l1, smooth_l1, huber, BCE, BCE-with-logits, soft-margin), their nn modules with
    ``reduction="mean"`` and no class weights, partials of these, and any callable taking
    ``reduction=`` (assumed: mean == mean of "none"); other losses run a per-task loop.

    Equivalent PyTorch code::

        torch.stack([loss_fn(out[t], y[t]) for t in range(T)])
    """
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"out and y must be tensors, got {type(out).__name__} and {type(y).__name__}")
    if out.dim() < 2 or y.dim() < 1:
        raise ValueError(f"out must have shape [T, N, *out] and y [T, N, *], got {tuple(out.shape)} and {tuple(y.shape)}")
    if y.shape[0] != out.shape[0]:
        raise ValueError(f"out and y must have the same number of tasks T: out {tuple(out.shape)}, y {tuple(y.shape)}")
    T = out.shape[0]
    fast = _fast(loss_fn)
    if fast is not None and y.dim() >= 2 and y.shape[1] == out.shape[1]:
        fn, ignore_index = fast
        per = fn(out.flatten(0, 1), y.flatten(0, 1)).reshape(T, -1)
        if ignore_index is not None and not y.is_floating_point():
            count = (y != ignore_index).reshape(T, -1).sum(1)
            return per.sum(1) / count.to(per.dtype)
        return per.mean(1)
    return torch.stack([loss_fn(out[t], y[t]) for t in range(T)])
