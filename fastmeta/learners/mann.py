"""Memory-Augmented Neural Network (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap,
"Meta-Learning with Memory-Augmented Neural Networks", ICML 2016).

An LSTM controller reads an episode as a sequence (see :mod:`fastmeta.learners._sequence`:
by default, as in the paper, step ``t`` is the embedding of ``x_t`` with the one-hot label of
step ``t - 1``) and keeps an external memory ``M`` of ``slots x width``:

* write, Least Recently Used Access: usage ``u_t = gamma * u_{t-1} + sum(w^r_t) + sum(w^w_t)``;
  head ``i`` writes with weights ``w^w = sigmoid(alpha) * w^r_{t-1} + (1 - sigmoid(alpha)) *
  w^lu_{t-1}``, where ``w^lu`` is one-hot on the ``i``-th least used slot (the paper's
  indicator of the ``R`` least used slots, one slot per head); those slots are zeroed first;
* read: each of ``R`` heads emits a key ``k_t``; its read weights are a softmax over the
  cosine similarity of ``k_t`` with every memory row (times a learned key strength
  ``beta >= 1``, as in the Neural Turing Machine), read after the write, as in the paper;
* output: a linear layer over ``[h_t, r_t]`` (controller state and read vectors).

**What is written: the previous step's key with the current label.** The paper writes the
read key ``k_t`` itself. With previous-label steps that cannot bind anything: the label
``y_{t-1}`` arrives at step ``t``, with ``x_t``, so a row written at step ``t`` holds ``x_t``
with ``y_{t-1}``; a later query that finds ``x_t``'s row by cosine similarity reads the wrong
label (the LSTM would have to learn to carry ``x_{t-1}`` and to emit it where a query emits
``x_q``, with one key for both). Here head ``i`` writes ``a_t = k_{t-1} + tanh(W_a o_t)``:
the key it read with one step earlier (which encodes ``x_{t-1}``, carried in the cell state)
plus a write vector from the controller, which sees ``y_{t-1}``. The row therefore binds
``x_{t-1}`` to ``y_{t-1}`` in one write, and a query's key (made the same way as ``k_{t-1}``)
finds it by cosine similarity from the first step of training. Reading after the write (the
paper's order) lets the query step, which carries the last support label, read the binding of
the last support example too; a key no longer finds itself, since rows hold earlier keys.

Three more choices make the memory usable from the start:

* the interface (keys, write vectors, gates) reads the controller output ``o_t = [h_t, x_t]``,
  the LSTM state with a skip connection from the step's input, so a key is a function of the
  example from the first step rather than only after the LSTM has learned to pass it through;
* the embedding is normalised (parameter-free layer norm, see
  :class:`~fastmeta.learners._sequence.SequenceLearner`): Conv4 features after ReLU and the
  average pool are non-negative and nearly parallel, so without it every key looks alike and
  attention is uniform, and their norm drowns the one-hot label (norm 1) in the controller's
  input;
* the key strength starts at ``beta = 1 + softplus(10)`` (~11) rather than the ~1.7 of a zero
  bias, which spreads a read almost uniformly over the slots; ~11 lets it pick the most
  similar rows.

What each of these choices does to training on glyphs (steps at chance, validation accuracy,
the embeddings' cosine similarity, the read entropy at init) is measured in
``bench/results/blackbox_glyphs.md``.

Queries share the support prefix: the support steps run once per episode, then the state is
copied for each query, which takes one more step (equivalent to one sequence per query;
tested against :func:`~fastmeta.learners._sequence.full_sequences`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.learners._sequence import SequenceLearner, episode_sequence
from fastmeta.nn.episode import check_episode_bn


class MANNCell(nn.Module):
    """One step of the MANN (controller + LRU memory), batched over sequences ``[N, ...]``.

    ``state = (h, c, memory [N, slots, width], read [N, R*width], w_read [N, R, slots],
    usage [N, slots], least_used [N, R, slots], key [N, R, width])`` (``key``: this step's
    read keys, which the next step writes).

    ``write="previous_key"`` (the default) writes ``k_{t-1} + tanh(W_a o_t)``; ``write="key"``
    writes ``k_t``, the paper's rule (kept for comparison: with previous-label steps it does
    not bind examples to labels, see the module docstring).
    """

    KEY_STRENGTH_BIAS = 10.0  # beta = 1 + softplus(10) ~ 11 at init (see the module docstring)

    def __init__(self, in_features: int, hidden: int = 200, slots: int = 128, width: int = 40,
                 heads: int = 4, gamma: float = 0.95, write: str = "previous_key"):
        super().__init__()
        if slots < heads:
            raise ValueError(f"slots={slots} must be >= heads={heads} (one least-used slot per head)")
        if write not in ("previous_key", "key"):
            raise ValueError(f"write must be 'previous_key' or 'key', got {write!r}")
        self.hidden, self.slots, self.width, self.heads, self.gamma = hidden, slots, width, heads, gamma
        self.write = write
        self.controller = nn.LSTMCell(in_features + heads * width, hidden)
        # per head, from o_t = [h_t, x_t]: key (width), write vector (width, previous_key
        # only), write gate alpha (1), key strength beta (1)
        self._iface = (2 if write == "previous_key" else 1) * width + 2
        self.interface = nn.Linear(hidden + in_features, heads * self._iface)
        with torch.no_grad():
            self.interface.bias.view(heads, self._iface)[:, -1] = self.KEY_STRENGTH_BIAS

    @property
    def out_features(self) -> int:
        return self.hidden + self.heads * self.width

    def initial_state(self, n: int, like: torch.Tensor):
        z = like.new_zeros
        # memory starts at a small constant so the cosine similarity is defined
        memory = torch.full((n, self.slots, self.width), 1e-6, dtype=like.dtype, device=like.device)
        usage = z(n, self.slots)
        return (z(n, self.hidden), z(n, self.hidden), memory, z(n, self.heads * self.width),
                z(n, self.heads, self.slots), usage, self._least_used(usage), z(n, self.heads, self.width))

    def _least_used(self, usage: torch.Tensor) -> torch.Tensor:
        """One-hot ``[N, R, slots]``: head ``i`` gets the ``i``-th least used slot."""
        idx = usage.topk(self.heads, dim=-1, largest=False).indices  # [N, R]
        return F.one_hot(idx, self.slots).to(usage.dtype)

    def forward(self, x: torch.Tensor, state):
        h, c, memory, read, w_read, usage, least_used, prev_key = state
        n, w = x.shape[0], self.width
        h, c = self.controller(torch.cat([x, read], -1), (h, c))
        # the interface sees the step's input too (skip connection; see the module docstring)
        iface = self.interface(torch.cat([h, x], -1)).view(n, self.heads, self._iface)
        key = torch.tanh(iface[..., :w])  # [N, R, W]
        if self.write == "previous_key":
            # bind x_{t-1} (its key, from the state) to y_{t-1} (seen by the controller now)
            add = prev_key + torch.tanh(iface[..., w : 2 * w])
        else:
            add = key
        alpha = torch.sigmoid(iface[..., -2:-1])  # [N, R, 1]
        beta = 1 + F.softplus(iface[..., -1:])  # [N, R, 1]
        # LRU write: to the slot read last step or to the least used one (zeroed first)
        w_write = alpha * w_read + (1 - alpha) * least_used  # [N, R, slots]
        erase = least_used.amax(1)  # [N, slots]: the R least-used slots
        memory = memory * (1 - erase).unsqueeze(-1) + w_write.transpose(1, 2) @ add
        # cosine-similarity read, after the write (the paper's order)
        sim = F.normalize(key, dim=-1, eps=1e-8) @ F.normalize(memory, dim=-1, eps=1e-8).transpose(1, 2)
        w_read = torch.softmax(beta * sim, -1)  # [N, R, slots]
        read = (w_read @ memory).flatten(1)  # [N, R*W]
        usage = self.gamma * usage + w_read.sum(1) + w_write.sum(1)
        out = torch.cat([h, read], -1)
        return out, (h, c, memory, read, w_read, usage, self._least_used(usage.detach()), key)


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
        write: ``"previous_key"`` (default) or ``"key"`` (the paper's rule); see
            :class:`MANNCell` and the module docstring.
        embed_norm: normalise the embedding (parameter-free layer norm) before it enters the
            sequence; see :class:`~fastmeta.learners._sequence.SequenceLearner`.
        episode_bn: the embedding's BatchNorm statistics in training: ``None`` (default) per
            episode whenever the embedding allows it (Conv4, ResNet12, ``nn.Sequential``s of
            standard layers), ``True`` per episode or ``TypeError``, ``False`` over the whole
            batch; the contract is :class:`fastmeta.ProtoNet`'s.

    With ``n_way`` classes and ``K`` shots a sequence makes ``heads * (n_way * K + 1)`` writes,
    each to a freshly zeroed least-used slot: give ``slots`` at least that many, or the first
    support examples are erased before the query reads them.

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
                 label_offset: int = 1, write: str = "previous_key", embed_norm: bool = True,
                 episode_bn: bool | None = None):
        super().__init__()
        if n_way < 1 or embed_dim < 1:
            raise ValueError(f"n_way and embed_dim must be >= 1, got {n_way} and {embed_dim}")
        if label_offset not in (0, 1):
            raise ValueError(f"label_offset must be 0 or 1, got {label_offset!r}")
        self.embedding, self.embed_dim, self.n_way = embedding, embed_dim, n_way
        self.episode_bn = check_episode_bn(embedding, episode_bn)
        self.label_offset, self.embed_norm = label_offset, embed_norm
        self.cell = MANNCell(embed_dim + n_way, hidden, slots, width, heads, gamma, write)
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
