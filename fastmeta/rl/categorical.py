"""Task-batched categorical MLP policy for discrete actions: ``pi(a | s) = softmax(f_theta(s))``.

A tanh MLP (64-64 by default) gives the logits; a :class:`fastmeta.nn.TaskModule`, so it runs
for T tasks at once with per-task parameters ``{name: [T, *shape]}`` (``"logits.<i>.weight"``,
``"logits.<i>.bias"``). It implements the policy protocol of :mod:`fastmeta.rl.policy`: the
Fisher product is analytic (:func:`fastmeta.rl.curvature.categorical_fisher`); the inner-loss
Hessian products come from :func:`fastmeta.func.task_hvp` (``hvp`` returns None).

Actions are int64 indices ``[T, E]`` (sampling) / ``[T, N]`` (losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta.nn import TaskMLP, TaskModule
from fastmeta.rl.curvature import categorical_fisher


class CategoricalMLPPolicy(TaskModule):
    """Softmax policy over ``n_actions`` with a tanh MLP; call: ``policy(obs [T, N, obs_dim],
    params=None) -> logits [T, N, n_actions]``."""

    discrete = True

    def __init__(self, obs_dim: int, n_actions: int, hidden=(64, 64)):
        super().__init__()
        for what, v in (("obs_dim", obs_dim), ("n_actions", n_actions)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive int, got {v!r}")
        self.obs_dim, self.act_dim = obs_dim, n_actions
        self.logits = TaskMLP([obs_dim, *hidden, n_actions], activation="tanh")

    def _task_forward(self, h, params, T, layout, prefix):
        sub = None
        if params is not None:
            unknown = [k for k in params if not k.startswith("logits.")]
            if unknown:
                raise ValueError(f"params has unexpected keys {unknown}; expected 'logits.*'")
            sub = {k[7:]: v for k, v in params.items()}
        return self.logits(h, sub), layout

    @staticmethod
    def log_prob(out: Tensor, actions: Tensor) -> Tensor:
        return torch.log_softmax(out, -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def kl(out_new: Tensor, out_old: Tensor) -> Tensor:
        """``KL(softmax(out_new) || softmax(out_old))`` per state."""
        lp_new, lp_old = torch.log_softmax(out_new, -1), torch.log_softmax(out_old, -1)
        return (lp_new.exp() * (lp_new - lp_old)).sum(-1)

    @staticmethod
    def loss(out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """``-w * log pi(a | s)`` per state; ``target [..., 2]`` = (action index, weight)."""
        if target.shape[-1] != 2:
            raise ValueError(f"target must have last dim 2 (action, weight), got {tuple(target.shape)}")
        per = -target[..., 1] * F.log_softmax(out, -1).gather(-1, target[..., :1].long()).squeeze(-1)
        if reduction == "none":
            return per
        if reduction == "mean":
            return per.mean()
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")

    @staticmethod
    def pack(actions: Tensor, weights: Tensor) -> Tensor:
        return torch.stack([actions.to(weights.dtype), weights], dim=-1)

    @staticmethod
    def fisher(params, obs, weights):
        return categorical_fisher(params, obs, weights)

    @staticmethod
    def hvp(params, x, target):
        return None

    def actor(self, params: dict[str, Tensor] | None, generator: torch.Generator | None = None):
        """``callable(obs [T, E, obs_dim]) -> actions [T, E]`` int64 sampled per task."""

        def act(obs: Tensor) -> Tensor:
            with torch.no_grad():
                logits = self(obs, None if params is None else {k: v.detach() for k, v in params.items()})
                probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
                return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])

        return act
