"""What the classification-head ops share: the cosine eps, the accumulation dtype of their
per-row statistics, whether a scale is learned, and negative log-likelihood + accuracy from
class scores (used by the op references and by learners whose logits come from ordinary
layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta import _ext
from fastmeta.ops import checks, registry

EPS = 1e-8  # cosine: x / max(||x||, EPS), as F.normalize; zero vectors get zero similarity
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}  # codes of the fused entry points

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_FUSED_DTYPES = (torch.float32, torch.float64)


def call_fused(name: str, *args):
    """``fastmeta._C.<name>(*args)`` -- a one-call head op (csrc/cpu/heads_fused.cpp: kernel,
    reduction, accuracy and a C++ autograd node) -- or None when the extension lacks it or the
    C++ side rejects the inputs; the caller's full checks then say what is wrong."""
    fn = _ext.entry(name)
    if fn is None:
        return None
    try:
        return fn(*args)
    except (RuntimeError, TypeError):
        return None


def eager_cpu(x: torch.Tensor, other: torch.Tensor, scale) -> bool:
    """True when a head loss may take its one-call C++ entry point: ``x`` and ``other`` plain
    (no subclass) non-empty 3-D float32/float64 CPU tensors of one dtype, a python-number
    ``scale``, and :func:`plain_call`. O(1), no tensor ops (under 1 us): everything else
    (shapes, labels, their range, devices) is checked by the C++ side, and a call it rejects is
    re-run through the full checks, which say what is wrong."""
    return (
        type(x) in _PLAIN and type(other) in _PLAIN
        and x.dtype in _FUSED_DTYPES and other.dtype is x.dtype
        and x.dim() == 3 and other.dim() == 3
        and x.is_cpu and x.numel() > 0 and other.numel() > 0
        and (type(scale) is float or type(scale) is int)
        and plain_call()
    )


def plain_call() -> bool:
    """No backend forced through ``FASTMETA_BACKEND`` and nothing tracing or transforming the
    call (functorch transforms, torch function or dispatch modes, torch.compile)."""
    # is_compiling() first: under torch.compile it is a constant True and dynamo never traces
    # the other calls (which it cannot put into a graph)
    return not (torch.compiler.is_compiling() or registry.env_backend()
                or torch._C._are_functorch_transforms_active() or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack())


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-row loss / log-sum-exp outputs: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def learnable(scale) -> bool:
    """A scale tensor that requires grad (the fused kernels take a fixed float scale)."""
    return isinstance(scale, torch.Tensor) and scale.requires_grad


def argmax_correct(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1) == labels`` (the first maximum; a NaN is the maximum) in the dtype of
    ``scores``, no gradient. One C++ pass (``fastmeta._C.argmax_correct``) for eager CPU float
    tensors: ATen's strided max over a short class dimension was a quarter of the composite
    proto_loss (137 of ~500 us at 32 episodes x 100 queries x 20 classes, 1 thread)."""
    if (type(scores) in _PLAIN and scores.is_cpu and scores.dtype in _FUSED_DTYPES
            and labels.dtype == torch.long and plain_call()):
        out = call_fused("argmax_correct", scores, labels)
        if out is not None:
            return out
    return (scores.detach().max(-1).indices == labels).to(scores.dtype)


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
    correct = argmax_correct(scores, labels)
    if reduction == "none":
        return loss.view(labels.shape), correct
    return loss, correct.mean()
