"""Drop-in replacements for helpers found in public Prototypical Network code.

Swap the import, keep the call: ``from fastmeta.compat import euclidean_dist,
prototypical_loss``. Both run on the fused ops (``fastmeta.ops``) and keep the device of
their inputs (the originals copy everything to the CPU).
"""

from __future__ import annotations

import torch

from fastmeta.ops import proto_logits, proto_loss, prototypes


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance between every row of ``x`` ``[N, D]`` and ``y`` ``[M, D]``.

    Returns ``[N, M]``. Same contract as ``euclidean_dist`` in the reference ProtoNet
    implementations, without materialising the ``[N, M, D]`` broadcast.

    Equivalent PyTorch code::

        ((x[:, None, :] - y[None, :, :]) ** 2).sum(2)
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("euclidean_dist expects two tensors [N, D] and [M, D]")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"euclidean_dist expects x [N, D] and y [M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: x has D={x.shape[1]}, y has D={y.shape[1]}")
    return -proto_logits(x.unsqueeze(0), y.unsqueeze(0), "sqeuclidean", 1.0)[0]


def prototypical_loss(
    input: torch.Tensor, target: torch.Tensor, n_support: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy of one episode given flat embeddings and class ids.

    Args:
        input: ``[n_samples, D]`` embeddings of one episode (support and query mixed).
        target: ``[n_samples]`` class ids (any integers); every class must appear the same
            number of times. The first ``n_support`` examples of each class (in order of
            appearance) are its support set, the rest its queries.
        n_support: support examples per class.

    Returns:
        ``(loss, acc)`` scalars: mean NLL over queries (differentiable w.r.t. ``input``)
        and accuracy. Same signature and results as ``prototypical_loss`` in public
        ProtoNet code (e.g. orobix/Prototypical-Networks-for-Few-shot-Learning-PyTorch).
    """
    if not isinstance(input, torch.Tensor) or input.dim() != 2:
        raise ValueError(f"input must be a [n_samples, D] tensor, got {getattr(input, 'shape', type(input))}")
    if not isinstance(target, torch.Tensor) or target.shape != input.shape[:1]:
        raise ValueError(
            f"target must be a [n_samples] tensor matching input's {input.shape[0]} rows, "
            f"got {getattr(target, 'shape', type(target))}"
        )
    classes, cls_idx, counts = torch.unique(target, return_inverse=True, return_counts=True)
    per_class = int(counts[0])
    if bool((counts != per_class).any()):
        raise ValueError(f"every class must have the same number of examples, got counts {counts.tolist()}")
    if isinstance(n_support, bool) or not isinstance(n_support, int) or not 0 < n_support < per_class:
        raise ValueError(
            f"n_support must be an int in [1, {per_class - 1}] (each class has {per_class} examples), "
            f"got {n_support!r}"
        )
    order = torch.sort(cls_idx, stable=True).indices
    rank = torch.empty_like(cls_idx)
    rank[order] = torch.arange(len(cls_idx), device=cls_idx.device) - cls_idx[order] * per_class
    is_support = rank < n_support
    support, support_labels = input[is_support], cls_idx[is_support]
    query, query_labels = input[~is_support], cls_idx[~is_support]
    protos = prototypes(support[None], support_labels[None], n_way=len(classes))
    return proto_loss(query[None], protos, query_labels[None])
