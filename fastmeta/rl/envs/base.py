"""The task-distribution contract shared by every meta-RL environment in fastmeta.rl.envs.

A :class:`TaskDistribution` is a distribution over tasks (MDPs) that is stepped for T tasks
x E episodes at once:

* ``sample_tasks(n, seed)`` -> ``dict[str, Tensor]``, every value ``[n, ...]``; a pure
  function of ``(n, seed)``.
* ``reset(tasks, episodes, seed)`` -> observations ``[T, E, obs_dim]`` float32, where T is
  the leading size of the task tensors and E = ``episodes``; ``seed`` fixes every random
  draw of the episodes (initial states, stochastic rewards and transitions).
* ``step(actions)`` -> ``(obs [T, E, obs_dim] float32, reward [T, E] float32,
  done [T, E] bool, info dict)``. Continuous actions are ``[T, E, act_dim]`` floating point
  (cast to float32); discrete actions are ``[T, E]`` integers in ``[0, act_dim)``.

Episodes last at most ``horizon`` steps: ``done`` is True for every episode at step
``horizon`` (a distribution may end some earlier). Once an episode is done, later steps
still return values for it, but they are padding (the sampler masks them out). Stepping
after every episode is done, or before ``reset``, raises ``ValueError``.

Subclasses implement ``_sample_tasks(n, generator)``, ``_reset(tasks, episodes, seed)`` and
``_step(actions)``; this class does the argument checks common to all of them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def seeded_generator(seed: int, what: str = "seed") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (a non-negative Python int)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{what} must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{what} must be >= 0, got {seed}")
    return torch.Generator().manual_seed(seed)


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


class TaskDistribution:
    """Base class: a distribution over tasks, stepped as T tasks x E episodes (see module doc).

    Attributes: ``name`` (the registry name), ``obs_dim``, ``act_dim`` (action size when
    continuous, number of actions when ``discrete``), ``discrete``, ``horizon``, and
    ``task_shapes``: for each task key, the shape of one task's value (``()`` for a scalar).
    After ``reset``, ``T`` and ``E`` hold the batch being stepped. ``close()`` releases
    whatever the distribution holds (the cheetah's MuJoCo envs); a no-op for the torch ones.
    """

    name: str = "base"
    obs_dim: int
    act_dim: int
    discrete: bool
    horizon: int
    task_shapes: dict[str, tuple[int, ...]]

    def __init__(self) -> None:
        self._tasks: dict[str, Tensor] | None = None
        self._t = 0
        self._done: Tensor | None = None
        self.T = 0
        self.E = 0

    # -- public contract -------------------------------------------------------------------

    def sample_tasks(self, n: int, seed: int) -> dict[str, Tensor]:
        """Draw ``n`` tasks; the result depends only on ``(n, seed)``."""
        positive_int(n, "n")
        tasks = self._sample_tasks(n, seeded_generator(seed))
        self.check_tasks(tasks)
        return tasks

    def check_tasks(self, tasks) -> int:
        """Validate a task dict (keys, shapes, finite values); returns the number of tasks T."""
        if not isinstance(tasks, dict):
            raise TypeError(f"{self.name}: tasks must be a dict of tensors, got "
                            f"{type(tasks).__name__}")
        if set(tasks) != set(self.task_shapes):
            raise ValueError(f"{self.name}: tasks must have the keys {sorted(self.task_shapes)}, "
                             f"got {sorted(tasks)}")
        n = None
        for key, shape in self.task_shapes.items():
            value = tasks[key]
            if not isinstance(value, Tensor):
                raise TypeError(f"{self.name}: tasks[{key!r}] must be a tensor, got "
                                f"{type(value).__name__}")
            if value.dim() != 1 + len(shape) or tuple(value.shape[1:]) != shape:
                raise ValueError(f"{self.name}: tasks[{key!r}] must have shape [T, "
                                 f"{', '.join(map(str, shape))}]".replace(", ]", "]")
                                 + f", got {list(value.shape)}")
            if n is None:
                n = value.shape[0]
            elif value.shape[0] != n:
                raise ValueError(f"{self.name}: every task tensor needs the same leading size T; "
                                 f"tasks[{key!r}] has {value.shape[0]}, expected {n}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"{self.name}: tasks[{key!r}] has NaN or inf values")
        if not n:
            raise ValueError(f"{self.name}: tasks must hold at least one task, got T=0")
        self._check_task_values(tasks)
        return n

    def reset(self, tasks: dict[str, Tensor], episodes: int, seed: int) -> Tensor:
        """Start E = ``episodes`` episodes of each of the T tasks; returns obs [T, E, obs_dim]."""
        T = self.check_tasks(tasks)
        E = positive_int(episodes, "episodes")
        seeded_generator(seed)  # validates seed
        tasks = {k: v.detach().to("cpu") for k, v in tasks.items()}
        obs = self._reset(tasks, E, seed)
        self._tasks, self.T, self.E, self._t = tasks, T, E, 0
        self._done = torch.zeros(T, E, dtype=torch.bool)
        return obs

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Advance every episode by one step; see the module docstring for shapes."""
        if self._tasks is None:
            raise ValueError(f"{self.name}: step() called before reset()")
        if bool(self._done.all()):
            raise ValueError(f"{self.name}: every episode has ended (step {self._t} of horizon "
                             f"{self.horizon}); call reset() first")
        actions = self._check_actions(actions)
        obs, reward, done, info = self._step(actions)
        self._t += 1
        done = done | self._done
        if self._t >= self.horizon:
            done = torch.ones_like(done)
        self._done = done
        return obs, reward, done.clone(), info

    def close(self) -> None:
        """Release external resources (none here; subclasses holding simulators override)."""

    # -- helpers ---------------------------------------------------------------------------

    def _check_actions(self, actions) -> Tensor:
        if not isinstance(actions, Tensor):
            raise TypeError(f"{self.name}: actions must be a torch.Tensor, got "
                            f"{type(actions).__name__}")
        T, E = self.T, self.E
        actions = actions.detach().to("cpu")
        if self.discrete:
            if actions.is_floating_point() or actions.is_complex() or actions.dtype == torch.bool:
                raise TypeError(f"{self.name}: discrete actions must be an integer tensor "
                                f"(int64), got {actions.dtype}")
            if tuple(actions.shape) != (T, E):
                raise ValueError(f"{self.name}: actions must have shape [T, E] = [{T}, {E}], "
                                 f"got {list(actions.shape)}")
            if actions.numel() and (actions.min() < 0 or actions.max() >= self.act_dim):
                raise ValueError(f"{self.name}: actions must lie in [0, {self.act_dim}), got "
                                 f"values in [{int(actions.min())}, {int(actions.max())}]")
            return actions.long()
        if not actions.is_floating_point():
            raise TypeError(f"{self.name}: continuous actions must be a floating-point tensor "
                            f"(float32), got {actions.dtype}")
        if tuple(actions.shape) != (T, E, self.act_dim):
            raise ValueError(f"{self.name}: actions must have shape [T, E, act_dim] = "
                             f"[{T}, {E}, {self.act_dim}], got {list(actions.shape)}")
        if not torch.isfinite(actions).all():
            raise ValueError(f"{self.name}: actions contain NaN or inf (step {self._t})")
        return actions.float()

    def _check_task_values(self, tasks: dict[str, Tensor]) -> None:
        """Distribution-specific range checks on valid-shaped tasks (override as needed)."""

    def _sample_tasks(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def _reset(self, tasks: dict[str, Tensor], episodes: int, seed: int) -> Tensor:
        raise NotImplementedError

    def _step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        kind = "discrete" if self.discrete else "continuous"
        return (f"{type(self).__name__}(name={self.name!r}, obs_dim={self.obs_dim}, "
                f"act_dim={self.act_dim} {kind}, horizon={self.horizon})")
