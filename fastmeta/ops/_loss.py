"""What the classification-head ops share: the cosine eps, the accumulation dtype of their
per-row statistics, whether a scale is learned, and negative log-likelihood + accuracy from
class scores (used by the op references and by learners whose logits come from ordinary
layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta.ops import checks

EPS = 1e-8  # cosine: x / max(||x||, EPS), as F.normalize; zero vectors get zero similarity


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-row loss / log-sum-exp outputs: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def learnable(scale) -> bool:
    """A scale tensor that requires grad (the fused kernels take a fixed float scale)."""
    return isinstance(scale, torch.Tensor) and scale.requires_grad


def nll_accuracy(scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                 log_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, acc)`` of class scores ``[B, Q, N]`` against integer ``labels`` ``[B, Q]``.

    ``scores`` are logits (cross-entropy), or log-probabilities with ``log_probs=True``
    (NLL). ``reduction="none"`` gives per-query ``[B, Q]`` losses and 0/1 correctness in the
    dtype of ``scores``; otherwise the reduced loss and the mean accuracy (no gradient).

    Equivalent PyTorch code::

        loss = F.cross_entropy(scores.flatten(0, 1), labels.flatten(), reduction=reduction)
        acc = (scores.argmax(-1) == labels).float().mean()
    """
    reduction = checks.reduction_value(reduction)
    labels = labels.long()
    loss_fn = F.nll_loss if log_probs else F.cross_entropy
    loss = loss_fn(scores.flatten(0, 1), labels.flatten(), reduction=reduction)
    correct = (scores.detach().argmax(-1) == labels).to(scores.dtype)
    if reduction == "none":
        return loss.view(labels.shape), correct
    return loss, correct.mean()
