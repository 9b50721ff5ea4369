"""``proto_logits`` and the fused ``proto_loss``: distance to prototypes + log-softmax + NLL.

Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017, eq. (2):
``p(y=n|x) = softmax_n(-d(f(x), c_n))``. The fused loss never materialises the
``[B, Q, N, D]`` differences of the broadcast pattern, keeps only a ``[B, Q]`` log-sum-exp
for backward and recomputes the distances there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta.ops import checks, registry
from fastmeta.ops._loss import EPS, REDUCTIONS, acc_dtype, argmax_correct, call_fused, eager_cpu, learnable, nll_accuracy

_STEM = "proto_loss"
METRICS = {"sqeuclidean": 0, "cosine": 1}

# Where the C++ kernel loses to the composite ATen path on the CPU (squared Euclidean): it
# streams each query against each prototype without BLAS, so a short D (fixed costs per call
# dominate: custom-op dispatch, the Python autograd hop) or many prototypes (a GEMM's tiles win)
# favour the composite path; few prototypes with long features favour the kernel. Cosine keeps
# the kernel (its composite form, two normalisations more, measured slower in fwd+bwd). Measured
# with fwd+bwd on 1 thread: bench/results/proto_composite.md.
_CPP_MIN_D = 128
_CPP_MAX_N = 12


def _cpp_slower(query, protos=None, metric: str = "sqeuclidean", **_) -> str:
    if metric != "sqeuclidean":
        return ""
    d = query.shape[-1]
    n = protos.shape[1] if protos is not None and protos.dim() == 3 else 1
    if d < _CPP_MIN_D or n > _CPP_MAX_N:
        return (f"composite ATen is faster for sqeuclidean at D={d}, N={n} (the kernel wins at "
                f"D >= {_CPP_MIN_D} with N <= {_CPP_MAX_N}); force backend='cpp' to use it")
    return ""


# The one-call C++ entry point (fastmeta._C.proto_loss_fused: the kernel, the reduction, the
# accuracy and a C++ autograd node in one call, no custom-op dispatch) serves eager CPU calls with
# N <= 8 prototypes (the kernel's hand-written loops, faster than the ATen forms at every B, Q, D
# measured) or at most this much work B*Q*N*D (one episode: fixed per-call costs dominate, and
# the composite path pays one ATen call per step). Other calls take the registered backends (the
# kernel again through the one-call entry when automatic selection picks cpp). Measured:
# bench/results/heads.md.
_FUSED_MAX_N = 8
_FUSED_MAX_WORK = 1 << 18


def _fused_call(query, protos, labels, code, scale, reduction):
    """(loss, acc) from the one-call entry point, or None when it cannot take the call (no
    extension; inputs it rejects, which the full checks then explain)."""
    if code is None or type(reduction) is not str or reduction not in REDUCTIONS:
        return None
    return call_fused("proto_loss_fused", query, protos, labels, code, float(scale), EPS,
                      REDUCTIONS[reduction])


# proto_logits keeps the kernel at every shape (its composite form is the reference, slower in
# fwd+bwd at every shape measured); only the loss has a fewer-op composite form.
registry.register("proto_logits", [registry.triton_backend(), registry.cpp_backend(),
                                    registry.composite_backend(), registry.reference_backend()])
registry.register("proto_loss", [registry.triton_backend(), registry.cpp_backend(slower=_cpp_slower),
                                  registry.composite_backend(), registry.reference_backend()])


# ---- reference (oracle; always-available backend; twice differentiable) ------------------


def proto_logits_ref(
    query: torch.Tensor, protos: torch.Tensor, metric: str = "sqeuclidean", scale: float = 1.0,
    eps: float = EPS,
) -> torch.Tensor:
    """Plain-PyTorch logits ``[B,Q,N]``: ``-scale*||q-p||^2`` or ``scale*cos(q,p)``."""
    if metric == "cosine":
        qn = F.normalize(query, dim=-1, eps=eps)
        pn = F.normalize(protos, dim=-1, eps=eps)
        return scale * torch.bmm(qn, pn.transpose(1, 2))
    qq = (query * query).sum(-1, keepdim=True)  # [B,Q,1]
    pp = (protos * protos).sum(-1).unsqueeze(1)  # [B,1,N]
    d = torch.baddbmm(qq + pp, query, protos.transpose(1, 2), alpha=-2.0).clamp_min(0)
    return -scale * d


def proto_loss_ref(
    query: torch.Tensor, protos: torch.Tensor, query_labels: torch.Tensor,
    metric: str = "sqeuclidean", scale: float = 1.0, reduction: str = "mean", eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch ``(loss, acc)`` with the same contract as :func:`proto_loss`."""
    logits = proto_logits_ref(query, protos, metric, scale, eps)
    return nll_accuracy(logits, query_labels, reduction)


def _proto_loss_composite(query, protos, labels, metric, scale, reduction):
    """The ``composite`` backend: :func:`proto_loss_ref` in the fewest ATen ops. Squared
    Euclidean leaves each query's own ``||q||^2`` out of its logits (``2 scale q.p - scale
    ||p||^2``, one ``baddbmm``): log-softmax and argmax do not change under a per-row constant,
    so loss and accuracy are the reference's, and float32 loses no digits to cancellation
    against ``||q||^2``."""
    if metric == "cosine":
        logits = proto_logits_ref(query, protos, metric, scale)
    else:
        pp = (protos * protos).sum(-1).unsqueeze(1)  # [B,1,N]
        logits = torch.baddbmm(pp, query, protos.transpose(1, 2), beta=-scale, alpha=2.0 * scale)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction=reduction)
    correct = argmax_correct(logits, labels).to(query.dtype)
    if reduction == "none":
        return loss.view(labels.shape), correct
    return loss, correct.mean()


# ---- registered ops ------------------------------------------------------------------------


@torch.library.custom_op("fastmeta::proto_logits_fwd", mutates_args=())
def _logits_fwd(
    query: torch.Tensor, protos: torch.Tensor, metric: int, scale: float, eps: float, backend: str
) -> torch.Tensor:
    return registry.kernel(backend, _STEM, "proto_logits_fwd")(query, protos, metric, scale, eps)


@_logits_fwd.register_fake
def _(query, protos, metric, scale, eps, backend):
    return query.new_empty(query.shape[0], query.shape[1], protos.shape[1])


@torch.library.custom_op("fastmeta::proto_logits_bwd", mutates_args=())
def _logits_bwd(
    grad: torch.Tensor, query: torch.Tensor, protos: torch.Tensor, metric: int, scale: float,
    eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = registry.kernel(backend, _STEM, "proto_logits_bwd")
    return fn(grad, query, protos, metric, scale, eps)


@_logits_bwd.register_fake
def _(grad, query, protos, metric, scale, eps, backend):
    return torch.empty_like(query), torch.empty_like(protos)


def _logits_setup(ctx, inputs, output):
    query, protos, metric, scale, eps, backend = inputs
    ctx.save_for_backward(query, protos)
    ctx.args = (metric, scale, eps, backend)


def _logits_backward(ctx, grad):
    query, protos = ctx.saved_tensors
    gq, gp = _logits_bwd(grad.contiguous(), query, protos, *ctx.args)
    return gq, gp, None, None, None, None


_logits_fwd.register_autograd(_logits_backward, setup_context=_logits_setup)


@torch.library.custom_op("fastmeta::proto_loss_fwd", mutates_args=())
def _loss_fwd(
    query: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, metric: int, scale: float,
    eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = registry.kernel(backend, _STEM, "proto_loss_fwd")
    return fn(query, protos, labels, metric, scale, eps)


@_loss_fwd.register_fake
def _(query, protos, labels, metric, scale, eps, backend):
    acc = acc_dtype(query.dtype)
    b, q = labels.shape
    return query.new_empty(b, q, dtype=acc), query.new_empty(b, q, dtype=acc), labels.new_empty(b, q)


@torch.library.custom_op("fastmeta::proto_loss_bwd", mutates_args=())
def _loss_bwd(
    grad_loss: torch.Tensor, query: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor,
    lse: torch.Tensor, metric: int, scale: float, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = registry.kernel(backend, _STEM, "proto_loss_bwd")
    return fn(grad_loss, query, protos, labels, lse, metric, scale, eps)


@_loss_bwd.register_fake
def _(grad_loss, query, protos, labels, lse, metric, scale, eps, backend):
    return torch.empty_like(query), torch.empty_like(protos)


def _loss_setup(ctx, inputs, output):
    query, protos, labels, metric, scale, eps, backend = inputs
    _, lse, pred = output
    ctx.save_for_backward(query, protos, labels, lse)
    ctx.args = (metric, scale, eps, backend)
    ctx.mark_non_differentiable(lse, pred)


def _loss_backward(ctx, grad_loss, _grad_lse, _grad_pred):
    query, protos, labels, lse = ctx.saved_tensors
    grad_loss = grad_loss.to(lse.dtype).contiguous()
    gq, gp = _loss_bwd(grad_loss, query, protos, labels, lse, *ctx.args)
    return gq, gp, None, None, None, None, None


_loss_fwd.register_autograd(_loss_backward, setup_context=_loss_setup)


# ---- public functions ----------------------------------------------------------------------


def _check_pair(query, protos, metric, scale):
    checks.query_pair(query, "protos", protos, "N")
    return checks.metric_code(metric, METRICS)


def proto_logits(
    query: torch.Tensor,
    protos: torch.Tensor,
    metric: str = "sqeuclidean",
    scale: float | torch.Tensor = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Logits of every query against every prototype, batched over episodes.

    Args:
        query: ``[B, Q, D]`` query embeddings.
        protos: ``[B, N, D]`` class prototypes (e.g. from :func:`fastmeta.ops.prototypes`).
        metric: ``"sqeuclidean"`` (logit ``-scale * ||q - p||^2``, Snell et al.) or
            ``"cosine"`` (logit ``scale * cos(q, p)``, each vector divided by
            ``max(||x||, 1e-8)`` so a zero vector has similarity 0).
        scale: temperature multiplying the logits; a float, or a scalar tensor that may
            require grad (a learned temperature; then the scaling runs outside the kernel).
        backend: force ``"triton"``, ``"cpp"``, ``"composite"`` or ``"reference"`` (default:
            the fastest for the device and shape, ``fastmeta.backends()``).

    Returns:
        ``[B, Q, N]`` logits in the dtype of ``query``, differentiable w.r.t. ``query``
        and ``protos`` (once; use ``backend="reference"`` for double backward).

    Example::

        >>> logits = fastmeta.ops.proto_logits(torch.randn(2, 15, 64), torch.randn(2, 5, 64))
        >>> logits.shape
        torch.Size([2, 15, 5])

    Equivalent PyTorch code::

        logits = -scale * torch.cdist(query, protos) ** 2                     # sqeuclidean
        logits = scale * F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).mT   # cosine
    """
    code = _check_pair(query, protos, metric, 1.0)
    if learnable(scale):
        return scale * proto_logits(query, protos, metric, 1.0, backend=backend)
    scale = checks.scalar("scale", scale)
    name = registry.select("proto_logits", [query, protos], backend, metric=metric)
    if name in ("reference", "composite"):  # the reference is already the fewest-op form
        return proto_logits_ref(query, protos, metric, scale)
    return _logits_fwd(query, protos, code, scale, EPS, name)


def proto_loss(
    query: torch.Tensor,
    protos: torch.Tensor,
    query_labels: torch.Tensor,
    metric: str = "sqeuclidean",
    scale: float | torch.Tensor = 1.0,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused prototypical loss: distance + log-softmax + NLL (+ accuracy) in one pass.

    Forward memory beyond the inputs is O(B*Q): the ``[B, Q, N]`` logits are never stored
    (backward recomputes them) and ``[B, Q, N, D]`` never exists. Stable for any N >= 1 and
    distances of any size (log-sum-exp is max-subtracted).

    Args:
        query: ``[B, Q, D]`` query embeddings.
        protos: ``[B, N, D]`` class prototypes.
        query_labels: ``[B, Q]`` integer labels in ``[0, N)``.
        metric: ``"sqeuclidean"`` or ``"cosine"`` (see :func:`proto_logits`).
        scale: logit temperature (float, or a scalar tensor that may require grad).
        reduction: ``"mean"`` (over all B*Q queries), ``"sum"`` or ``"none"``.
        backend: force ``"triton"``, ``"cpp"``, ``"composite"`` or ``"reference"`` (default:
            the fastest for the device and shape, ``fastmeta.backends()``). Automatic
            selection in eager mode on CPU float32/float64 tensors with a float ``scale`` runs
            the ``cpp`` kernel through one C++ call (``fastmeta._C.proto_loss_fused``: kernel,
            reduction, accuracy and a C++ autograd node) when N <= 8, when the call is small
            (B*Q*N*D <= 2**18, e.g. one episode) or when it picks ``cpp``: no custom-op
            dispatch, no Python autograd node; its backward is twice differentiable (under
            ``create_graph=True`` it differentiates the reference formula).

    Returns:
        ``(loss, acc)``: ``loss`` a scalar (``[B, Q]`` for ``reduction="none"``) in the
        dtype of ``query``; ``acc`` the fraction of queries whose nearest prototype is
        their label (``[B, Q]`` 0/1 values for ``"none"``), without gradient.

    Example::

        >>> protos = fastmeta.ops.prototypes(support, support_labels, n_way=5)
        >>> loss, acc = fastmeta.ops.proto_loss(query, protos, query_labels)
        >>> loss.backward()

    Equivalent PyTorch code::

        logits = -scale * torch.cdist(query, protos) ** 2
        loss = F.cross_entropy(logits.flatten(0, 1), query_labels.flatten(), reduction=reduction)
        acc = (logits.argmax(-1) == query_labels).float().mean()
    """
    if backend is None and eager_cpu(query, protos, scale) and type(metric) is str:
        # one call: shapes, label dtype and range, devices and scale checked in C++
        n = protos.shape[1]
        if n <= _FUSED_MAX_N or query.shape[0] * query.shape[1] * n * query.shape[2] <= _FUSED_MAX_WORK:
            out = _fused_call(query, protos, query_labels, METRICS.get(metric), scale, reduction)
            if out is not None:
                return out
    code = _check_pair(query, protos, metric, 1.0)
    reduction = checks.reduction_value(reduction)
    labels = checks.label_tensor("query_labels", query_labels, query.shape[:2], "[B, Q]")
    checks.same_device(query=query, query_labels=query_labels)
    checks.labels_in_range("query_labels", labels, protos.shape[1], "N, the number of prototypes")
    if learnable(scale):
        logits = proto_logits(query, protos, metric, scale, backend=backend)
        return nll_accuracy(logits, labels, reduction)
    scale = checks.scalar("scale", scale)
    name = registry.select("proto_loss", [query, protos], backend, metric=metric)
    if name == "composite":
        return _proto_loss_composite(query, protos, labels, metric, scale, reduction)
    if name == "reference":
        return proto_loss_ref(query, protos, labels, metric, scale, reduction)
    if name == "cpp" and backend is None and eager_cpu(query, protos, scale):
        out = _fused_call(query, protos, labels, code, scale, reduction)
        if out is not None:
            return out
    rows, _lse, pred = _loss_fwd(query, protos, labels.contiguous(), code, scale, EPS, name)
    correct = (pred == labels).to(query.dtype)
    if reduction == "none":
        return rows.to(query.dtype), correct
    loss = rows.mean() if reduction == "mean" else rows.sum()
    return loss.to(query.dtype), correct.mean()
