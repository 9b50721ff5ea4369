"""The MAML family as a :class:`FewShotLearner`: what the shared trainer, evaluator and CLI
drive for MAML, Meta-SGD, ANIL, Reptile and iMAML."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.learners._evaluate import EvalResult, FewShotLearner, evaluate_episodes
from fastmeta.learners._meta_loss import MetaLossResult
from fastmeta.learners._meta_loss import check_chunk as _check_chunk
from fastmeta.ops import checks

Tensor = torch.Tensor


class EpisodicLearner(FewShotLearner):
    """A MAML-family learner as a :class:`FewShotLearner` (what the shared trainer, evaluator
    and CLI drive): ``forward(support_x, support_y, query_x, query_y) -> (loss, metric)`` runs
    ``meta.meta_loss`` with ``steps`` inner steps in training and ``test_steps`` in eval mode.

    Args:
        meta: a :class:`MAML`, :class:`MetaSGD`, :class:`ANIL`, :class:`Reptile` or
            :class:`iMAML` (anything with their ``meta_loss``).
        steps: inner steps during meta-training; test_steps: at evaluation (default: steps).
        loss_fn: ``F.cross_entropy`` (classification, metric: accuracy) or ``F.mse_loss``
            (regression, metric: MSE).
        task_chunk: passed to ``meta_loss`` (``"auto"``, None or tasks per chunk).
    """

    def __init__(self, meta: nn.Module, steps: int = 1, test_steps: int | None = None,
                 loss_fn: Callable = F.cross_entropy, task_chunk: int | str | None = "auto"):
        super().__init__()
        self.meta = meta
        self.steps = checks.steps_value(steps)
        self.test_steps = (self.steps if test_steps is None
                           else checks.steps_value(test_steps, "test_steps"))
        self.loss_fn = loss_fn
        self.task_chunk = _check_chunk(task_chunk)
        regression = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
        self.metric = "mse" if loss_fn in regression else "accuracy"

    def meta_loss(self, support_x, support_y, query_x, query_y) -> MetaLossResult:
        steps = self.steps if self.training else self.test_steps
        return self.meta.meta_loss(support_x, support_y, query_x, query_y, steps=steps,
                                   loss_fn=self.loss_fn, task_chunk=self.task_chunk)

    def forward(self, support_x, support_y, query_x, query_y, n_way: int | None = None,
                reduction: str = "mean"):
        """``(loss, metric)`` over the meta-batch (``n_way`` is fixed by the model's head)."""
        if reduction != "mean":
            raise ValueError(
                f"{type(self).__name__} supports reduction='mean' only, got {reduction!r}")
        res = self.meta_loss(support_x, support_y, query_x, query_y)
        return res.loss, res.metric

    @torch.no_grad()
    def episode_accuracy(self, support_x, support_y, query_x, query_y) -> Tensor:
        """Per-episode query accuracy (or MSE for regression) ``[B]`` after ``test_steps``."""
        return self.meta_loss(support_x, support_y, query_x, query_y).task_metric

    def evaluate(self, batches, episodes: int = 600, device=None) -> EvalResult:
        was_training = self.training
        self.eval()
        try:
            return evaluate_episodes(self.episode_accuracy, batches, episodes, device,
                                     metric=self.metric)
        finally:
            self.train(was_training)
