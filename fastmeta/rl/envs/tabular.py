"""Random tabular MDPs (Duan et al. 2016, "RL^2", section 4.2).

A task is an MDP with ``states`` states and ``actions`` actions (paper: 10 and 5): for every
(state, action) the next-state distribution is drawn from a flat Dirichlet(1, ..., 1) and
the mean reward from N(1, 1); a step's reward is drawn from N(mean, 1). Episodes have a fixed
horizon (paper: 10). The paper does not say where an episode starts; here every episode
starts in state 0.

* task: ``{"transitions": [T, S, A, S] float32`` (rows sum to 1),
  ``"reward_means": [T, S, A] float32}``
* observation: the one-hot current state ``[T, E, S]`` float32
* action: ``[T, E]`` int64 in [0, A)
* reward: ``reward_means[t, s, a] + N(0, 1)`` (float32), s the state the action was taken in
* horizon: ``horizon`` steps; every episode is exactly that long

Reward noise and transitions are drawn from a generator seeded by ``reset``'s seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TaskDistribution, positive_int, seeded_generator


class TabularMDP(TaskDistribution):
    """Random tabular MDPs stepped as T tasks x E episodes; see the module docstring."""

    discrete = True

    def __init__(self, states: int = 10, actions: int = 5, horizon: int = 10) -> None:
        super().__init__()
        self.obs_dim = positive_int(states, "states")
        self.act_dim = positive_int(actions, "actions")
        self.horizon = positive_int(horizon, "horizon")
        self.name = "tabular-mdp"
        S, A = self.obs_dim, self.act_dim
        self.task_shapes = {"transitions": (S, A, S), "reward_means": (S, A)}

    def _check_task_values(self, tasks: dict[str, Tensor]) -> None:
        P = tasks["transitions"]
        if not P.is_floating_point() or not tasks["reward_means"].is_floating_point():
            raise ValueError(f"{self.name}: tasks must be floating point, got transitions "
                             f"{P.dtype}, reward_means {tasks['reward_means'].dtype}")
        err = (P.double().sum(-1) - 1).abs().max()
        if P.min() < 0 or err > 1e-4:
            raise ValueError(f"{self.name}: tasks['transitions'] must be non-negative with rows "
                             f"summing to 1 over the last axis, got min {float(P.min()):.3g}, "
                             f"largest |row sum - 1| {float(err):.3g}")

    def _sample_tasks(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        S, A = self.obs_dim, self.act_dim
        # Dirichlet(1, ..., 1) = normalised i.i.d. Exponential(1) draws
        e = torch.empty(n, S, A, S, dtype=torch.float64).exponential_(generator=generator)
        transitions = (e / e.sum(-1, keepdim=True)).float()
        means = 1.0 + torch.randn(n, S, A, generator=generator, dtype=torch.float32)
        return {"transitions": transitions, "reward_means": means}

    def _reset(self, tasks: dict[str, Tensor], episodes: int, seed: int) -> Tensor:
        S, A = self.obs_dim, self.act_dim
        self._P = tasks["transitions"].float().reshape(-1, S)  # row (t, s, a)
        self._R = tasks["reward_means"].float().reshape(-1)
        T = tasks["transitions"].shape[0]
        self._gen = seeded_generator(seed)
        self._row0 = (torch.arange(T) * (S * A))[:, None]  # first row of task t
        self._state = torch.zeros(T, episodes, dtype=torch.long)
        return self._one_hot()

    def _one_hot(self) -> Tensor:
        return torch.nn.functional.one_hot(self._state, self.obs_dim).float()

    def _step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        s = self._state
        # index_select on flat rows: advanced indexing P[t, s, a] went multi-threaded and cost
        # milliseconds per step at 2 threads on a busy machine
        row = (self._row0 + s * self.act_dim + actions).reshape(-1)
        mean = self._R.index_select(0, row).view(s.shape)  # [T, E]
        reward = mean + torch.randn(mean.shape, generator=self._gen)
        probs = self._P.index_select(0, row).view(*s.shape, self.obs_dim)  # [T, E, S]
        # inverse-CDF draw (about 10x cheaper than torch.multinomial on [T*E, S] rows); the
        # clamp catches a u above a last cumulative sum that float rounding left below 1
        u = torch.rand(*s.shape, 1, generator=self._gen)
        nxt = (probs.cumsum(-1) < u).sum(-1)
        self._state = nxt.clamp_(max=self.obs_dim - 1)
        done = torch.zeros(s.shape, dtype=torch.bool)
        return self._one_hot(), reward, done, {"state": s}
