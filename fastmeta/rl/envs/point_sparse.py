"""Sparse-reward point robot (Rakelly et al. 2019, section 6.3: "sparse 2D navigation").

A point starts at the origin; the goal lies on the upper half of the unit circle, at an angle
drawn uniformly from [0, pi]. The reward is zero unless the point is within ``goal_radius``
(0.2) of the goal, where it is ``1 - distance``; so an agent must explore the semicircle to find
out which goal is the task's, the case PEARL's posterior sampling is built for.

* task: ``{"goal": [T, 2] float32}`` (points of the unit circle with y >= 0)
* observation: the position ``[T, E, 2]`` (zeros after ``reset``)
* action: ``[T, E, 2]`` float, the displacement, clipped to [-0.1, 0.1] per coordinate
* reward: ``1 - ||position - goal||`` if that distance is <= ``goal_radius``, else 0 (after the
  move)
* horizon: ``horizon`` steps (default 20, as PEARL), every episode runs all of them

All T x E episodes move in one batched tensor operation; the dynamics are deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import positive_int
from .navigation import PointMass2D


class PointRobotSparse(PointMass2D):
    """Point-mass navigation to a goal on a semicircle with a sparse reward; see module doc."""

    def __init__(self, horizon: int = 20, goal_radius: float = 0.2) -> None:
        super().__init__()
        self.name = "point-sparse"
        self.horizon = positive_int(horizon, "horizon")
        if not (isinstance(goal_radius, (int, float)) and 0 < goal_radius < 1):
            raise ValueError(f"point-sparse: goal_radius must be a number in (0, 1), got "
                             f"{goal_radius!r}")
        self.goal_radius = float(goal_radius)

    def _sample_tasks(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        angle = math.pi * torch.rand(n, generator=generator, dtype=torch.float32)
        return {"goal": torch.stack([angle.cos(), angle.sin()], dim=-1)}

    def _step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        dist = torch.linalg.vector_norm(self._move(actions), dim=-1)
        reward = torch.where(dist <= self.goal_radius, 1.0 - dist, torch.zeros(()))
        return self._pos, reward, torch.zeros_like(dist, dtype=torch.bool), {"distance": dist}

    @staticmethod
    def dense_reward(tasks: dict[str, Tensor], next_obs: Tensor) -> Tensor:
        """``-||next_obs - goal||`` ``[T, N]`` for ``next_obs [T, N, 2]``: the shaped reward PEARL's
        code trains the critic on in this task while the encoder sees only the sparse one."""
        return -torch.linalg.vector_norm(next_obs - tasks["goal"][:, None].to(next_obs.dtype),
                                         dim=-1)
