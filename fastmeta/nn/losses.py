"""Few-shot losses as ``nn.Module``s over the fused ops (as Liger-Kernel offers its losses).

* :class:`ProtoLoss`: Prototypical Networks' loss (Snell, Swersky & Zemel, "Prototypical
  Networks for Few-shot Learning", NeurIPS 2017) -- :func:`fastmeta.ops.proto_loss`.
* :class:`MatchingLoss`: Matching Networks' loss (Vinyals et al., "Matching Networks for One
  Shot Learning", NeurIPS 2016) -- :func:`fastmeta.ops.matching_loss`.

A module holds the settings (metric, temperature, reduction, forced backend) and, with
``learn_scale=True``, the temperature as a parameter; ``forward`` is the op with those
settings, and returns what the op returns: ``(loss, acc)``. Inputs are validated by the op.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastmeta import ops

_REDUCTIONS = ("mean", "sum", "none")


def _scale_value(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    return float(scale)


def _reduction_value(reduction) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def _backend_value(backend):
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    return backend


class _ScaledLoss(nn.Module):
    """Holds ``scale`` (a float, or a learned ``nn.Parameter``), ``reduction`` and ``backend``."""

    def __init__(self, scale: float, learn_scale: bool, reduction: str, backend: str | None):
        super().__init__()
        scale = _scale_value(scale)
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(scale))
        else:
            self.scale = scale
        self.reduction = _reduction_value(reduction)
        self.backend = _backend_value(backend)

    def _extra(self) -> str:
        learned = isinstance(self.scale, nn.Parameter)
        scale = f"{self.scale.item():g} (learned)" if learned else f"{self.scale:g}"
        forced = "" if self.backend is None else f", backend={self.backend!r}"
        return f"scale={scale}, reduction={self.reduction!r}{forced}"


class ProtoLoss(_ScaledLoss):
    """Prototypical loss: distance to each class prototype + log-softmax + NLL (+ accuracy).

    ``forward(query [B, Q, D], protos [B, N, D], query_labels [B, Q]) -> (loss, acc)`` is
    :func:`fastmeta.ops.proto_loss` with this module's settings: fused, the ``[B, Q, N, D]``
    differences never materialised.

    Args:
        metric: ``"sqeuclidean"`` (logits ``-scale * ||q - p||^2``, the paper) or ``"cosine"``
            (``scale * cos(q, p)``).
        scale: logit temperature, a finite float > 0.
        learn_scale: make ``scale`` an ``nn.Parameter`` (trained with the model; useful with
            the cosine metric). The op then runs its differentiable reference path.
        reduction: ``"mean"`` (over all B*Q queries), ``"sum"`` or ``"none"`` (``[B, Q]``).
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"`` (default: the registry's
            choice, see :func:`fastmeta.backends`).

    Returns (from ``forward``): ``loss``, a scalar (``[B, Q]`` for ``"none"``) in the dtype of
    ``query``; ``acc``, the fraction of queries whose nearest prototype is their label
    (``[B, Q]`` 0/1 values for ``"none"``), without gradient.

    Raises: ``ValueError``/``TypeError`` naming the argument for a bad setting here, and
    from the op for bad inputs (shapes, dtypes, labels out of range).

    Example::

        >>> loss_fn = fastmeta.nn.ProtoLoss()
        >>> protos = fastmeta.ops.prototypes(support, support_labels, n_way=5)   # [B, 5, D]
        >>> loss, acc = loss_fn(query, protos, query_labels)
        >>> loss.backward()
    """

    def __init__(self, metric: str = "sqeuclidean", scale: float = 1.0, learn_scale: bool = False,
                 reduction: str = "mean", backend: str | None = None):
        if metric not in ops.PROTO_METRICS:
            raise ValueError(f"metric must be one of {sorted(ops.PROTO_METRICS)}, got {metric!r}")
        super().__init__(scale, learn_scale, reduction, backend)
        self.metric = metric

    def forward(self, query: torch.Tensor, protos: torch.Tensor,
                query_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.proto_loss(query, protos, query_labels, self.metric, self.scale, self.reduction,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, {self._extra()}"


class MatchingLoss(_ScaledLoss):
    """Matching Networks loss: softmax-over-support cosine attention, summed per class, + NLL
    (+ accuracy).

    ``forward(query [B, Q, D], support [B, S, D], support_labels [B, S], n_way, query_labels
    [B, Q]) -> (loss, acc)`` is :func:`fastmeta.ops.matching_loss` with this module's settings
    (arguments in the op's order): fused, the ``[B, Q, S]`` attention never stored.

    Args:
        scale: inverse temperature of the cosine similarities before the softmax over the
            support, a finite float > 0 (the paper has none, i.e. 1; cosines lie in
            ``[-1, 1]``, so a larger value such as 10 sharpens the attention).
        learn_scale: make ``scale`` an ``nn.Parameter``; the op then runs its differentiable
            reference path.
        reduction: ``"mean"`` (over all B*Q queries), ``"sum"`` or ``"none"`` (``[B, Q]``).
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns (from ``forward``): ``loss``, a scalar (``[B, Q]`` for ``"none"``) in the dtype of
    ``query``; ``acc``, the fraction of queries whose most probable class is their label
    (``[B, Q]`` 0/1 values for ``"none"``), without gradient.

    Raises: ``ValueError``/``TypeError`` naming the argument for a bad setting here, and
    from the op for bad inputs (shapes, a class with no support example, labels out of range).

    Example::

        >>> loss_fn = fastmeta.nn.MatchingLoss(scale=10.0)
        >>> loss, acc = loss_fn(query, support, support_labels, 5, query_labels)
        >>> loss.backward()
    """

    def __init__(self, scale: float = 1.0, learn_scale: bool = False, reduction: str = "mean",
                 backend: str | None = None):
        super().__init__(scale, learn_scale, reduction, backend)

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor,
                n_way: int, query_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.matching_loss(query, support, support_labels, n_way, query_labels, self.scale,
                                 self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return self._extra()
