"""Proximal policy optimisation for sequence policies (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms", algorithm 1 with the clipped objective), as RL^2 trains its policy.

The unit of data is a whole trial: a minibatch is a set of trials, and the policy is run over
each trial from its first step (backpropagation through time over the whole trial), so the
recurrent state the loss sees is the one the rollout had.

Per minibatch, with ``rho = exp(log pi(a|x) - log pi_old(a|x))`` and masked means over the
real steps:

    L = -mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)) + c_v mean((V - R)^2) - c_H mean(H[pi])

``A`` are GAE advantages (:func:`fastmeta.rl.returns.gae` over the trial: the discount runs
across the episode boundaries, since the trial's return is what RL^2 maximises), normalised
over the batch; ``R = A + V_old`` are the value targets.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from fastmeta.rl.returns import check_padded, gae


@dataclasses.dataclass
class PPOConfig:
    """PPO's hyperparameters (defaults: Schulman et al. 2017's Atari/MuJoCo values where they
    exist). ``epochs`` passes over the batch, each in ``minibatches`` minibatches of trials.
    ``reward_scale`` multiplies the rewards the value function learns (returns of tens or
    hundreds would let the value loss dominate the clipped gradient norm of a shared trunk)."""

    lr: float = 1e-3
    clip: float = 0.2
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.99
    lam: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    reward_scale: float = 1.0

    def __post_init__(self):
        for name in ("lr", "clip", "value_coef", "entropy_coef", "max_grad_norm", "reward_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
                raise ValueError(f"PPOConfig.{name} must be a number >= 0, got {v!r}")
        for name in ("epochs", "minibatches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PPOConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("gamma", "lam"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {v!r}")


def advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
               lam: float) -> tuple[Tensor, Tensor]:
    """GAE advantages (normalised over all real steps) and value targets of trials ``[N, L]``."""
    check_padded(rewards.unsqueeze(0), mask.unsqueeze(0))
    adv = gae(rewards.unsqueeze(0), values.unsqueeze(0), mask.unsqueeze(0), gamma, lam).squeeze(0)
    ret = adv + values * mask
    n = mask.sum().clamp_min(1.0)
    mean = (adv * mask).sum() / n
    std = (((adv - mean) * mask) ** 2).sum().div(n).sqrt()
    return (adv - mean) / (std + 1e-8) * mask, ret


def ppo_loss(policy: nn.Module, x: Tensor, actions: Tensor, mask: Tensor, logp_old: Tensor,
             adv: Tensor, ret: Tensor, cfg: PPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped PPO loss (module docstring) of trials ``x [N, L, in_dim]`` with ``actions``,
    ``mask``, ``logp_old``, ``adv``, ``ret`` ``[N, L]``; returns (loss, detached statistics)."""
    out, value = policy(x)
    logp = policy.log_prob(out, actions)
    n = mask.sum().clamp_min(1.0)
    ratio = torch.exp(logp - logp_old)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
    pi_loss = -(surr * mask).sum() / n
    v_loss = ((value - ret) ** 2 * mask).sum() / n
    ent = (policy.entropy(out) * mask).sum() / n
    loss = pi_loss + cfg.value_coef * v_loss - cfg.entropy_coef * ent
    with torch.no_grad():
        clipped = (((ratio - 1).abs() > cfg.clip).float() * mask).sum() / n
        kl = ((logp_old - logp) * mask).sum() / n
    return loss, {"pi_loss": pi_loss.detach(), "v_loss": v_loss.detach(), "entropy": ent.detach(),
                  "clip_frac": clipped, "approx_kl": kl}


class PPO:
    """PPO over whole trials of a sequence policy (``policy(x) -> (out, value)`` with
    ``log_prob``/``entropy``, e.g. :class:`fastmeta.rl.recurrent.GRUPolicy`), Adam optimiser.

    ``update(x, actions, rewards, mask, generator)`` with ``x [N, L, in_dim]`` and the rest
    ``[N, L]`` (continuous actions ``[N, L, act_dim]``): computes old log-probabilities, values
    and GAE once, then ``epochs`` x ``minibatches`` gradient steps over shuffled trials
    (``generator`` shuffles); returns the mean statistics of the last epoch.
    """

    def __init__(self, policy: nn.Module, config: PPOConfig | None = None):
        self.policy, self.cfg = policy, config or PPOConfig()
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=self.cfg.lr)

    def update(self, x: Tensor, actions: Tensor, rewards: Tensor, mask: Tensor,
               generator: torch.Generator | None = None) -> dict[str, float]:
        cfg, N = self.cfg, x.shape[0]
        if cfg.minibatches > N:
            raise ValueError(f"PPOConfig.minibatches ({cfg.minibatches}) must be <= the number of "
                             f"trials ({N})")
        with torch.no_grad():
            out, values = self.policy(x)
            logp_old = self.policy.log_prob(out, actions)
            adv, ret = advantages(rewards * cfg.reward_scale, values, mask, cfg.gamma, cfg.lam)
        for _ in range(cfg.epochs):
            stats = []
            for idx in torch.randperm(N, generator=generator).tensor_split(cfg.minibatches):
                idx = idx.to(x.device)
                # trim the minibatch to its longest trial: the rest is padding
                L = int(mask[idx].sum(1).max())
                loss, s = ppo_loss(self.policy, x[idx, :L], actions[idx, :L], mask[idx, :L],
                                   logp_old[idx, :L], adv[idx, :L], ret[idx, :L], cfg)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                stats.append(s)
        return {k: float(torch.stack([s[k] for s in stats]).mean()) for k in stats[0]}
