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
from fastmeta.nn.episode import check_episode_bn, embed_episodes


class ProtoNet(FewShotLearner):
    """ProtoNet learner over batches of episodes.

    Args:
        backbone: maps images ``[M, C, H, W]`` to embeddings ``[M, D]`` (e.g.
            :class:`fastmeta.nn.Conv4`).
        metric: ``"sqeuclidean"`` (the paper) or ``"cosine"``.
        scale: logit temperature; ``learn_scale=True`` makes it a parameter (useful with
            the cosine metric).
        episode_bn: BatchNorm statistics of the backbone in training. ``None`` (default):
            per episode whenever the backbone allows it (Conv4, ResNet12, any ``nn.Sequential``
            of standard layers; :func:`fastmeta.nn.supports_episode_forward`), else over the
            whole batch; ``True``: per episode, or ``TypeError`` here; ``False``: over the whole
            batch of ``B`` episodes (fastmeta before per-episode BatchNorm).

    BatchNorm: with per-episode statistics an episode's embeddings, loss and gradient do not
    depend on the other episodes of its batch, so ``--batch B`` is B one-episode problems and
    2 ranks x ``B/2`` (torchrun) compute what 1 process x ``B`` computes. Running statistics
    move once per step towards the mean over the episodes of the per-episode statistics
    (:mod:`fastmeta.nn.episode`); evaluation (:meth:`evaluate`, eval mode) normalises with
    them, as before. A user's module with BatchNorm inside its own ``forward`` keeps
    whole-batch statistics -- its author's choice (make it an ``nn.Sequential`` or give it
    ``forward_episodes`` for per-episode ones). With one episode per batch (the CLI's default
    ``--batch 1``) both are the same computation, bit for bit.

    Example::

        >>> learner = ProtoNet(Conv4(1))
        >>> loss, acc = learner(support_x, support_y, query_x, query_y)   # [B,N*K,1,28,28], ...
        >>> loss.backward()
        >>> learner.evaluate(test_batches, episodes=600)   # accuracy +- 95% CI
    """

    def __init__(self, backbone: nn.Module, metric: str = "sqeuclidean", scale: float = 1.0,
                 learn_scale: bool = False, episode_bn: bool | None = None):
        super().__init__()
        if metric not in ops.PROTO_METRICS:
            raise ValueError(f"metric must be one of {sorted(ops.PROTO_METRICS)}, got {metric!r}")
        self.backbone = backbone
        self.episode_bn = check_episode_bn(backbone, episode_bn)
        self.metric = metric
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learn_scale else float(scale)

    def embed(self, support_x: torch.Tensor, query_x: torch.Tensor):
        """Embed support ``[B,S,...]`` and query ``[B,Q,...]`` in one backbone pass
        (BatchNorm: per episode, see the class docstring): ``([B,S,D], [B,Q,D])``."""
        if support_x.dim() < 3 or query_x.shape[0] != support_x.shape[0]:
            raise ValueError(
                f"expected support_x [B, S, ...] and query_x [B, Q, ...] with the same B, got "
                f"{tuple(support_x.shape)} and {tuple(query_x.shape)}"
            )
        return embed_episodes(self.backbone, support_x, query_x, self.episode_bn)

    def forward(self, support_x, support_y, query_x, query_y, n_way: int | None = None,
                reduction: str = "mean"):
        """``(loss, acc)`` over the episode batch; ``n_way`` defaults to ``support_y.max()+1``."""
        zs, zq = self.embed(support_x, query_x)
        n_way = int(support_y.max()) + 1 if n_way is None else n_way
        protos = ops.prototypes(zs, support_y, n_way)
        return ops.proto_loss(zq, protos, query_y, self.metric, self.scale, reduction)
