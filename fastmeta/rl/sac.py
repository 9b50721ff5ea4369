"""Soft actor-critic (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications"):
twin Q-networks with Polyak-averaged targets, a tanh-squashed Gaussian actor and an
automatically tuned (or fixed) temperature -- the off-policy learner inside PEARL (Rakelly et
al. 2019).

Inputs are "states" ``x [N, in_dim]``: for PEARL the observation concatenated with the latent
context z. Actions live in ``[-1, 1]^act_dim`` (the agent scales them to the environment).

Losses, for a batch ``(x, a, r, x', not_done)``::

    a' ~ pi(.|x'),   y = r + gamma * not_done * (min_i Qtarg_i(x', a') - alpha * log pi(a'|x'))
    L_Q     = sum_i mean (Q_i(x, a) - y)^2                  (y carries no gradient)
    a~ ~ pi(.|x):  L_pi = mean (alpha * log pi(a~|x) - min_i Q_i(x, a~))
    L_alpha = -mean log_alpha * (log pi(a~|x) + target_entropy)   (target_entropy = -act_dim)

``fixed_alpha``: a constant temperature instead of the automatic one (PEARL's code has no
automatic temperature: alpha = 1 with the reward scale setting the balance); ``L_alpha`` is then
0 and ``log_alpha`` never moves. ``policy_reg`` (optional, PEARL's code uses 1e-3) adds
``policy_reg * mean(m^2 + log_std^2)`` of the pre-tanh Gaussian N(m, std^2) to L_pi, keeping the
actor out of tanh's flat tails.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def mlp(sizes: list[int]) -> nn.Sequential:
    """ReLU MLP with a linear last layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def tanh_gaussian_log_prob(u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``log pi(tanh(u))`` for ``u ~ N(mean, exp(log_std)^2)``, summed over the last dim: the
    Gaussian log-density minus ``log(1 - tanh(u)^2)`` (written ``2 (log 2 - u - softplus(-2u))``,
    stable for large ``|u|``)."""
    z = (u - mean) * torch.exp(-log_std)
    gauss = -0.5 * z * z - log_std - _HALF_LOG_2PI
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return (gauss - log_det).sum(-1)


class TanhGaussianActor(nn.Module):
    """``pi(a | x)``: ``a = tanh(u)``, ``u ~ N(mean(x), std(x)^2)``; log-std clamped to [-20, 2]."""

    def __init__(self, in_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp([in_dim, *hidden, 2 * act_dim])

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """``(action [N, act_dim] in (-1, 1), log_prob [N])``; reparameterised (differentiable in
        the network's parameters). ``deterministic``: ``tanh(mean)`` (its log-prob at u = mean)."""
        return self.sample(x, generator, deterministic)[:2]

    def sample(self, x: Tensor, generator: torch.Generator | None = None,
               deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(action, log_prob, mean, log_std)``: :meth:`forward` plus the pre-tanh Gaussian."""
        mean, log_std = self.net(x).chunk(2, dim=-1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        if deterministic:
            u = mean
        else:
            u = mean + log_std.exp() * torch.randn(mean.shape, generator=generator,
                                                   dtype=mean.dtype)
        return torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std), mean, log_std


class TwinQ(nn.Module):
    """Two independent Q-networks ``Q_i(x, a)``; ``forward -> (q1 [N], q2 [N])``."""

    def __init__(self, in_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1 = mlp([in_dim + act_dim, *hidden, 1])
        self.q2 = mlp([in_dim + act_dim, *hidden, 1])

    def forward(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        xa = torch.cat([x, a], dim=-1)
        return self.q1(xa).squeeze(-1), self.q2(xa).squeeze(-1)


class SAC(nn.Module):
    """The SAC networks and losses (see the module docstring); optimisers live with the caller.

    Args:
        in_dim, act_dim: state and action sizes. hidden: MLP widths of actor and critics.
        gamma: discount. tau: Polyak rate of the target critics. init_alpha: initial temperature.
        target_entropy: default ``-act_dim``. policy_reg: weight of the pre-tanh mean and log-std
        penalty in the actor loss (default 0: plain SAC). fixed_alpha: a constant temperature
        (``init_alpha`` is then ignored, no automatic tuning); None (default): automatic.
    """

    def __init__(self, in_dim: int, act_dim: int, hidden: tuple[int, ...] = (128, 128),
                 gamma: float = 0.99, tau: float = 0.005, init_alpha: float = 1.0,
                 target_entropy: float | None = None, policy_reg: float = 0.0,
                 fixed_alpha: float | None = None):
        super().__init__()
        for what, v in (("in_dim", in_dim), ("act_dim", act_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SAC: {what} must be a positive int, got {v!r}")
        if not (0 <= gamma <= 1 and 0 < tau <= 1 and init_alpha > 0 and policy_reg >= 0
                and (fixed_alpha is None or fixed_alpha > 0)):
            raise ValueError(f"SAC: need 0 <= gamma <= 1, 0 < tau <= 1, init_alpha > 0, policy_reg "
                             f">= 0, fixed_alpha None or > 0; got gamma={gamma}, tau={tau}, "
                             f"init_alpha={init_alpha}, policy_reg={policy_reg}, "
                             f"fixed_alpha={fixed_alpha}")
        self.learn_alpha = fixed_alpha is None
        if not self.learn_alpha:
            init_alpha = fixed_alpha
        self.gamma, self.tau, self.policy_reg = float(gamma), float(tau), float(policy_reg)
        self.target_entropy = float(-act_dim if target_entropy is None else target_entropy)
        self.actor = TanhGaussianActor(in_dim, act_dim, hidden)
        self.critic = TwinQ(in_dim, act_dim, hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha)))

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp().detach()

    def q_target(self, reward: Tensor, next_x: Tensor, not_done: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
        """The soft Bellman target ``y [N]`` (no gradient)."""
        with torch.no_grad():
            a2, logp2 = self.actor(next_x, generator)
            q1, q2 = self.critic_target(next_x, a2)
            return reward + self.gamma * not_done * (torch.minimum(q1, q2) - self.alpha * logp2)

    def critic_loss(self, x: Tensor, a: Tensor, y: Tensor) -> Tensor:
        """``sum_i mean (Q_i(x, a) - y)^2``; differentiable in the critics and in ``x`` (PEARL's
        encoder learns through it)."""
        q1, q2 = self.critic(x, a)
        return F.mse_loss(q1, y) + F.mse_loss(q2, y)

    def actor_alpha_loss(self, x: Tensor, generator: torch.Generator | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
        """``(L_pi, L_alpha, mean log pi)`` (``L_alpha`` = 0, no graph, with a fixed temperature).
        ``x`` should carry no gradient to an encoder; the critic's parameters receive gradient
        from ``L_pi``: zero them before the next critic step."""
        a, logp, mean, log_std = self.actor.sample(x, generator)
        q1, q2 = self.critic(x, a)
        actor_loss = (self.alpha * logp - torch.minimum(q1, q2)).mean()
        if self.policy_reg:
            actor_loss = actor_loss + self.policy_reg * (mean.square() + log_std.square()).mean()
        if self.learn_alpha:
            alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        else:  # a constant: no gradient reaches log_alpha
            alpha_loss = logp.new_zeros(())
        return actor_loss, alpha_loss, logp.detach().mean()

    @torch.no_grad()
    def update_target(self) -> None:
        """``theta_targ <- (1 - tau) theta_targ + tau theta``."""
        for t, s in zip(self.critic_target.parameters(), self.critic.parameters()):
            t.lerp_(s, self.tau)

    @torch.no_grad()
    def act(self, x: Tensor, generator: torch.Generator | None = None,
            deterministic: bool = False) -> Tensor:
        """Actions ``[..., act_dim]`` in (-1, 1) for states ``x [..., in_dim]`` (no graph)."""
        lead = x.shape[:-1]
        a, _ = self.actor(x.reshape(-1, x.shape[-1]), generator, deterministic)
        return a.reshape(*lead, -1)
