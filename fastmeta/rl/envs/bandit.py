"""Multi-armed Bernoulli bandits (Duan et al. 2016, "RL^2", section 4.1).

A task is a k-armed bandit whose arm success probabilities are drawn independently from
U[0, 1]; an episode is n pulls of the same bandit (the RL^2 "trial").

* task: ``{"probs": [T, k] float32}``, each in [0, 1]
* observation: ``[T, E, 1]``, the constant 1.0 -- a bandit has no state; a recurrent (RL^2)
  policy sees what it needs through its own inputs (previous action, reward)
* action: ``[T, E]`` int64 in [0, k), the arm pulled
* reward: 1.0 with probability ``probs[t, action]``, else 0.0 (float32)
* horizon: n steps (pulls); every episode is exactly n long

Rewards are drawn from a generator seeded by ``reset``'s seed: same seed, same rewards.
Registry names: ``bandit-k{K}-n{N}``, e.g. ``bandit-k5-n10``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TaskDistribution, positive_int, seeded_generator


class BernoulliBandit(TaskDistribution):
    """k-armed Bernoulli bandit, n pulls per episode; see the module docstring."""

    obs_dim = 1
    discrete = True

    def __init__(self, arms: int = 5, pulls: int = 10) -> None:
        super().__init__()
        self.act_dim = positive_int(arms, "arms")
        self.horizon = positive_int(pulls, "pulls")
        self.name = f"bandit-k{arms}-n{pulls}"
        self.task_shapes = {"probs": (arms,)}

    def _check_task_values(self, tasks: dict[str, Tensor]) -> None:
        p = tasks["probs"]
        if not p.is_floating_point() or p.min() < 0 or p.max() > 1:
            raise ValueError(f"{self.name}: tasks['probs'] must be floating point in [0, 1], "
                             f"got dtype {p.dtype}")

    def _sample_tasks(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {"probs": torch.rand(n, self.act_dim, generator=generator, dtype=torch.float32)}

    def _reset(self, tasks: dict[str, Tensor], episodes: int, seed: int) -> Tensor:
        self._probs = tasks["probs"].float()
        self._gen = seeded_generator(seed)
        self._obs = torch.ones(self._probs.shape[0], episodes, 1)
        return self._obs

    def _step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        p = torch.gather(self._probs, 1, actions)  # [T, E]
        u = torch.rand(p.shape, generator=self._gen)
        reward = (u < p).float()
        return self._obs, reward, torch.zeros(p.shape, dtype=torch.bool), {}



def greedy_returns(dist: BernoulliBandit, tasks: dict[str, Tensor], seed: int,
                   generator: torch.Generator | None = None, prior: bool = False) -> Tensor:
    """``[T]``: each bandit's total reward over one episode of ``dist.horizon`` pulls under a
    greedy baseline, with ``seed`` seeding the rewards as :meth:`BernoulliBandit.reset` does.

    * ``prior=False``: pull every arm once (in the order 0, 1, ..., k - 1), then always the arm
      of the highest empirical mean reward so far;
    * ``prior=True``: always the arm of the highest posterior mean reward under a uniform
      Beta(1, 1) prior, ``(wins + 1) / (pulls + 2)`` (an arm never pulled counts 1/2).

    Ties are broken uniformly at random (``generator``)."""
    if not isinstance(dist, BernoulliBandit):
        raise TypeError(f"dist must be a BernoulliBandit, got {type(dist).__name__}")
    dist.reset(tasks, 1, seed)
    T, k = dist.T, dist.act_dim
    pulls, wins = torch.zeros(T, k), torch.zeros(T, k)
    total = torch.zeros(T)
    rows = torch.arange(T)
    for h in range(dist.horizon):
        if not prior and h < k:
            a = torch.full((T,), h, dtype=torch.long)
        else:
            mean = (wins + 1) / (pulls + 2) if prior else wins / pulls.clamp_min(1)
            best = mean == mean.max(1, keepdim=True).values
            a = torch.where(best, torch.rand(T, k, generator=generator), -1.0).argmax(1)
        r = dist.step(a.view(T, 1))[1].view(T)
        pulls[rows, a] += 1
        wins[rows, a] += r
        total += r
    return total
