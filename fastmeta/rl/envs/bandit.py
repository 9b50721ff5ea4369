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
