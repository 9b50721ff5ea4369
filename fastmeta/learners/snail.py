"""Simple Neural Attentive Meta-Learner (Mishra, Rohaninejad, Chen & Abbeel, "A Simple
Neural Attentive Meta-Learner", ICLR 2018).

SNAIL reads an episode as a sequence (see :mod:`fastmeta.learners._sequence`): by default,
as in the paper, the support examples as (embedding, label) pairs followed by the query with
a zero label (``label_offset=0``); ``label_offset=1`` gives MANN's (embedding, previous label)
steps instead. It predicts each query's label at its step with a stack of

* **TC blocks**: dense blocks of causal dilated 1-D convolutions (kernel 2) with gated
  activations ``tanh(conv_f(x)) * sigmoid(conv_g(x))``, dilations ``1, 2, 4, ...`` up to the
  sequence length, each block's output concatenated to its input;
* **attention blocks**: single-head causal attention through
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` (PyTorch's fused
  kernels), the read values concatenated to the input;
* a final linear layer (the paper's 1x1 convolution) to the class logits.

The blocks live in :mod:`fastmeta.nn.snail_blocks` (shared with the meta-RL SNAIL policy).

The paper's Omniglot architecture (the default): attention(64, 32), TC(128),
attention(256, 128), TC(128), attention(512, 256).

Why pairs by default: with previous-label steps the model must learn to bind an example to
the label that arrives one step later before it can use either, and it stays at chance far
longer before it does.

The embedding is layer-normalised (parameter-free) before it is paired with the label code
(``embed_norm``, see :class:`~fastmeta.learners._sequence.SequenceLearner`): raw Conv4
features are non-negative and nearly parallel across glyphs, so the first attention block's
scores barely tell supports apart, and they outweigh the one-hot label. Each attention block's
query projection starts equal to its key projection (see :class:`AttentionBlock`), so the
scores start as a similarity between steps.

**Label-read initialisation** (``label_read``, on by default with example-label pairs): the
first attention block's first ``n_way`` value channels start as a copy of the label code of
the step they read, and the head starts reading them (weight ``label_read`` = 5 on the
matching class), and that block's query projection starts at ``query_scale`` = 6 times its
key projection. The untrained model is then a soft nearest-neighbour vote over the support
labels (a matching network on the random embedding, scores ``6 (W z_i + b).(W z_q + b) /
sqrt(key)``), so the query loss trains the embedding from the first step; everything still
trains freely. With the paper's random values and head (``label_read=0``), the vote has to be
discovered first.

Measured effect of each of these choices (steps at chance, validation and test accuracy per
variant and seed): ``bench/results/blackbox_glyphs.md``.

Every query is the last step of its own sequence (support, query). The support steps do not
depend on the query, so they run once per episode; each query then adds one step that reads
the support's activations: in a TC layer with dilation ``d`` the query's step combines itself
with support step ``S - d``; in an attention layer it attends over the support keys and its
own key (``scaled_dot_product_attention`` with a mask that hides the other queries). This is
exactly the per-query sequence model (tested against :meth:`SNAIL.forward_sequence` on
:func:`~fastmeta.learners._sequence.full_sequences`) at ``S + Q`` instead of ``Q * (S + 1)``
steps per episode.
"""

from __future__ import annotations

import torch
from torch import nn

from fastmeta.learners._sequence import SequenceLearner, episode_sequence
from fastmeta.nn.episode import check_episode_bn
from fastmeta.nn.snail_blocks import AttentionBlock, TCBlock


class SNAIL(SequenceLearner):
    """SNAIL learner over batches of episodes (Mishra et al. 2018).

    Args:
        embedding: maps images ``[M, C, H, W]`` to ``[M, D]`` (the paper: Conv4, D = 64).
        embed_dim: ``D``.
        n_way: the largest number of classes per episode (label code and output size).
        seq_len: the sequence length the TC blocks are sized for, ``N * K + 1`` (support plus
            the query); longer sequences still run (with a receptive field of ``seq_len``).
        filters: channels added by each dense layer of a TC block (paper: 128).
        attention: ``(key, value)`` sizes of the three attention blocks (paper:
            ``((64, 32), (256, 128), (512, 256))``).
        label_offset: ``0`` (the paper): support steps are (example, label) pairs and the
            query step has a zero label; ``1``: step ``t`` carries the label of step ``t - 1``
            (MANN's convention). See :mod:`fastmeta.learners._sequence`.
        embed_norm: normalise the embedding (parameter-free layer norm) before it enters the
            sequence; see :class:`~fastmeta.learners._sequence.SequenceLearner`.
        episode_bn: the embedding's BatchNorm statistics in training: ``None`` (default) per
            episode whenever the embedding allows it (Conv4, ResNet12, ``nn.Sequential``s of
            standard layers), ``True`` per episode or ``TypeError``, ``False`` over the whole
            batch; the contract is :class:`fastmeta.ProtoNet`'s.
        label_read: initial weight of the head on the label read of the first attention block
            (see "Label-read initialisation" above); ``0`` keeps the paper's random init.
            ``None`` (default): ``5.0`` with example-label pairs, ``0`` with previous labels
            (there a step's label belongs to the previous example, so a read of labels is
            not a nearest-neighbour vote). Needs the first block's value size ``>= n_way``.
        query_scale: with ``label_read``, the first attention block's query projection starts
            at ``query_scale`` times its key projection (a sharper initial vote); default 6.

    ``forward(support_x [B,S,C,H,W], support_y [B,S], query_x [B,Q,C,H,W], query_y [B,Q],
    n_way=None, reduction="mean") -> (loss, acc)``; ``support_x`` must be in shuffled order
    (``data.episodes(..., shuffle=True)``).

    Example::

        >>> learner = SNAIL(Conv4(1), embed_dim=64, n_way=5, seq_len=5 * 1 + 1)
        >>> loss, acc = learner(sx, sy, qx, qy)
        >>> learner.evaluate(test_batches, episodes=600)   # accuracy +- 95% CI
    """

    def __init__(self, embedding: nn.Module, embed_dim: int, n_way: int, seq_len: int,
                 filters: int = 128, attention=((64, 32), (256, 128), (512, 256)),
                 label_offset: int = 0, embed_norm: bool = True, label_read: float | None = None,
                 query_scale: float = 6.0, episode_bn: bool | None = None):
        super().__init__()
        if label_offset not in (0, 1):
            raise ValueError(f"label_offset must be 0 or 1, got {label_offset!r}")
        self.label_offset, self.embed_norm = label_offset, embed_norm
        if n_way < 1 or embed_dim < 1 or seq_len < 2:
            raise ValueError(f"need n_way >= 1, embed_dim >= 1 and seq_len >= 2, got {n_way}, "
                             f"{embed_dim} and {seq_len}")
        if len(attention) != 3:
            raise ValueError(f"attention must give (key, value) for 3 attention blocks, got {attention!r}")
        self.embedding, self.embed_dim, self.n_way, self.seq_len = embedding, embed_dim, n_way, seq_len
        self.episode_bn = check_episode_bn(embedding, episode_bn)
        c = embed_dim + n_way
        layers = []
        for i, (k, v) in enumerate(attention):
            att = AttentionBlock(c, k, v)
            layers.append(att)
            c = att.out_channels
            if i < 2:
                tc = TCBlock(c, seq_len, filters)
                layers.append(tc)
                c = tc.out_channels
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(c, n_way)
        if label_read is None:
            label_read = 5.0 if label_offset == 0 else 0.0
        if label_read:
            if label_offset != 0:
                raise ValueError("label_read needs example-label pairs (label_offset=0): with previous "
                                 "labels a step's label code belongs to the previous example; pass label_read=0")
            if attention[0][1] < n_way:
                raise ValueError(f"label_read copies the {n_way}-entry label code into the first attention "
                                 f"block's values, which have only {attention[0][1]} entries; use a value size "
                                 f">= n_way or label_read=0")
            if not query_scale > 0:
                raise ValueError(f"query_scale must be > 0, got {query_scale!r}")
            self._init_label_read(float(label_read), float(query_scale))

    @torch.no_grad()
    def _init_label_read(self, scale: float, query_scale: float) -> None:
        """First attention block: value ``j < n_way`` starts as label-code entry ``j`` of its
        input and the query projection as ``query_scale`` times the key projection; the head
        starts with ``scale`` on each class's read (its position in the concatenated features
        is fixed: every later block appends after it)."""
        att, d, n = self.layers[0], self.embed_dim, self.n_way
        att.proj.weight[: att.key] *= query_scale
        att.proj.bias[: att.key] *= query_scale
        rows = slice(2 * att.key, 2 * att.key + n)
        att.proj.weight[rows] = 0.0
        att.proj.weight[rows, d : d + n] = torch.eye(n)
        att.proj.bias[rows] = 0.0
        read = d + n  # the first block's output is [input (d + n), values]
        self.head.weight[:, read : read + n] += scale * torch.eye(n)

    def forward_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        """Run the model over explicit sequences ``[N, T, D + n_way]``; logits ``[N, T, n_way]``
        (step ``t`` depends on steps ``<= t`` only)."""
        x = seq
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def logits(self, support_x, support_y, query_x, n_way: int | None = None) -> torch.Tensor:
        """Query logits ``[B, Q, n_way]``; each query is read as the last step of its own
        sequence after the support (``query_y`` is never an input)."""
        n_way = self.n_way if n_way is None else n_way
        zs, zq = self.embed(support_x, query_x)
        xs, xq = episode_sequence(zs, support_y, zq, self.n_way, self.label_offset)
        for layer in self.layers:
            xs, xq = layer.forward_branch(xs, xq)
        return self.head(xq)[..., :n_way]
