"""Meta-learner LSTM (Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning",
ICLR 2017).

A coordinate-wise LSTM learns to train a small conv net (the *learner*) on an episode's
support set. Its cell state *is* the learner's flattened parameter vector:

    c_t = f_t * c_{t-1} - i_t * grad_t          (c_0 = theta_0, learned)

with, per coordinate,

    h_t = LSTM(preprocess(grad_t), preprocess(loss_t); h_{t-1})       (first layer)
    f_t = sigmoid(W_f [h_t, c_{t-1}, f_{t-1}] + b_f)                  (forget gate)
    i_t = sigmoid(W_i [h_t, c_{t-1}, i_{t-1}] + b_i)                  (input gate, a learned
                                                                       per-coordinate step size)

where ``preprocess`` is Andrychowicz et al.'s ``(log|x| / p, sign x)`` (``(-1, e^p x)`` for tiny
``|x|``), ``p = 10``. ``b_f`` starts large and ``b_i`` small, so the initial update is a small
gradient step that keeps the parameters. After ``T`` updates on the support set the learner
with ``c_T`` classifies the queries, and the query loss is backpropagated through the unrolled
updates into the gates, the LSTM and ``theta_0``.

As in the paper, the meta-learner's inputs (gradient and loss) are treated as constants: the
gradient of the gradient is dropped (``first_order=True``, the default). With
``first_order=False`` the ``- i_t * grad_t`` term is differentiated through the learner's
gradient (second-order); the LSTM inputs stay constants.

The learner's BatchNorm uses per-episode batch statistics, in training and at test time (the
paper's choice): the support statistics in the inner loop, the query statistics for the
queries.

**Batched over episodes, with the task-batched layers and ops of the MAML core.** The learner
is a :class:`~fastmeta.nn.TaskSequential` of ``TaskConv2d / TaskBatchNorm2d / ReLU /
TaskMaxPool2d`` blocks and a :class:`~fastmeta.nn.TaskLinear` head: the ``B`` episodes' learners
(each with its own parameters) run as one grouped convolution over the ``[M, B * C, H, W]``
layout, so BatchNorm's statistics are per-episode statistics; per-episode gradients come from
one ``autograd.grad`` of the summed losses (episodes do not interact), and the update
``c_t = f_t * c_{t-1} - i_t * grad_t`` is one :func:`fastmeta.ops.inner_update` call with a
per-episode, per-coordinate rate ``i_t``. The learner's initial parameters ``theta_0`` are
the parameters of those modules (``learner.net``, ``learner.classifier``: an ordinary,
inspectable initial network); ``c_0`` is their concatenation.

**Coordinate-major LSTM.** The meta-learner runs on ``B * P`` coordinates (``P`` ~ 28k for the
paper's learner). Its state is kept transposed, ``[features, B * P]``, so each gate is a
contiguous row block of one ``[4H, B * P]`` GEMM output and every elementwise op runs on
contiguous memory; ``nn.LSTMCell`` on ``[B * P, features]`` works on strided gate slices
(measured: ``bench/results/design_notes.md``).
The weights are still an ``nn.LSTMCell``'s (``learner.lstm``), the same math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta import ops
from fastmeta.learners._evaluate import FewShotLearner
from fastmeta.learners._sequence import check_episode
from fastmeta.nn import TaskActivation, TaskBatchNorm2d, TaskConv2d, TaskLinear, TaskMaxPool2d, TaskSequential


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al. (2016) input scaling ``[...] -> [..., 2]``: ``(log|x| / p, sign x)``
    if ``|x| >= e^-p``, else ``(-1, e^p x)``."""
    big = x.abs() >= math.exp(-p)
    a = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    b = torch.where(big, x.sign(), x * math.exp(p))
    return torch.stack([a, b], -1)


def lstm_step(lstm: nn.LSTMCell, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """One step of ``lstm`` (an ``nn.LSTMCell``'s weights and math) on transposed, coordinate-major
    state: ``x [in, n]``, ``h, c [hidden, n]`` -> ``(h', c')``, each ``[hidden, n]``."""
    gates = torch.addmm(torch.addmm((lstm.bias_ih + lstm.bias_hh)[:, None], lstm.weight_hh, h), lstm.weight_ih, x)
    i, f, g, o = gates.chunk(4, 0)  # nn.LSTMCell's gate order; each a contiguous [H, n] block
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class MetaLSTMCell(nn.Module):
    """The second layer: gates from ``[h_t, c_{t-1}, gate_{t-1}]``, cell = learner params."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w_f = nn.Linear(hidden + 2, 1)
        self.w_i = nn.Linear(hidden + 2, 1)
        for w in (self.w_f.weight, self.w_i.weight):
            nn.init.uniform_(w, -0.01, 0.01)
        nn.init.uniform_(self.w_f.bias, 4, 6)  # f ~ 1: keep the parameters
        nn.init.uniform_(self.w_i.bias, -5, -4)  # i ~ 0.01: a small first step

    def forward(self, h, c_prev, f_prev, i_prev, grad):
        """``h [hidden, B * P]`` (coordinate-major), ``c_prev, f_prev, i_prev, grad [B, P]`` ->
        ``(c, f, i)``, each ``[B, P]``: ``c = f * c_prev - i * grad`` (one ``inner_update``)."""
        hidden = h.shape[0]
        w = torch.cat([self.w_f.weight, self.w_i.weight])  # [2, hidden + 2]
        hw = torch.mm(w[:, :hidden], h.flatten(1)).view(2, *c_prev.shape)  # [2, B, P]
        f = torch.sigmoid(hw[0] + w[0, hidden] * c_prev + w[0, hidden + 1] * f_prev + self.w_f.bias)
        i = torch.sigmoid(hw[1] + w[1, hidden] * c_prev + w[1, hidden + 1] * i_prev + self.w_i.bias)
        (c,) = ops.inner_update([f * c_prev], [grad], [i])
        return c, f, i


class MetaLSTM(FewShotLearner):
    """Meta-learner LSTM over batches of episodes (Ravi & Larochelle 2017).

    Args:
        in_channels: image channels.
        n_way: the largest number of classes per episode (the learner's output size).
        hidden: channels of the learner's conv blocks (paper: 32).
        blocks: conv3x3-BN-ReLU-maxpool blocks of the learner (paper: 4); a global average
            pool and a linear layer follow (on 28x28 inputs with 4 blocks the pool sees 1x1).
        inner_steps: ``T``, updates of the learner on the support set.
        lstm_hidden: hidden size of the coordinate-wise first LSTM layer (paper: 20).
        first_order: drop the gradient of the gradient (the paper's choice).

    ``forward(support_x [B,S,C,H,W], support_y [B,S], query_x [B,Q,C,H,W], query_y [B,Q],
    n_way=None, reduction="mean") -> (loss, acc)``. Evaluation (under ``torch.no_grad``) still
    computes the inner-loop gradients.

    Example::

        >>> learner = MetaLSTM(1, n_way=5)
        >>> loss, acc = learner(sx, sy, qx, qy)
        >>> learner.evaluate(test_batches, episodes=600)   # accuracy +- 95% CI
    """

    def __init__(self, in_channels: int, n_way: int, hidden: int = 32, blocks: int = 4,
                 inner_steps: int = 5, lstm_hidden: int = 20, first_order: bool = True):
        super().__init__()
        if min(in_channels, n_way, hidden, blocks) < 1 or inner_steps < 0:
            raise ValueError(f"in_channels, n_way, hidden, blocks must be >= 1 and inner_steps >= 0, got "
                             f"{in_channels}, {n_way}, {hidden}, {blocks}, {inner_steps}")
        self.in_channels, self.n_way, self.hidden, self.blocks = in_channels, n_way, hidden, blocks
        self.inner_steps, self.first_order = inner_steps, first_order
        layers = []
        for b in range(blocks):
            layers += [TaskConv2d(in_channels if b == 0 else hidden, hidden, 3, padding=1),
                       TaskBatchNorm2d(hidden, track_running_stats=False), TaskActivation("relu"),
                       TaskMaxPool2d(2)]
        self.net = TaskSequential(*layers)  # theta_0 of the conv blocks (c_0, with the classifier)
        self.classifier = TaskLinear(hidden, n_way)
        self._names = [("net", n, p.shape) for n, p in self.net.named_parameters()] + \
                      [("classifier", n, p.shape) for n, p in self.classifier.named_parameters()]
        self.sizes = [math.prod(shape) for _, _, shape in self._names]
        self.lstm = nn.LSTMCell(4, lstm_hidden)
        self.cell = MetaLSTMCell(lstm_hidden)

    @property
    def num_learner_params(self) -> int:
        return sum(self.sizes)

    def theta0(self) -> torch.Tensor:
        """``c_0 [P]``: the learner's initial parameters (``net``'s, then ``classifier``'s),
        flattened and concatenated; differentiable into them."""
        return torch.cat([p.flatten() for p in (*self.net.parameters(), *self.classifier.parameters())])

    def learner(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The learner with per-episode parameters ``theta [B, P]`` on images ``[B, M, C, H, W]``:
        logits ``[B, M, n_way]`` (BatchNorm with the batch statistics of each episode)."""
        b = x.shape[0]
        params = {"net": {}, "classifier": {}}
        for (mod, name, shape), t in zip(self._names, theta.split(self.sizes, 1)):
            params[mod][name] = t.view(b, *shape)
        h = self.net(x, params["net"]).mean((-2, -1))  # global average pool: [B, M, hidden]
        return self.classifier(h, params["classifier"])

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int | None = None
              ) -> torch.Tensor:
        """``T`` meta-learner updates on the support set; the adapted ``theta_T [B, P]``."""
        n_way = self.n_way if n_way is None else n_way
        b = support_x.shape[0]
        theta = self.theta0().expand(b, -1)
        f = i = theta.new_zeros(theta.shape)
        h = c = theta.new_zeros(self.lstm.hidden_size, theta.numel())  # coordinate-major state
        second = not self.first_order and torch.is_grad_enabled()
        for _ in range(self.inner_steps):
            with torch.enable_grad():
                th = theta if second else theta.detach().requires_grad_()
                logits = self.learner(th, support_x)[..., :n_way]
                loss = F.cross_entropy(logits.flatten(0, 1), support_y.flatten(), reduction="none")
                loss = loss.view(b, -1).mean(1)  # [B]: per-episode support loss
                (grad,) = torch.autograd.grad(loss.sum(), th, create_graph=second)
            if not second:
                grad = grad.detach()
            x = torch.cat([preprocess(grad.detach()).permute(2, 0, 1),  # [2, B, P]
                           preprocess(loss.detach()).t()[:, :, None].expand(2, *theta.shape)])
            h, c = lstm_step(self.lstm, x.flatten(1), h, c)
            theta, f, i = self.cell(h, theta, f, i, grad)
        return theta

    def logits(self, support_x, support_y, query_x, n_way: int | None = None) -> torch.Tensor:
        """Query logits ``[B, Q, n_way]`` of the learner after ``T`` updates on the support."""
        n_way = self.n_way if n_way is None else n_way
        return self.learner(self.adapt(support_x, support_y, n_way), query_x)[..., :n_way]

    def forward(self, support_x, support_y, query_x, query_y, n_way: int | None = None,
                reduction: str = "mean"):
        """``(loss, acc)`` over the episode batch; ``n_way`` defaults to ``support_y.max()+1``."""
        n_way = check_episode(support_x, support_y, query_x, query_y, n_way, self.n_way)
        if support_x.shape[2] != self.in_channels:
            raise ValueError(f"support_x has {support_x.shape[2]} channels, this learner was built for "
                             f"in_channels={self.in_channels}")
        return ops.nll_accuracy(self.logits(support_x, support_y, query_x, n_way), query_y, reduction)
