"""Memory-Augmented Neural Network (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap,
"Meta-Learning with Memory-Augmented Neural Networks", ICML 2016).

An LSTM controller reads an episode as a sequence (see :mod:`fastmeta.learners._sequence`:
by default, as in the paper, step ``t`` is the embedding of ``x_t`` with the one-hot label of
step ``t - 1``) and keeps an external memory ``M`` of ``slots x width``:

* read: each of ``R`` heads emits a key ``k``; its read weights are a softmax over the
  cosine similarity of ``k`` with every memory row (times a learned key strength
  ``beta >= 1``, as in the Neural Turing Machine; the paper's plain cosine gives near-uniform
  weights over 128 slots early in training);
* write, Least Recently Used Access: usage ``u_t = gamma * u_{t-1} + sum(w^r_t) + sum(w^w_t)``;
  head ``i`` writes its key with weights ``w^w = sigmoid(alpha) * w^r_{t-1} + (1 -
  sigmoid(alpha)) * w^lu_{t-1}``, where ``w^lu`` is one-hot on the ``i``-th least used slot
  (the paper's indicator of the ``R`` least used slots, one slot per head); those slots are
  zeroed before the write;
* output: a linear layer over ``[h_t, r_t]`` (controller state and read vectors).

One change from the paper's equations: step ``t`` reads the memory *before* its own write
(``M_{t-1}``, what earlier steps stored), not after it. Read after write, a step's key finds
itself (cosine 1 in the slot it just wrote), so the query reads back its own key rather than
the support's. Measured on the tests' blob episodes (5-way 1-shot, 8 episodes a step,
example-label pairs): read after write left chance after ~450 steps in one run and not
within 300 steps in four others; read before write after ~100-300 steps.

Training speed with the paper's previous-label steps (``label_offset=1``, the default): on
the same blob episodes the loss stayed at chance for all of 2,800 steps (3,200 with read
after write): the model must first learn to bind an example to the label that arrives one
step later. With example-label pairs (``label_offset=0``) it leaves chance after ~200-300
steps. The paper trains for 100,000 episodes.

Queries share the support prefix: the support steps run once per episode, then the state is
copied for each query, which takes one more step (equivalent to one sequence per query;
tested against :func:`~fastmeta.learners._sequence.full_sequences`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.learners._sequence import SequenceLearner, episode_sequence


class MANNCell(nn.Module):
    """One step of the MANN (controller + LRU memory), batched over sequences ``[N, ...]``.

    ``state = (h, c, memory [N, slots, width], read [N, R*width], w_read [N, R, slots],
    usage [N, slots], least_used [N, R, slots])``.
    """

    def __init__(self, in_features: int, hidden: int = 200, slots: int = 128, width: int = 40,
                 heads: int = 4, gamma: float = 0.95):
        super().__init__()
        if slots < heads:
            raise ValueError(f"slots={slots} must be >= heads={heads} (one least-used slot per head)")
        self.hidden, self.slots, self.width, self.heads, self.gamma = hidden, slots, width, heads, gamma
        self.controller = nn.LSTMCell(in_features + heads * width, hidden)
        # per head: key (width), write gate alpha (1), key strength beta (1)
        self.interface = nn.Linear(hidden, heads * (width + 2))

    @property
    def out_features(self) -> int:
        return self.hidden + self.heads * self.width

    def initial_state(self, n: int, like: torch.Tensor):
        z = like.new_zeros
        # memory starts at a small constant so the cosine similarity is defined
        memory = torch.full((n, self.slots, self.width), 1e-6, dtype=like.dtype, device=like.device)
        usage = z(n, self.slots)
        return (z(n, self.hidden), z(n, self.hidden), memory, z(n, self.heads * self.width),
                z(n, self.heads, self.slots), usage, self._least_used(usage))

    def _least_used(self, usage: torch.Tensor) -> torch.Tensor:
        """One-hot ``[N, R, slots]``: head ``i`` gets the ``i``-th least used slot."""
        idx = usage.topk(self.heads, dim=-1, largest=False).indices  # [N, R]
        return F.one_hot(idx, self.slots).to(usage.dtype)

    def forward(self, x: torch.Tensor, state):
        h, c, memory, read, w_read, usage, least_used = state
        n = x.shape[0]
        h, c = self.controller(torch.cat([x, read], -1), (h, c))
        iface = self.interface(h).view(n, self.heads, self.width + 2)
        key = torch.tanh(iface[..., : self.width])  # [N, R, W]
        alpha = torch.sigmoid(iface[..., self.width : self.width + 1])  # [N, R, 1]
        beta = 1 + F.softplus(iface[..., self.width + 1 :])  # [N, R, 1]
        # cosine-similarity read of what earlier steps wrote (see the module docstring)
        sim = F.normalize(key, dim=-1, eps=1e-8) @ F.normalize(memory, dim=-1, eps=1e-8).transpose(1, 2)
        new_w_read = torch.softmax(beta * sim, -1)  # [N, R, slots]
        read = (new_w_read @ memory).flatten(1)  # [N, R*W]
        # LRU write: to the slot read last step or to the least used one (zeroed first)
        w_write = alpha * w_read + (1 - alpha) * least_used  # [N, R, slots]
        erase = least_used.amax(1)  # [N, slots]: the R least-used slots
        memory = memory * (1 - erase).unsqueeze(-1) + w_write.transpose(1, 2) @ key
        w_read = new_w_read
        usage = self.gamma * usage + w_read.sum(1) + w_write.sum(1)
        out = torch.cat([h, read], -1)
        return out, (h, c, memory, read, w_read, usage, self._least_used(usage.detach()))


def _repeat_state(state, q: int):
    return tuple(t.repeat_interleave(q, 0) for t in state)


class MANN(SequenceLearner):
    """MANN learner over batches of episodes (Santoro et al. 2016).

    Args:
        embedding: maps images ``[M, C, H, W]`` to ``[M, D]`` (e.g. a small
            :class:`fastmeta.nn.Conv4`); trained end to end with the controller.
        embed_dim: ``D``.
        n_way: the largest number of classes per episode (size of the label code and of the
            output layer); episodes may use fewer.
        hidden, slots, width, heads, gamma: controller size, memory rows and row width,
            read heads, usage decay (the paper: 200, 128, 40, 4, 0.95).
        label_offset: ``1`` (the paper): step ``t`` carries the label of step ``t - 1``;
            ``0``: each support step carries its own label, the query none. See
            :mod:`fastmeta.learners._sequence`.

    ``forward(support_x [B,S,C,H,W], support_y [B,S], query_x [B,Q,C,H,W], query_y [B,Q],
    n_way=None, reduction="mean") -> (loss, acc)``; ``support_x`` must be in shuffled order
    (``data.episodes(..., shuffle=True)``).

    Example::

        >>> learner = MANN(Conv4(1, hidden=32), embed_dim=32, n_way=5)
        >>> loss, acc = learner(sx, sy, qx, qy)
        >>> learner.evaluate(test_batches, episodes=600)   # accuracy +- 95% CI
    """

    def __init__(self, embedding: nn.Module, embed_dim: int, n_way: int, hidden: int = 200,
                 slots: int = 128, width: int = 40, heads: int = 4, gamma: float = 0.95,
                 label_offset: int = 1):
        super().__init__()
        if n_way < 1 or embed_dim < 1:
            raise ValueError(f"n_way and embed_dim must be >= 1, got {n_way} and {embed_dim}")
        if label_offset not in (0, 1):
            raise ValueError(f"label_offset must be 0 or 1, got {label_offset!r}")
        self.embedding, self.embed_dim, self.n_way = embedding, embed_dim, n_way
        self.label_offset = label_offset
        self.cell = MANNCell(embed_dim + n_way, hidden, slots, width, heads, gamma)
        self.head = nn.Linear(self.cell.out_features, n_way)

    def forward_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        """Run the model over explicit sequences ``[N, T, D + n_way]``; logits ``[N, T, n_way]``
        (step ``t`` depends on steps ``<= t`` only)."""
        state = self.cell.initial_state(seq.shape[0], seq)
        outs = []
        for t in range(seq.shape[1]):
            out, state = self.cell(seq[:, t], state)
            outs.append(out)
        return self.head(torch.stack(outs, 1))

    def logits(self, support_x, support_y, query_x, n_way: int | None = None) -> torch.Tensor:
        """Query logits ``[B, Q, n_way]``; each query is read as the last step of its own
        sequence after the support (``query_y`` is never an input)."""
        n_way = self.n_way if n_way is None else n_way
        zs, zq = self.embed(support_x, query_x)
        seq = episode_sequence(zs, support_y, zq, self.n_way, self.label_offset)
        b, s, _ = seq.support.shape
        q = seq.query.shape[1]
        state = self.cell.initial_state(b, seq.support)
        for t in range(s):
            _, state = self.cell(seq.support[:, t], state)
        out, _ = self.cell(seq.query.flatten(0, 1), _repeat_state(state, q))
        return self.head(out).view(b, q, -1)[..., :n_way]
