"""The evaluator every few-shot learner shares: mean accuracy (or, for regression, mean
squared error) over episodes with a 95% CI."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """The mean of a per-episode metric over ``episodes`` test episodes and the half-width of
    its 95% CI.

    Attributes:
        mean: the mean of the metric named by ``metric``.
        ci95: half-width of the 95% normal-approximation confidence interval of ``mean``.
        episodes: how many episodes were scored.
        metric: what was averaged: ``"accuracy"`` (fraction of queries right, in ``[0, 1]``,
            higher is better) or ``"mse"`` (regression: mean squared error, lower is better).

    ``accuracy`` is ``mean`` for an accuracy result; reading it from a result of another
    metric is deprecated (it warns and returns ``mean``): read ``mean`` and ``metric``.
    """

    mean: float
    ci95: float
    episodes: int
    metric: str = "accuracy"

    @property
    def accuracy(self) -> float:
        if self.metric != "accuracy":
            warnings.warn(f"EvalResult.accuracy read from a {self.metric!r} result: it holds the "
                          f"mean {self.metric}; read .mean (and .metric) instead",
                          DeprecationWarning, stacklevel=2)
        return self.mean

    def __str__(self) -> str:
        if self.metric != "accuracy":
            return f"{self.metric} {self.mean:.4g} +- {self.ci95:.2g} ({self.episodes} episodes)"
        return f"{100 * self.mean:.2f} +- {100 * self.ci95:.2f} % ({self.episodes} episodes)"


def confidence_interval(per_episode: torch.Tensor, metric: str = "accuracy") -> EvalResult:
    """Mean and 95% normal-approximation CI half-width (1.96 standard errors)."""
    acc = per_episode.double().flatten()
    n = acc.numel()
    if n == 0:
        raise ValueError("no episodes to evaluate")
    std = acc.std(unbiased=True).item() if n > 1 else 0.0
    return EvalResult(acc.mean().item(), 1.96 * std / math.sqrt(n), n, metric)


@torch.no_grad()
def evaluate_episodes(
    episode_accuracy: Callable[..., torch.Tensor], batches: Iterable, episodes: int = 600, device=None,
    metric: str = "accuracy",
) -> EvalResult:
    """Run ``episode_accuracy(support_x, support_y, query_x, query_y) -> [B]`` over
    ``batches`` of episodes until ``episodes`` episodes are scored (``metric`` names what
    it returns: ``"accuracy"``, or ``"mse"`` for regression)."""
    accs = []
    seen = 0
    for batch in batches:
        sx, sy, qx, qy = (t.to(device) if device is not None else t for t in batch[:4])
        acc = episode_accuracy(sx, sy, qx, qy)
        accs.append(acc[: episodes - seen].cpu())
        seen += len(accs[-1])
        if seen >= episodes:
            break
    if seen < episodes:
        raise ValueError(f"the episode source ran out after {seen} of {episodes} episodes")
    return confidence_interval(torch.cat(accs), metric)


class FewShotLearner(nn.Module):
    """Base of the episodic learners: ``forward(support_x, support_y, query_x, query_y,
    n_way=None, reduction="mean") -> (loss, acc)`` batched over episodes; with
    ``reduction="none"`` it returns per-query ``[B, Q]`` losses and 0/1 correctness. The
    shared trainer and evaluator only rely on this."""

    @torch.no_grad()
    def episode_accuracy(self, support_x, support_y, query_x, query_y) -> torch.Tensor:
        """Per-episode query accuracy ``[B]``."""
        _, correct = self(support_x, support_y, query_x, query_y, reduction="none")
        return correct.float().mean(1)

    def evaluate(self, batches, episodes: int = 600, device=None) -> EvalResult:
        """Mean test accuracy over ``episodes`` episodes drawn from ``batches`` (an iterable
        of ``(support_x, support_y, query_x, query_y, ...)`` batches) with its 95% CI."""
        was_training = self.training
        self.eval()
        try:
            return evaluate_episodes(self.episode_accuracy, batches, episodes, device)
        finally:
            self.train(was_training)
