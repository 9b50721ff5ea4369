"""Episodes as sequences for the black-box learners (MANN, SNAIL), and the episode checks and
query loss that MANN, SNAIL and MetaLSTM share.

An episode becomes a sequence: the support examples first, in the episode's (shuffled) order,
with their labels visible, then the query with its label hidden. Each step is an embedding
concatenated with a one-hot label code, in one of two conventions (``label_offset``):

* ``1``, the *previous label* (Santoro et al. 2016, MANN): step ``t`` is ``[z_t,
  one_hot(y_{t-1})]`` (zeros at ``t = 0``), so a label arrives one step after its example and
  a model may be asked to predict every step. The query step carries the last support label
  ``y_{S-1}``.
* ``0``, *example-label pairs* (Mishra et al. 2018, SNAIL): support step ``t`` is ``[z_t,
  one_hot(y_t)]`` and the query step is ``[z_q, 0]``. Only the query is predicted, so the
  support labels may sit with their examples; this is much faster to learn (the binding of an
  example to its label need not be learned across two steps).

**Query placement.** Every query is the last step of its own sequence: query ``i`` of an
episode reads ``support_0 .. support_{S-1}, query_i`` (length ``S + 1``), so

* a query's own label is never an input in either convention (there is no ``query_y``
  argument at all), and
* queries cannot see each other (neither labels nor images): query ``i``'s prediction is the
  same whether the episode has 1 query or 75, and whatever the other queries are.

Materialising the ``Q`` sequences copies the support ``Q`` times. The causal models share
that common prefix instead: the support steps do not depend on the query (causality), so
they are computed once per episode and each query only adds its own last step. The helper
therefore returns the support steps ``[B, S, D + N]`` and the query steps ``[B, Q, D + N]``
(each query sitting at position ``S``); :func:`full_sequences` builds the explicit
``[B * Q, S + 1, D + N]`` sequences, the reference the prefix-sharing models are tested
against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastmeta import ops
from fastmeta.learners._evaluate import FewShotLearner
from fastmeta.nn.episode import embed_episodes


class EpisodeSequence(NamedTuple):
    """Model inputs of a batch of ``B`` episodes, ``S`` support and ``Q`` query examples.

    Fields:
        support: ``[B, S, D + N]``: step ``t`` is ``[embedding(support_x[t]), label code]``.
        query: ``[B, Q, D + N]``: query ``i`` at position ``S`` of its own sequence.
    """

    support: torch.Tensor
    query: torch.Tensor


def label_codes(support_y: torch.Tensor, n_way: int, label_offset: int = 1,
                dtype=torch.float32) -> torch.Tensor:
    """The label code of each of the ``S + 1`` steps of a sequence ``[B, S + 1, n_way]``.

    ``label_offset=1``: row 0 is zeros, row ``t`` is ``one_hot(support_y[:, t - 1])`` (so row
    ``S``, the query's, is the last support label). ``label_offset=0``: row ``t < S`` is
    ``one_hot(support_y[:, t])``, row ``S`` (the query's) is zeros."""
    if label_offset not in (0, 1):
        raise ValueError(f"label_offset must be 0 (example-label pairs) or 1 (previous label), "
                         f"got {label_offset!r}")
    onehot = F.one_hot(support_y, n_way).to(dtype)
    return F.pad(onehot, (0, 0, label_offset, 1 - label_offset))


def episode_sequence(support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor,
                     n_way: int, label_offset: int = 1) -> EpisodeSequence:
    """Turn embedded episodes into the (embedding, label code) steps the sequence models read.

    Args:
        support_z: ``[B, S, D]`` support embeddings, in episode order (shuffle it: a sequence
            model must not be able to rely on the labels arriving sorted).
        support_y: ``[B, S]`` int labels in ``[0, n_way)``.
        query_z: ``[B, Q, D]`` query embeddings.
        n_way: size of the one-hot label code.
        label_offset: ``1``: step ``t`` carries the previous step's label (MANN); ``0``: each
            support step carries its own label and the query none (SNAIL). See the module
            docstring.

    There is deliberately no ``query_y`` argument: the labels being predicted never enter.

    Example::

        >>> seq = episode_sequence(zs, sy, zq, n_way=5)   # [B,S,D], [B,S], [B,Q,D]
        >>> seq.support.shape, seq.query.shape           # [B,S,D+5], [B,Q,D+5]
    """
    if support_z.dim() != 3 or query_z.dim() != 3 or query_z.shape[0] != support_z.shape[0] \
            or query_z.shape[2] != support_z.shape[2] or tuple(support_y.shape) != tuple(support_z.shape[:2]):
        raise ValueError(f"expected support_z [B, S, D], support_y [B, S], query_z [B, Q, D], got "
                         f"{tuple(support_z.shape)}, {tuple(support_y.shape)}, {tuple(query_z.shape)}")
    b, s, _ = support_z.shape
    q = query_z.shape[1]
    codes = label_codes(support_y, n_way, label_offset, support_z.dtype)  # [B, S+1, N]
    support = torch.cat([support_z, codes[:, :s]], -1)
    query = torch.cat([query_z, codes[:, s:].expand(b, q, n_way)], -1)
    return EpisodeSequence(support, query)


def full_sequences(seq: EpisodeSequence) -> torch.Tensor:
    """The explicit sequences ``[B * Q, S + 1, C]``: row ``b * Q + i`` is episode ``b``'s
    support followed by its query ``i``. The model's prediction for query ``i`` is its output
    at the last step."""
    b, s, c = seq.support.shape
    q = seq.query.shape[1]
    prefix = seq.support[:, None].expand(b, q, s, c)
    return torch.cat([prefix, seq.query[:, :, None]], 2).reshape(b * q, s + 1, c)


# -- checks and loss shared by MANN, SNAIL and MetaLSTM ----------------------------------------


def check_episode(support_x, support_y, query_x, query_y, n_way, max_way: int) -> int:
    """Validate an episode batch; returns ``n_way`` (default ``support_y.max() + 1``).

    Raises ``TypeError``/``ValueError`` naming the argument, what it got and what it expects.
    """
    for name, t in (("support_x", support_x), ("query_x", query_x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, M, C, H, W], got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (images in [0, 1]), got {t.dtype}")
        if t.dim() != 5:
            raise ValueError(f"{name} must have shape [B, M, C, H, W], got {tuple(t.shape)}")
    b, s = support_x.shape[:2]
    if query_x.shape[0] != b or query_x.shape[2:] != support_x.shape[2:]:
        raise ValueError(f"query_x must be [B={b}, Q, {', '.join(map(str, support_x.shape[2:]))}] "
                         f"like support_x {tuple(support_x.shape)}, got {tuple(query_x.shape)}")
    if s == 0 or query_x.shape[1] == 0:
        raise ValueError(f"empty episode: S={s} support and Q={query_x.shape[1]} query examples")
    for name, y, shape in (("support_y", support_y, (b, s)), ("query_y", query_y, (b, query_x.shape[1]))):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be an integer torch.Tensor {list(shape)}, got {type(y).__name__}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {y.dtype}")
        if tuple(y.shape) != shape:
            raise ValueError(f"{name} must have shape [B, M] = {list(shape)}, got {tuple(y.shape)}")
        if y.device != support_x.device or (name == "support_y" and query_x.device != support_x.device):
            raise ValueError(f"{name} is on {y.device} but support_x is on {support_x.device}")
    if n_way is None:
        n_way = int(support_y.max()) + 1
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"n_way must be a positive int, got {n_way!r}")
    if n_way > max_way:
        raise ValueError(f"n_way={n_way} but this learner was built for at most {max_way} classes "
                         f"(its label code and output layer have {max_way} entries)")
    for name, y in (("support_y", support_y), ("query_y", query_y)):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_way:
            raise ValueError(f"{name} must lie in [0, {n_way - 1}] (n_way = {n_way}), found label "
                             f"{lo if lo < 0 else hi}")
    return n_way


class SequenceLearner(FewShotLearner):
    """Base of the learners that read an episode as a sequence (MANN, SNAIL).

    Subclasses set ``embedding``, ``embed_dim``, ``n_way``, ``label_offset`` and ``embed_norm``
    and define
    ``forward_sequence(seq [B, T, F]) -> [B, T, n_way]`` (the model on explicit sequences)
    and ``logits(support_x, support_y, query_x, n_way) -> [B, Q, n_way]`` (the fast path
    that shares the support prefix between the queries of an episode).

    ``embed_norm``: the embedding goes through a parameter-free layer norm (zero mean, unit
    variance over its ``D`` features) before it is paired with the one-hot label code. A
    Conv4 embedding ends in ReLU and an average pool: its features are non-negative and the
    embeddings of different glyphs nearly parallel (mean cosine ~0.8 at init, ~0.3 after
    the norm), which makes
    every attention/cosine read near-uniform at first; and its norm (~7 for ``D = 32``) is
    several times the label code's (1), so the label hardly moves the first layer. After the
    norm, features and label entries have comparable per-feature scale.
    """

    embed_norm = False
    episode_bn: bool | None = None  # the embedding's BatchNorm statistics: see fastmeta.ProtoNet

    def embed(self, support_x, query_x):
        zs, zq = embed_episodes(self.embedding, support_x, query_x, self.episode_bn)
        if zs.shape[-1] != self.embed_dim:
            raise ValueError(f"the embedding returned {zs.shape[-1]} features, expected embed_dim={self.embed_dim}")
        if self.embed_norm:
            zs, zq = F.layer_norm(zs, zs.shape[-1:]), F.layer_norm(zq, zq.shape[-1:])
        return zs, zq

    def reference_logits(self, support_x, support_y, query_x, n_way: int | None = None) -> torch.Tensor:
        """:meth:`logits` computed on the explicit ``B * Q`` sequences (slow; for tests)."""
        n_way = self.n_way if n_way is None else n_way
        zs, zq = self.embed(support_x, query_x)
        seq = episode_sequence(zs, support_y, zq, self.n_way, self.label_offset)
        b, q = seq.query.shape[:2]
        return self.forward_sequence(full_sequences(seq))[:, -1].view(b, q, -1)[..., :n_way]

    def forward(self, support_x, support_y, query_x, query_y, n_way: int | None = None,
                reduction: str = "mean"):
        """``(loss, acc)`` over the episode batch; ``n_way`` defaults to ``support_y.max()+1``."""
        n_way = check_episode(support_x, support_y, query_x, query_y, n_way, self.n_way)
        return ops.nll_accuracy(self.logits(support_x, support_y, query_x, n_way), query_y, reduction)
