"""2D navigation (Finn et al. 2017, section 5.3; the task of pytorch-maml-rl's Navigation2D).

A point starts at the origin and must move to a goal drawn uniformly from [-0.5, 0.5]^2.

* task: ``{"goal": [T, 2] float32}``
* observation: the point's position ``[T, E, 2]`` (zeros after ``reset``)
* action: ``[T, E, 2]`` float, the displacement, clipped to [-0.1, 0.1] per coordinate
* reward: ``-||position - goal||`` measured after the move
* horizon: at most 100 steps; an episode ends earlier once the point is within ``goal_box``
  (default 0.01, as pytorch-maml-rl) of the goal in both coordinates; ``goal_box=0`` makes
  every episode run the full horizon. The early end matters: with a fixed horizon the policy
  must hover at the goal, its standard deviation shrinks, the inner step (which scales as
  1/sigma^2) grows, and MAML-TRPO's post-adaptation return degraded after ~30 iterations
  (bench/results/maml_trpo.md)

All T x E episodes move in one batched tensor operation; the dynamics are deterministic,
so the reset seed has no effect.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TaskDistribution, positive_int


class PointMass2D(TaskDistribution):
    """What the point-mass tasks share (2D navigation, PEARL's sparse point robot): a point at
    the origin of ``[T, E, 2]`` positions, moved by clipped displacements, a per-task goal
    ``{"goal": [T, 2]}``. Subclasses draw goals and define reward and episode end."""

    obs_dim = 2
    act_dim = 2
    discrete = False
    max_action = 0.1
    task_shapes = {"goal": (2,)}
    _pos: Tensor | None = None

    def _reset(self, tasks: dict[str, Tensor], episodes: int, seed: int) -> Tensor:
        T = tasks["goal"].shape[0]
        self._goal = tasks["goal"].float()[:, None, :]
        self._pos = torch.zeros(T, episodes, 2)
        return self._pos  # never modified in place: safe to hand out

    def _move(self, actions: Tensor) -> Tensor:
        """Apply the clipped displacement; the new positions' distance vector to the goal."""
        self._pos = self._pos + actions.clamp(-self.max_action, self.max_action)
        return self._pos - self._goal


class Navigation2D(PointMass2D):
    """Point-mass 2D navigation to a per-task goal; see the module docstring."""

    goal_range = 0.5

    def __init__(self, horizon: int = 100, goal_box: float = 0.01) -> None:
        super().__init__()
        self.name = "nav2d"
        self.horizon = positive_int(horizon, "horizon")
        if not (isinstance(goal_box, (int, float)) and 0 <= goal_box < self.goal_range):
            raise ValueError(f"nav2d: goal_box must be a number in [0, {self.goal_range}), got {goal_box!r}")
        self.goal_box = float(goal_box)

    def _sample_tasks(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        u = torch.rand(n, 2, generator=generator, dtype=torch.float32)
        return {"goal": (2 * u - 1) * self.goal_range}

    def _step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        delta = self._move(actions)
        reward = -torch.linalg.vector_norm(delta, dim=-1)
        done = (delta.abs() < self.goal_box).all(-1)
        return self._pos, reward, done, {}
