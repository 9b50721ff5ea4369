"""``prototypes``: per-class mean of support embeddings, batched over episodes.

Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017, eq. (1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta.ops import checks, registry
from fastmeta.ops._loss import _FUSED_DTYPES, _PLAIN, call_fused, plain_call

_STEM = "prototypes"
registry.register(
    "prototypes",
    [registry.triton_backend(), registry.cpp_backend(), registry.reference_backend()],
)


def prototypes_ref(support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Plain-PyTorch prototypes (the oracle and the always-available backend).

    Twice differentiable; assumes every class has at least one example.
    """
    onehot = F.one_hot(support_labels.long(), n_way).to(support.dtype)  # [B,S,N]
    sums = torch.bmm(onehot.transpose(1, 2), support)  # [B,N,D]
    return sums / onehot.sum(1).unsqueeze(-1)


# ---- registered ops (compiled / Triton entry points behind one autograd op) -------------


@torch.library.custom_op("fastmeta::prototypes_fwd", mutates_args=())
def _prototypes_fwd(
    support: torch.Tensor, labels: torch.Tensor, n_way: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return registry.kernel(backend, _STEM, "prototypes_fwd")(support, labels, n_way)


@_prototypes_fwd.register_fake
def _(support, labels, n_way, backend):
    b, _, d = support.shape
    return support.new_empty(b, n_way, d), labels.new_empty(b, n_way, dtype=torch.long)


@torch.library.custom_op("fastmeta::prototypes_bwd", mutates_args=())
def _prototypes_bwd(
    grad_protos: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, backend: str
) -> torch.Tensor:
    return registry.kernel(backend, _STEM, "prototypes_bwd")(grad_protos, labels, counts)


@_prototypes_bwd.register_fake
def _(grad_protos, labels, counts, backend):
    b, s = labels.shape
    return grad_protos.new_empty(b, s, grad_protos.shape[-1])


def _setup(ctx, inputs, output):
    _, labels, _, backend = inputs
    ctx.save_for_backward(labels, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_protos, _grad_counts):
    labels, counts = ctx.saved_tensors
    if grad_protos is None:
        return None, None, None, None
    grad = _prototypes_bwd(grad_protos.contiguous(), labels, counts, ctx.backend)
    return grad, None, None, None


_prototypes_fwd.register_autograd(_backward, setup_context=_setup)


# ---- public function ---------------------------------------------------------------------


def prototypes(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    n_way: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Class prototypes: the mean support embedding of each class, per episode.

    Args:
        support: ``[B, S, D]`` float embeddings of the support set of B episodes.
        support_labels: ``[B, S]`` integer labels in ``[0, n_way)``; every class of every
            episode must have at least one example.
        n_way: N, the number of classes per episode.
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"`` (default: the first that
            fits, see ``fastmeta.backends()``; ``FASTMETA_BACKEND`` also forces one). In eager
            mode on CPU float32/float64 tensors the default runs the ``cpp`` kernel through one
            C++ call (``fastmeta._C.prototypes_fused``, a C++ autograd node, twice
            differentiable; no custom-op dispatch).

    Returns:
        ``[B, N, D]`` prototypes, differentiable w.r.t. ``support``.

    Raises:
        TypeError: non-float ``support``, non-integer labels.
        ValueError: shape mismatch, empty input, label out of range, a class with no
            support example, inputs on different devices.

    Example::

        >>> support = torch.randn(4, 25, 64)            # 4 episodes, 5-way 5-shot
        >>> labels = torch.arange(5).repeat_interleave(5).expand(4, 25)
        >>> fastmeta.ops.prototypes(support, labels, n_way=5).shape
        torch.Size([4, 5, 64])

    Equivalent PyTorch code::

        onehot = F.one_hot(support_labels, n_way).to(support.dtype)       # [B,S,N]
        protos = onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]
    """
    if (backend is None and type(n_way) is int and type(support) in _PLAIN and support.dtype in _FUSED_DTYPES
            and support.numel() > 0 and plain_call()):
        # one call (fastmeta._C.prototypes_fused: the cpp kernel and a C++ autograd node, no
        # custom-op dispatch; support's device and rank, the labels' dtype, shape and
        # range and every class's presence checked in C++). A call it rejects goes through the
        # checks below, which say what is wrong. (The lean pre-check: ~0.5 us of a ~6 us call.)
        out = call_fused("prototypes_fused", support, support_labels, n_way)
        if out is not None:
            return out
    checks.float_tensor("support", support, 3, "[B, S, D]")
    n_way = checks.n_way_value(n_way)
    labels = checks.label_tensor("support_labels", support_labels, support.shape[:2], "[B, S]")
    checks.same_device(support=support, support_labels=support_labels)
    b, s, d = support.shape
    checks.nonempty(B=b, S=s, D=d)
    checks.labels_in_range("support_labels", labels, n_way, "n_way")
    checks.every_class_present(labels, n_way)
    name = registry.select("prototypes", [support], backend)
    if name == "reference":
        return prototypes_ref(support, labels, n_way)
    return _prototypes_fwd(support, labels.contiguous(), n_way, name)[0]
