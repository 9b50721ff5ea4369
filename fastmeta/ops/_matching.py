"""``matching_attention`` and the fused ``matching_loss``: Matching Networks' attention head.

Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016, eq. (1)-(2):
``a(x, x_s) = softmax_s(scale * cos(f(x), g(x_s)))`` and ``P(y=n|x) = sum_{s: y_s = n} a(x, x_s)``
(attention whose values are the one-hot support labels). Computed flash-style: the softmax
over the support set and the per-class sums are taken row by row (tile by tile), in log space
(``log P[n] = logsumexp_{s in n}(l_s) - logsumexp_s(l_s)``), so a class with numerically zero
attention still gets a finite log-probability. Neither ``[B, Q, S]`` nor ``[B, Q, S, N]`` is kept
for backward: only the ``[B, Q, N]`` output (or the ``[B, Q]`` loss) and a ``[B, Q]`` log-sum-exp;
backward recomputes the similarities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta.ops import checks, registry
from fastmeta.ops._loss import EPS, REDUCTIONS, acc_dtype, call_fused, eager_cpu, learnable, nll_accuracy

_STEM = "matching"

_BACKENDS = [registry.triton_backend(), registry.cpp_backend(), registry.reference_backend()]
registry.register("matching_attention", _BACKENDS)
registry.register("matching_loss", _BACKENDS)


# ---- reference (oracle; always-available backend; twice differentiable) ------------------


def matching_attention_ref(
    query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
    scale: float | torch.Tensor = 1.0, eps: float = EPS,
) -> torch.Tensor:
    """Plain-PyTorch log-probabilities ``[B,Q,N]`` with the same contract as
    :func:`matching_attention`. Memory O(B*Q*S): the per-class log-sum-exp is a scatter over
    the support axis, not a ``[B,Q,S,N]`` one-hot product."""
    qn = F.normalize(query, dim=-1, eps=eps)
    sn = F.normalize(support, dim=-1, eps=eps)
    logits = scale * torch.bmm(qn, sn.transpose(1, 2))  # [B,Q,S]
    B, Q, S = logits.shape
    idx = support_labels.long()[:, None, :].expand(B, Q, S)
    # Per-class max (a constant shift: logsumexp does not depend on it, so it is detached).
    cmax = logits.new_full((B, Q, n_way), float("-inf")).scatter_reduce(
        -1, idx, logits.detach(), "amax", include_self=True
    )
    cmax = torch.where(torch.isfinite(cmax), cmax, torch.zeros_like(cmax))
    sums = logits.new_zeros(B, Q, n_way).scatter_add(-1, idx, torch.exp(logits - cmax.gather(-1, idx)))
    lse_class = cmax + torch.log(sums)
    return lse_class - torch.logsumexp(lse_class, dim=-1, keepdim=True)


def matching_loss_ref(
    query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
    query_labels: torch.Tensor, scale: float | torch.Tensor = 1.0,
    reduction: str = "mean", eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch ``(loss, acc)`` with the same contract as :func:`matching_loss`."""
    logp = matching_attention_ref(query, support, support_labels, n_way, scale, eps)
    return nll_accuracy(logp, query_labels, reduction, log_probs=True)


# ---- registered ops ------------------------------------------------------------------------


@torch.library.custom_op("fastmeta::matching_fwd", mutates_args=())
def _attn_fwd(
    query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
    scale: float, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = registry.kernel(backend, _STEM, "matching_fwd")
    return fn(query, support, support_labels, n_way, scale, eps)


@_attn_fwd.register_fake
def _(query, support, support_labels, n_way, scale, eps, backend):
    acc = acc_dtype(query.dtype)
    b, q = query.shape[0], query.shape[1]
    return query.new_empty(b, q, n_way, dtype=acc), query.new_empty(b, q, dtype=acc)


@torch.library.custom_op("fastmeta::matching_bwd", mutates_args=())
def _attn_bwd(
    grad_logp: torch.Tensor, query: torch.Tensor, support: torch.Tensor,
    support_labels: torch.Tensor, logp: torch.Tensor, lse: torch.Tensor, n_way: int,
    scale: float, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = registry.kernel(backend, _STEM, "matching_bwd")
    return fn(grad_logp, query, support, support_labels, logp, lse, n_way, scale, eps)


@_attn_bwd.register_fake
def _(grad_logp, query, support, support_labels, logp, lse, n_way, scale, eps, backend):
    return torch.empty_like(query), torch.empty_like(support)


def _attn_setup(ctx, inputs, output):
    query, support, labels, n_way, scale, eps, backend = inputs
    logp, lse = output
    ctx.save_for_backward(query, support, labels, logp, lse)
    ctx.args = (n_way, scale, eps, backend)
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, grad_logp, _grad_lse):
    query, support, labels, logp, lse = ctx.saved_tensors
    grad_logp = grad_logp.to(logp.dtype).contiguous()
    gq, gs = _attn_bwd(grad_logp, query, support, labels, logp, lse, *ctx.args)
    return gq, gs, None, None, None, None, None


_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


@torch.library.custom_op("fastmeta::matching_loss_fwd", mutates_args=())
def _loss_fwd(
    query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor,
    query_labels: torch.Tensor, n_way: int, scale: float, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = registry.kernel(backend, _STEM, "matching_loss_fwd")
    return fn(query, support, support_labels, query_labels, n_way, scale, eps)


@_loss_fwd.register_fake
def _(query, support, support_labels, query_labels, n_way, scale, eps, backend):
    acc = acc_dtype(query.dtype)
    b, q = query_labels.shape
    return (query.new_empty(b, q, dtype=acc), query.new_empty(b, q, dtype=acc),
            query_labels.new_empty(b, q))


@torch.library.custom_op("fastmeta::matching_loss_bwd", mutates_args=())
def _loss_bwd(
    grad_loss: torch.Tensor, query: torch.Tensor, support: torch.Tensor,
    support_labels: torch.Tensor, query_labels: torch.Tensor, loss: torch.Tensor,
    lse: torch.Tensor, n_way: int, scale: float, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = registry.kernel(backend, _STEM, "matching_loss_bwd")
    return fn(grad_loss, query, support, support_labels, query_labels, loss, lse, n_way, scale, eps)


@_loss_bwd.register_fake
def _(grad_loss, query, support, support_labels, query_labels, loss, lse, n_way, scale, eps, backend):
    return torch.empty_like(query), torch.empty_like(support)


def _loss_setup(ctx, inputs, output):
    query, support, slabels, qlabels, n_way, scale, eps, backend = inputs
    loss, lse, pred = output
    ctx.save_for_backward(query, support, slabels, qlabels, loss, lse)
    ctx.args = (n_way, scale, eps, backend)
    ctx.mark_non_differentiable(lse, pred)


def _loss_backward(ctx, grad_loss, _grad_lse, _grad_pred):
    query, support, slabels, qlabels, loss, lse = ctx.saved_tensors
    grad_loss = grad_loss.to(lse.dtype).contiguous()
    gq, gs = _loss_bwd(grad_loss, query, support, slabels, qlabels, loss.detach(), lse, *ctx.args)
    return gq, gs, None, None, None, None, None, None


_loss_fwd.register_autograd(_loss_backward, setup_context=_loss_setup)


# ---- public functions ----------------------------------------------------------------------


def _fused_call(query, support, support_labels, n_way, query_labels, scale, reduction):
    """(loss, acc) from the one-call C++ entry point (fastmeta._C.matching_loss_fused: the
    cpp kernel, the reduction, the accuracy and a C++ autograd node in one call, no custom-op
    dispatch; it checks shapes, labels, their ranges, the classes' presence, devices and scale),
    or None when it cannot take the call (no extension; inputs it rejects, which the full checks
    then explain). Faster than the registered op at every shape (one episode: 2-4x)."""
    if reduction not in REDUCTIONS or type(n_way) is not int:
        return None
    return call_fused("matching_loss_fused", query, support, support_labels, query_labels, n_way,
                      float(scale), EPS, REDUCTIONS[reduction])


def _check_inputs(query, support, support_labels, n_way):
    checks.query_pair(query, "support", support, "S")
    n_way = checks.n_way_value(n_way)
    labels = checks.label_tensor("support_labels", support_labels, support.shape[:2], "[B, S]")
    checks.same_device(query=query, support_labels=support_labels)
    checks.labels_in_range("support_labels", labels, n_way, "n_way")
    # A class without support examples would get log-probability -inf (and an infinite NLL):
    # Matching Networks episodes always have K >= 1 examples per class, so it is an error.
    checks.every_class_present(labels, n_way)
    return labels.contiguous(), n_way


def matching_attention(
    query: torch.Tensor,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    n_way: int,
    scale: float | torch.Tensor = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Matching Networks class log-probabilities: cosine attention over the support set,
    summed per class (Vinyals et al. 2016, eq. 1-2), batched over episodes.

    ``a[b,q,s] = softmax_s(scale * cos(query[b,q], support[b,s]))`` and
    ``out[b,q,n] = log sum_{s: support_labels[b,s] = n} a[b,q,s]``, computed in log space
    (per-class log-sum-exp minus the total): finite for every class, however small its
    attention. Forward memory beyond the inputs is O(B*Q*N); the ``[B,Q,S]`` attention is
    recomputed in backward, never stored.

    Args:
        query: ``[B, Q, D]`` query embeddings (``f(x)``).
        support: ``[B, S, D]`` support embeddings (``g(x_s)``), S >= 1.
        support_labels: ``[B, S]`` integer labels in ``[0, n_way)``; every class of every
            episode needs at least one support example (else ``ValueError``: its
            log-probability would be -inf).
        n_way: N, the number of classes per episode.
        scale: inverse softmax temperature multiplying the cosine. A float, or a scalar tensor;
            one that requires grad (a learned temperature) runs the reference backend.
            Cosine divides each vector by ``max(||x||, 1e-8)``: a zero-norm embedding has
            similarity 0 with everything.
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns:
        ``[B, Q, N]`` log-probabilities in the dtype of ``query``, differentiable w.r.t.
        ``query`` and ``support`` (once; ``backend="reference"`` for double backward).

    Example::

        >>> q, s = torch.randn(2, 15, 64), torch.randn(2, 5, 64)
        >>> y = torch.arange(5).repeat(2, 1)
        >>> fastmeta.ops.matching_attention(q, s, y, n_way=5).shape
        torch.Size([2, 15, 5])

    Equivalent PyTorch code::

        attn = torch.softmax(scale * F.normalize(query, dim=-1)
                             @ F.normalize(support, dim=-1).mT, dim=-1)   # [B,Q,S]
        out = torch.log(attn @ F.one_hot(support_labels, n_way).to(attn))  # [B,Q,N]
        # (the op computes the same in log space, so no entry underflows to -inf)
    """
    labels, n_way = _check_inputs(query, support, support_labels, n_way)
    if learnable(scale):
        return matching_attention_ref(query, support, labels, n_way, scale)
    scale = checks.scalar("scale", scale)
    name = registry.select("matching_attention", [query, support], backend)
    if name == "reference":
        return matching_attention_ref(query, support, labels, n_way, scale)
    logp, _lse = _attn_fwd(query, support, labels, n_way, scale, EPS, name)
    return logp.to(query.dtype)


def matching_loss(
    query: torch.Tensor,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    n_way: int,
    query_labels: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Matching Networks loss: :func:`matching_attention` + NLL (+ accuracy).

    Forward memory beyond the inputs is O(B*Q): neither the ``[B,Q,S]`` attention nor the
    ``[B,Q,N]`` log-probabilities are stored; backward recomputes the similarities.

    Args:
        query: ``[B, Q, D]`` query embeddings.
        support: ``[B, S, D]`` support embeddings.
        support_labels: ``[B, S]`` integer labels in ``[0, n_way)``, every class present.
        n_way: N, the number of classes per episode.
        query_labels: ``[B, Q]`` integer labels in ``[0, n_way)``.
        scale: inverse temperature of the attention softmax (see :func:`matching_attention`).
        reduction: ``"mean"`` (over all B*Q queries), ``"sum"`` or ``"none"``.
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"``. Automatic selection in
            eager mode on CPU float32/float64 tensors with a float ``scale`` runs the ``cpp``
            kernel through one C++ call (``fastmeta._C.matching_loss_fused``: kernel,
            reduction, accuracy and a C++ autograd node; no custom-op dispatch); its backward
            is twice differentiable (under ``create_graph=True`` it differentiates the
            reference formula).

    Returns:
        ``(loss, acc)``: ``loss`` a scalar (``[B, Q]`` for ``reduction="none"``) in the dtype
        of ``query``; ``acc`` the fraction of queries whose most probable class is their
        label (``[B, Q]`` 0/1 values for ``"none"``), without gradient.

    Example::

        >>> loss, acc = fastmeta.ops.matching_loss(q, s, support_labels, 5, query_labels)
        >>> loss.backward()

    Equivalent PyTorch code::

        logp = matching_attention(query, support, support_labels, n_way, scale)
        loss = F.nll_loss(logp.flatten(0, 1), query_labels.flatten(), reduction=reduction)
        acc = (logp.argmax(-1) == query_labels).float().mean()
    """
    if backend is None and eager_cpu(query, support, scale) and type(reduction) is str:
        out = _fused_call(query, support, support_labels, n_way, query_labels, scale, reduction)
        if out is not None:
            return out
    labels, n_way = _check_inputs(query, support, support_labels, n_way)
    reduction = checks.reduction_value(reduction)
    qlabels = checks.label_tensor("query_labels", query_labels, query.shape[:2], "[B, Q]")
    checks.same_device(query=query, query_labels=query_labels)
    checks.labels_in_range("query_labels", qlabels, n_way, "n_way")
    if learnable(scale):
        return matching_loss_ref(query, support, labels, n_way, qlabels, scale, reduction)
    scale = checks.scalar("scale", scale)
    name = registry.select("matching_loss", [query, support], backend)
    if name == "reference":
        return matching_loss_ref(query, support, labels, n_way, qlabels, scale, reduction)
    rows, _lse, pred = _loss_fwd(query, support, labels, qlabels.contiguous(), n_way, scale, EPS, name)
    correct = (pred == qlabels).to(query.dtype)
    if reduction == "none":
        return rows.to(query.dtype), correct
    loss = rows.mean() if reduction == "mean" else rows.sum()
    return loss.to(query.dtype), correct.mean()
