"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

A query is classified by a softmax over negative (squared Euclidean) distances between
its embedding and each class prototype, the mean embedding of the class's support
examples. The head runs on the fused ops ``fastmeta.ops.prototypes`` and
``fastmeta.ops.proto_loss``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastmeta import ops

from fastmeta.learners._evaluate import FewShotLearner


class ProtoNet(FewShotLearner):
    """ProtoNet learner over batches of episodes.

    Args:
        backbone: maps images ``[M, C, H, W]`` to embeddings ``[M, D]`` (e.g.
            :class:`fastmeta.nn.Conv4`).
        metric: ``"sqeuclidean"`` (the paper) or ``"cosine"``.
        scale: logit temperature; ``learn_scale=True`` makes it a parameter (useful with
            the cosine metric).

    Example::

        >>> learner = ProtoNet(Conv4(1))
        >>> loss, acc = learner(support_x, support_y, query_x, query_y)   # [B,N*K,1,28,28], ...
        >>> loss.backward()
        >>> learner.evaluate(test_batches, episodes=600)   # accuracy +- 95% CI
    """

    def __init__(self, backbone: nn.Module, metric: str = "sqeuclidean", scale: float = 1.0,
                 learn_scale: bool = False):
        super().__init__()
        if metric not in ops.PROTO_METRICS:
            raise ValueError(f"metric must be one of {sorted(ops.PROTO_METRICS)}, got {metric!r}")
        self.backbone = backbone
        self.metric = metric
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learn_scale else float(scale)

    def embed(self, support_x: torch.Tensor, query_x: torch.Tensor):
        """Embed support ``[B,S,...]`` and query ``[B,Q,...]`` in one backbone pass
        (so BatchNorm sees the whole episode batch, as in the paper's code)."""
        if support_x.dim() < 3 or query_x.shape[0] != support_x.shape[0]:
            raise ValueError(
                f"expected support_x [B, S, ...] and query_x [B, Q, ...] with the same B, got "
                f"{tuple(support_x.shape)} and {tuple(query_x.shape)}"
            )
        b, s = support_x.shape[:2]
        q = query_x.shape[1]
        z = self.backbone(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)])).flatten(1)
        return z[: b * s].view(b, s, -1), z[b * s :].view(b, q, -1)

    def forward(self, support_x, support_y, query_x, query_y, n_way: int | None = None,
                reduction: str = "mean"):
        """``(loss, acc)`` over the episode batch; ``n_way`` defaults to ``support_y.max()+1``."""
        zs, zq = self.embed(support_x, query_x)
        n_way = int(support_y.max()) + 1 if n_way is None else n_way
        protos = ops.prototypes(zs, support_y, n_way)
        return ops.proto_loss(zq, protos, query_y, self.metric, self.scale, reduction)
