"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, "Matching
Networks for One Shot Learning", NeurIPS 2016).

A query ``x`` is labelled by attention over the support set (eq. 1-2):
``P(y|x, S) = sum_i a(x, x_i) y_i`` with ``a = softmax_i(scale * cos(f(x), g(x_i)))`` and
``y_i`` one-hot. The whole head (cosine similarity, softmax over the support, per-class
accumulation, log, NLL and accuracy) is the fused op :func:`fastmeta.ops.matching_loss`.

With ``fce=True`` the embeddings are the paper's *full context embeddings* (appendix A):

* ``g`` (A.2): a bidirectional LSTM over the support embeddings ``g'(x_i)`` of an episode,
  ``g(x_i) = h_fwd_i + h_bwd_i + g'(x_i)``;
* ``f`` (A.1): an attention LSTM that reads the (context-embedded) support set ``K`` times
  for each query, starting from ``h_0 = c_0 = 0``::

      r_{k-1}      = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)
      h^_k, c_k    = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
      h_k          = h^_k + f'(x)
      f(x)         = h_K

  The paper feeds ``[h_{k-1}, r_{k-1}]`` as the LSTM's previous hidden state; the gate
  pre-activations are linear in ``[f'(x), h_{k-1}, r_{k-1}]`` either way, so this is an
  ``LSTMCell`` with input ``[f'(x), r_{k-1}]`` and hidden state ``h_{k-1}``.

``g'`` and ``f'`` are the same backbone (as in the paper). Everything is batched over the
``B`` episodes of a batch; support and query images go through the backbone in one pass, with
per-episode BatchNorm statistics (``episode_bn``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta import ops
from fastmeta.learners._evaluate import FewShotLearner
from fastmeta.nn.episode import check_episode_bn, embed_episodes


class SupportContext(nn.Module):
    """``g``: bidirectional LSTM over the support set, ``[B, S, D] -> [B, S, D]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)

    def forward(self, zs: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(zs)  # [B, S, 2D]: forward and backward hidden states
        return zs + out[..., : self.dim] + out[..., self.dim :]


class QueryContext(nn.Module):
    """``f``: attention LSTM with ``steps`` reads of the support set,
    ``([B, Q, D], [B, S, D]) -> [B, Q, D]``."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.dim = dim
        self.steps = steps
        self.cell = nn.LSTMCell(2 * dim, dim)

    def forward(self, zq: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        b, q, d = zq.shape
        x = zq.reshape(b * q, d)
        h = x.new_zeros(b * q, d)
        c = x.new_zeros(b * q, d)
        for _ in range(self.steps):
            # content-based read: softmax over the support of h . g(x_i) (no temperature)
            r = F.scaled_dot_product_attention(h.view(b, q, d), gs, gs, scale=1.0).reshape(b * q, d)
            h, c = self.cell(torch.cat([x, r], 1), (h, c))
            h = h + x
        return h.view(b, q, d)


class MatchingNet(FewShotLearner):
    """Matching Networks learner over batches of episodes.

    Args:
        backbone: maps images ``[M, C, H, W]`` to embeddings ``[M, D]`` (e.g.
            :class:`fastmeta.nn.Conv4`).
        fce: full context embeddings (bidirectional LSTM ``g`` over the support, attention
            LSTM ``f`` for the queries); needs ``embed_dim``.
        scale: temperature of the cosine similarities before the softmax over the support.
            The paper has none (``scale=1``); cosines lie in ``[-1, 1]``, so with 1 the
            attention stays nearly uniform and the loss cannot go much below
            ``log(1 + (N-1) e^-2)``; the default 10 trains faster (as for cosine classifiers,
            Gidaris & Komodakis 2018, Chen et al. 2019).
        embed_dim: ``D``, the backbone's output width (64 for Conv4 on 28x28 images).
        fce_steps: ``K``, the read steps of the attention LSTM ``f``.
        episode_bn: BatchNorm statistics of the backbone in training: ``None`` (default) per
            episode whenever the backbone allows it, ``True`` per episode or ``TypeError``,
            ``False`` over the whole batch; the contract is :class:`fastmeta.ProtoNet`'s (an
            episode's loss does not depend on its batch-mates; evaluation uses the running
            statistics; a user module with BatchNorm inside its own ``forward`` keeps
            whole-batch statistics).

    Example::

        >>> learner = MatchingNet(Conv4(1), fce=True, embed_dim=64)
        >>> loss, acc = learner(support_x, support_y, query_x, query_y)   # [B,N*K,1,28,28], ...
        >>> loss.backward()
        >>> learner.evaluate(test_batches, episodes=600)   # accuracy +- 95% CI
    """

    def __init__(self, backbone: nn.Module, fce: bool = False, scale: float = 10.0,
                 embed_dim: int | None = None, fce_steps: int = 5, episode_bn: bool | None = None):
        super().__init__()
        if fce and (embed_dim is None or int(embed_dim) < 1):
            raise ValueError(f"fce=True needs embed_dim, the backbone's output width (got {embed_dim!r})")
        if fce and int(fce_steps) < 1:
            raise ValueError(f"fce_steps must be >= 1, got {fce_steps!r}")
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.backbone = backbone
        self.episode_bn = check_episode_bn(backbone, episode_bn)
        self.fce = bool(fce)
        self.scale = float(scale)
        self.embed_dim = None if embed_dim is None else int(embed_dim)
        self.g = SupportContext(self.embed_dim) if fce else None
        self.f = QueryContext(self.embed_dim, int(fce_steps)) if fce else None

    def embed(self, support_x: torch.Tensor, query_x: torch.Tensor):
        """``(g(support) [B,S,D], f(query) [B,Q,D])``: one backbone pass over support
        ``[B,S,...]`` and query ``[B,Q,...]`` (BatchNorm per episode, see ``episode_bn``),
        then the full context embeddings if ``fce``."""
        if (support_x.dim() < 3 or query_x.dim() != support_x.dim()
                or query_x.shape[0] != support_x.shape[0] or query_x.shape[2:] != support_x.shape[2:]):
            raise ValueError(
                f"expected support_x [B, S, ...] and query_x [B, Q, ...] with the same B and "
                f"example shape, got {tuple(support_x.shape)} and {tuple(query_x.shape)}"
            )
        b, s = support_x.shape[:2]
        q = query_x.shape[1]
        if s == 0 or q == 0:
            raise ValueError(f"need at least one support and one query example, got S={s}, Q={q}")
        zs, zq = embed_episodes(self.backbone, support_x, query_x, self.episode_bn)
        if self.fce:
            if zs.shape[-1] != self.embed_dim:
                raise ValueError(f"the backbone gives {zs.shape[-1]}-d embeddings but embed_dim="
                                 f"{self.embed_dim} (the width of the FCE LSTMs)")
            zs = self.g(zs)
            zq = self.f(zq, zs)
        return zs, zq

    @staticmethod
    def _check_labels(name: str, labels: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} must have shape {tuple(x.shape[:2])} (the first two dims of the "
                             f"images), got {tuple(labels.shape)}")

    def _n_way(self, support_y: torch.Tensor, n_way: int | None) -> int:
        n_way = int(support_y.max()) + 1 if n_way is None else n_way
        if int(n_way) < 1:
            raise ValueError(f"n_way must be >= 1, got {n_way}")
        return int(n_way)

    def log_probs(self, support_x, support_y, query_x, n_way: int | None = None) -> torch.Tensor:
        """``log P(y|x, S)``, ``[B, Q, N]`` (:func:`fastmeta.ops.matching_attention`)."""
        self._check_labels("support_y", support_y, support_x)
        zs, zq = self.embed(support_x, query_x)
        return ops.matching_attention(zq, zs, support_y, self._n_way(support_y, n_way), scale=self.scale)

    def forward(self, support_x, support_y, query_x, query_y, n_way: int | None = None,
                reduction: str = "mean"):
        """``(loss, acc)`` over the episode batch; ``n_way`` defaults to ``support_y.max()+1``."""
        self._check_labels("support_y", support_y, support_x)
        self._check_labels("query_y", query_y, query_x)
        zs, zq = self.embed(support_x, query_x)
        return ops.matching_loss(zq, zs, support_y, self._n_way(support_y, n_way), query_y,
                                 scale=self.scale, reduction=reduction)
