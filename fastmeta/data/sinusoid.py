"""Sinusoid regression tasks (Finn, Abbeel & Levine, MAML, ICML 2017, section 5.1)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SinusoidBatch(NamedTuple):
    """``x``, ``y`` ``[T, K, 1]``; ``amplitude``, ``phase`` ``[T]`` (the true function of task
    ``t`` is ``amplitude[t] * sin(x - phase[t])``)."""

    x: torch.Tensor
    y: torch.Tensor
    amplitude: torch.Tensor
    phase: torch.Tensor


class SinusoidTasks:
    """Tasks ``y = A sin(x - phase)`` with ``A ~ U[amplitude]``, ``phase ~ U[phase]``, inputs
    ``x ~ U[x_range]`` (defaults: the MAML paper's ``[0.1, 5]``, ``[0, pi]``, ``[-5, 5]``).

    Example::

        >>> tasks = SinusoidTasks()
        >>> g = torch.Generator().manual_seed(0)
        >>> b = tasks.sample(25, 20, g)            # 25 tasks, 10 support + 10 query points
        >>> xs, ys, xq, yq = b.x[:, :10], b.y[:, :10], b.x[:, 10:], b.y[:, 10:]
        >>> grid = torch.linspace(*tasks.x_range, 200)
        >>> curves = tasks.function(grid, b.amplitude, b.phase)   # [25, 200, 1], to plot
    """

    def __init__(self, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)):
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    @staticmethod
    def function(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """The true outputs: ``x`` ``[K]``, ``[K, 1]`` or ``[T, K, 1]``; amplitude/phase
        ``[T]`` -> ``[T, K, 1]``."""
        if x.dim() == 1:
            x = x[:, None]
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    def sample(self, num_tasks: int, num_points: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device=None) -> SinusoidBatch:
        """``num_tasks`` tasks with ``num_points`` points each (split them into support and
        query yourself: the points are i.i.d.). Deterministic given ``generator``'s state;
        sampled on the CPU, then moved to ``device``."""
        for name, v in (("num_tasks", num_tasks), ("num_points", num_points)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")

        def uniform(shape, lo, hi):
            return torch.rand(shape, generator=generator, dtype=torch.float64) * (hi - lo) + lo

        amplitude = uniform((num_tasks,), *self.amplitude)
        phase = uniform((num_tasks,), *self.phase)
        x = uniform((num_tasks, num_points, 1), *self.x_range)
        y = self.function(x, amplitude, phase)
        return SinusoidBatch(*(t.to(device=device, dtype=dtype) for t in (x, y, amplitude, phase)))
