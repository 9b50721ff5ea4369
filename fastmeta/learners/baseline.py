"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot
Classification", ICLR 2019): pretraining is the whole of the meta-training.

Training: the backbone and a head over all training classes are trained as an ordinary
classifier on the dataset's class ids (a linear head for Baseline; for Baseline++ a cosine
head, ``scale * cos(z, w_c)``, no bias). Test time: the backbone is frozen and a new head of
the same kind is fitted on each episode's support set, all ``B`` episodes at once
(:func:`fit_heads`: one ``[B, N, D]`` weight tensor, full-batch SGD, no per-episode loop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.learners._evaluate import FewShotLearner

HEADS = ("linear", "cosine")


def cosine_logits(z: torch.Tensor, weight: torch.Tensor, scale) -> torch.Tensor:
    """``scale * cos(z_m, w_c)``: ``z [..., M, D]``, ``weight [..., C, D]`` -> ``[..., M, C]``
    (norms clamped at 1e-5, as Chen et al.'s code)."""
    zn = F.normalize(z, dim=-1, eps=1e-5)
    wn = F.normalize(weight, dim=-1, eps=1e-5)
    return scale * (zn @ wn.transpose(-1, -2))


def head_logits(z, weight, bias, head: str, scale=1.0) -> torch.Tensor:
    """Logits ``[..., M, C]`` of a ``"linear"`` (``z @ w.T + b``) or ``"cosine"`` head;
    ``weight [..., C, D]``, ``bias [..., C]`` (``None`` for the cosine head)."""
    if head == "cosine":
        return cosine_logits(z, weight, scale)
    return z @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


def _check_head(head):
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def fit_heads(support_z: torch.Tensor, support_y: torch.Tensor, n_way: int, head: str = "linear",
              steps: int = 100, lr: float = 0.01, scale: float = 10.0, init=None, seed: int = 0):
    """Fit a new ``n_way`` head on each episode's support embeddings, all episodes at once.

    Chen et al.'s fine-tuning optimiser (SGD, momentum 0.9, dampening 0.9, weight decay
    1e-3) for ``steps`` full-batch steps on ``sum_b mean_s CE(head_b(z_bs), y_bs)``: episode
    ``b``'s gradient is exactly that of its own fit, so the result equals a per-episode fit
    from the same init.

    Args:
        support_z: ``[B, S, D]`` float embeddings (treated as constants).
        support_y: ``[B, S]`` int64 labels in ``0..n_way-1``.
        head: ``"linear"`` or ``"cosine"`` (``scale * cos``, no bias).
        init: ``(weight [B, n_way, D], bias [B, n_way] or None)``; default: ``nn.Linear``'s
            init ``U(-1/sqrt(D), 1/sqrt(D))`` drawn from a generator seeded with ``seed``.

    Returns:
        ``(weight [B, n_way, D], bias [B, n_way] or None)``, detached.

    Raises:
        ValueError: bad shapes, labels outside ``0..n_way-1``, unknown ``head``, ``steps < 0``.
    """
    _check_head(head)
    if support_z.dim() != 3 or support_y.shape != support_z.shape[:2]:
        raise ValueError(f"support_z must be [B, S, D] and support_y [B, S], got "
                         f"{tuple(support_z.shape)} and {tuple(support_y.shape)}")
    if support_y.dtype != torch.long:
        raise TypeError(f"support_y must be int64 labels, got {support_y.dtype}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if support_y.numel() and (int(support_y.min()) < 0 or int(support_y.max()) >= n_way):
        raise ValueError(f"support_y must lie in [0, {n_way}) (n_way={n_way}), got values in "
                         f"[{int(support_y.min())}, {int(support_y.max())}]")
    b, _, d = support_z.shape
    z = support_z.detach()
    if init is None:
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(d)
        w0 = (torch.rand(b, n_way, d, generator=g, dtype=torch.float64) * 2 - 1) * bound
        b0 = (torch.rand(b, n_way, generator=g, dtype=torch.float64) * 2 - 1) * bound
        init = (w0, None if head == "cosine" else b0)
    w0, b0 = init
    if w0.shape != (b, n_way, d) or (head == "linear" and (b0 is None or b0.shape != (b, n_way))):
        raise ValueError(f"init must be (weight [{b}, {n_way}, {d}], bias [{b}, {n_way}]"
                         f"{' or None' if head == 'cosine' else ''}), got weight "
                         f"{tuple(w0.shape)} and bias {None if b0 is None else tuple(b0.shape)}")
    params = [w0.detach().to(z).clone().requires_grad_()]
    if head == "linear":
        params.append(b0.detach().to(z).clone().requires_grad_())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            logits = head_logits(z, params[0], params[1] if head == "linear" else None, head, scale)
            loss = F.cross_entropy(logits.flatten(0, 1), support_y.flatten(), reduction="none")
            opt.zero_grad()
            loss.view(b, -1).mean(1).sum().backward()
            opt.step()
    return params[0].detach(), params[1].detach() if head == "linear" else None


class Baseline(FewShotLearner):
    """Baseline (``head="linear"``) and Baseline++ (``head="cosine"``) of Chen et al. 2019.

    Args:
        backbone: images ``[M, C, H, W]`` -> embeddings ``[M, D]`` (e.g. Conv4).
        feature_dim: ``D``.
        classes: the pretraining classes: an int ``C`` (dataset ids ``0..C-1``) or the
            dataset ids of the training split (a 1-D sequence of distinct ints >= 0); the head
            has one row per class.
        head: ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++).
        scale: the cosine head's scale (Chen et al.: 2 with <= 200 classes, else 10);
            ``learn_scale=True`` makes it a parameter of the pretraining head.
        finetune_steps, finetune_lr, seed: the test-time fit (:func:`fit_heads`). Chen et
            al. use lr 0.01 on minibatches of 4 for 100 epochs (200 steps at 5-way 1-shot, 700 at
            5-shot); full-batch, 100 steps need larger rates: the default (``None``) is 0.1 for
            the linear head, 0.03 for the cosine head (chosen on glyphs' validation split;
            bench/results/baseline.md).

    ``forward(support_x, support_y, query_x, query_y, n_way=None, reduction="mean",
    classes=None) -> (loss, acc)``: given ``classes`` (``[B, N]``, the dataset id of each
    episode label, the 5th field of a :func:`fastmeta.data.episodes` batch), a pretraining
    step: cross-entropy of the global head over all support and query images (per-image
    ``[B, S+Q]`` with ``reduction="none"``). Without ``classes``: the few-shot evaluation,
    the frozen backbone and a head fitted on each support set, scored on the queries
    (``[B, Q]`` with ``reduction="none"``).

    Raises:
        ValueError: unknown ``head``, bad ``classes``, a class id outside the pretraining
            classes, mismatched shapes.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, classes, head: str = "linear",
                 scale: float = 10.0, learn_scale: bool = False, finetune_steps: int = 100,
                 finetune_lr: float | None = None, seed: int = 0):
        super().__init__()
        _check_head(head)
        ids = torch.arange(max(classes, 0)) if isinstance(classes, int) and not isinstance(classes, bool) \
            else torch.as_tensor(classes)
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or int(ids.min()) < 0 \
                or ids.unique().numel() != ids.numel():
            raise ValueError(f"classes must be an int >= 1 or a 1-D sequence of distinct ids >= 0, "
                             f"got {classes!r}")
        ids = ids.long()
        index = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        index[ids] = torch.arange(ids.numel())
        self.register_buffer("class_index", index, persistent=False)
        self.backbone, self.head = backbone, head
        linear = nn.Linear(feature_dim, ids.numel(), bias=head == "linear")
        self.weight, self.bias = linear.weight, linear.bias
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learn_scale else float(scale)
        if finetune_lr is None:
            finetune_lr = 0.1 if head == "linear" else 0.03
        self.finetune_steps, self.finetune_lr, self.seed = finetune_steps, finetune_lr, seed

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[..., C, H, W]`` -> embeddings ``[..., D]`` (one backbone pass)."""
        if x.dim() < 4:
            raise ValueError(f"x must be images [..., C, H, W], got shape {tuple(x.shape)}")
        return self.backbone(x.flatten(0, -4)).flatten(1).view(*x.shape[:-3], -1)

    def global_labels(self, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Head rows ``[B, M]`` of episode labels ``[B, M]`` given ``classes [B, N]``."""
        classes = classes.to(labels.device).long()
        if classes.dim() != 2 or classes.shape[0] != labels.shape[0] or int(labels.max()) >= classes.shape[1]:
            raise ValueError(f"classes must be [B, N] with B={labels.shape[0]} and N > every label, "
                             f"got {tuple(classes.shape)}")
        ids = classes.gather(1, labels)
        index = self.class_index
        rows = index[ids.clamp(0, index.numel() - 1)]
        bad = (ids < 0) | (ids >= index.numel()) | (rows < 0)
        if bool(bad.any()):
            raise ValueError(f"classes holds ids outside the {int((index >= 0).sum())} pretraining "
                             f"classes, e.g. {int(ids[bad][0])}")
        return rows

    def pretrain_loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
        """``(loss, acc)`` of the global classifier on images ``[M, C, H, W]`` with head rows
        ``labels [M]`` (``reduction="none"``: per-image losses and 0/1 correctness)."""
        logits = head_logits(self.embed(x), self.weight, self.bias, self.head, self.scale)
        loss = F.cross_entropy(logits, labels, reduction="none")
        correct = logits.argmax(-1) == labels
        if reduction == "none":
            return loss, correct
        return loss.mean(), correct.float().mean()

    def forward(self, support_x, support_y, query_x, query_y, n_way: int | None = None,
                reduction: str = "mean", classes: torch.Tensor | None = None):
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if support_x.dim() < 5 or query_x.shape[0] != support_x.shape[0] \
                or support_y.shape != support_x.shape[:2] or query_y.shape != query_x.shape[:2]:
            raise ValueError(f"expected support_x [B, S, C, H, W], support_y [B, S], query_x "
                             f"[B, Q, C, H, W], query_y [B, Q], got {tuple(support_x.shape)}, "
                             f"{tuple(support_y.shape)}, {tuple(query_x.shape)}, {tuple(query_y.shape)}")
        if classes is not None:
            b = support_x.shape[0]
            x = torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)])
            y = torch.cat([self.global_labels(support_y, classes).flatten(),
                           self.global_labels(query_y, classes).flatten()])
            loss, correct = self.pretrain_loss(x, y, reduction)
            if reduction == "none":
                s = support_y.numel()
                return (torch.cat([loss[:s].view(b, -1), loss[s:].view(b, -1)], 1),
                        torch.cat([correct[:s].view(b, -1), correct[s:].view(b, -1)], 1))
            return loss, correct
        n_way = int(support_y.max()) + 1 if n_way is None else n_way
        scale = float(self.scale.detach()) if isinstance(self.scale, torch.Tensor) else self.scale
        with torch.no_grad():
            zs, zq = self.embed(support_x), self.embed(query_x)
        w, bias = fit_heads(zs, support_y, n_way, self.head, self.finetune_steps, self.finetune_lr,
                            scale, seed=self.seed)
        logits = head_logits(zq, w, bias, self.head, scale)
        loss = F.cross_entropy(logits.flatten(0, 1), query_y.flatten(), reduction="none").view(query_y.shape)
        correct = logits.argmax(-1) == query_y
        if reduction == "none":
            return loss, correct
        return loss.mean(), correct.float().mean()
