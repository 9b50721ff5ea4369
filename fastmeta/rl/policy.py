"""Task-batched Gaussian MLP policy: ``pi(a | s) = N(mu_theta(s), diag(exp(log_std))^2)``.

The policy of Finn et al. 2017, section 5.3 (and pytorch-maml-rl): a 64-64 tanh MLP for the
mean, a learned state-independent log standard deviation. It is a :class:`fastmeta.nn.TaskModule`,
so ``fastmeta.func.task_function(policy)`` runs it for T tasks at once with per-task
parameters ``{name: [T, *shape]}`` and ``fastmeta.func.task_hvp`` gives its per-task Hessians.

Output of the task-batched call: ``[T, N, 2 * act_dim]`` = ``cat(mu, log_std)`` (the log-std
repeated over N), which the losses below read.

Its analytic curvature products (Fisher, inner-loss Hessian) are in fastmeta.rl.curvature.

The policy protocol MAML-TRPO uses (shared with :class:`fastmeta.rl.categorical.CategoricalMLPPolicy`):
``discrete``, ``log_prob(out, actions)``, ``kl(out_new, out_old)``, ``loss(out, target,
reduction)`` (the inner policy-gradient loss), ``pack(actions, weights) -> target``,
``fisher(params, obs, weights)`` and ``hvp(params, x, target)`` (analytic curvature operators;
``hvp`` may return None: then fastmeta.func.task_hvp serves), ``actor(params, generator)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastmeta.nn import TaskMLP, TaskModule
from fastmeta.rl.curvature import gaussian_fisher, pg_hvp

LOG_2PI = math.log(2.0 * math.pi)


class GaussianMLPPolicy(TaskModule):
    """Gaussian policy with a tanh MLP mean and a learned log-std.

    Args:
        obs_dim, act_dim: observation and action sizes (>= 1).
        hidden: hidden layer sizes (default 64-64, Finn et al. 2017).
        init_std: initial standard deviation (> 0).

    Parameters: ``"log_std" [act_dim]`` and ``"mean.<i>.weight" / "mean.<i>.bias"`` (the
    Linear layers of :class:`fastmeta.nn.TaskMLP`). Call (task-batched): ``policy(obs [T, N,
    obs_dim], params=None) -> [T, N, 2 * act_dim]``.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden=(64, 64), init_std: float = 1.0):
        super().__init__()
        for what, v in (("obs_dim", obs_dim), ("act_dim", act_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive int, got {v!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.mean = TaskMLP([obs_dim, *hidden, act_dim], activation="tanh")
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def _task_forward(self, h, params, T, layout, prefix):
        sub, log_std = None, None
        if params is not None:
            sub = {k[5:]: v for k, v in params.items() if k.startswith("mean.")}
            unknown = [k for k in params if k != "log_std" and not k.startswith("mean.")]
            if unknown:
                raise ValueError(f"params has unexpected keys {unknown}; expected 'log_std' and 'mean.*'")
            log_std = params.get("log_std")
        if log_std is None:
            log_std = self.log_std.expand(T, self.act_dim)
        elif tuple(log_std.shape) != (T, self.act_dim):
            raise ValueError(f"params['log_std'] must have shape [T, {self.act_dim}] = {(T, self.act_dim)}, "
                             f"got {tuple(log_std.shape)}")
        # the policy is a root module: ``h`` arrives as [T, N, obs_dim] (TaskModule's entry layout)
        mu = self.mean(h, sub)
        return torch.cat([mu, log_std.unsqueeze(1).expand_as(mu)], dim=-1), layout

    # ---- the policy protocol (see the module docstring) ------------------------------------

    discrete = False

    @staticmethod
    def log_prob(out: Tensor, actions: Tensor) -> Tensor:
        return gaussian_log_prob(out, actions)

    @staticmethod
    def kl(out_new: Tensor, out_old: Tensor) -> Tensor:
        return gaussian_kl(out_new, out_old)

    @staticmethod
    def loss(out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return pg_loss(out, target, reduction)

    @staticmethod
    def pack(actions: Tensor, weights: Tensor) -> Tensor:
        """``[T, N, act_dim + 1]``: actions and per-state loss weights, as :func:`pg_loss` reads."""
        return torch.cat([actions, weights.unsqueeze(-1)], dim=-1)

    @staticmethod
    def fisher(params, obs, weights, target=None):
        return gaussian_fisher(params, obs, weights, target)

    @staticmethod
    def hvp(params, x, target):
        return pg_hvp(params, x, target)

    # ---- sampling ---------------------------------------------------------------------------

    def actor(self, params: dict[str, Tensor] | None, generator: torch.Generator | None = None):
        """``callable(obs [T, E, obs_dim]) -> actions [T, E, act_dim]``: samples from the
        per-task policies ``params`` (None: the shared parameters for every task) with
        ``generator`` (the policy owns its randomness; runs without a graph)."""

        def act(obs: Tensor) -> Tensor:
            with torch.no_grad():
                out = self(obs, None if params is None else {k: v.detach() for k, v in params.items()})
                mu, log_std = out.chunk(2, dim=-1)
                noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
                return (mu + log_std.exp() * noise).to(torch.float32)

        return act


def gaussian_log_prob(out: Tensor, actions: Tensor) -> Tensor:
    """``log N(actions; mu, exp(log_std)^2)`` summed over the action dims; ``out = cat(mu,
    log_std)`` as the policy returns it, ``actions`` with ``mu``'s shape. Returns ``out.shape[:-1]``."""
    mu, log_std = out.chunk(2, dim=-1)
    z = (actions - mu) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - 0.5 * LOG_2PI).sum(-1)


def gaussian_kl(out_new: Tensor, out_old: Tensor) -> Tensor:
    """``KL(pi_new || pi_old)`` per state (summed over action dims), both ``cat(mu, log_std)``."""
    mu1, ls1 = out_new.chunk(2, dim=-1)
    mu0, ls0 = out_old.chunk(2, dim=-1)
    return (ls0 - ls1 + (torch.exp(2 * ls1) + (mu1 - mu0) ** 2) * torch.exp(-2 * ls0) / 2 - 0.5).sum(-1)


def pg_loss(out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Policy-gradient (REINFORCE) loss ``-w * log pi(a | s)`` per state, for
    ``fastmeta.func.task_losses`` / ``fastmeta.func.task_hvp``.

    ``out [..., 2A]`` is the policy output; ``target [..., A + 1]`` packs the action ``[..., :A]``
    and the weight ``w`` (advantage x mask, scaled so that the per-task mean over states is the
    masked mean) in the last column. ``reduction``: "none" or "mean".
    """
    A = out.shape[-1] // 2
    if target.shape[-1] != A + 1:
        raise ValueError(f"target must have last dim act_dim + 1 = {A + 1} (actions, weight), got {tuple(target.shape)}")
    per = -target[..., A] * gaussian_log_prob(out, target[..., :A])
    if reduction == "none":
        return per
    if reduction == "mean":
        return per.mean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
