"""Vectorised rollout sampler: T tasks x E episodes into padded ``[T, E, H, ...]`` tensors.

The layout is the one fastmeta's task-batched ops consume: task first, then every sample of
that task (``Rollout.flat()`` merges episodes and steps into one ``[T, E*H, ...]`` axis).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .envs.base import TaskDistribution


@dataclasses.dataclass
class Rollout:
    """Padded rollouts of T tasks x E episodes x H steps (H = the distribution's horizon).

    * ``obs`` ``[T, E, H, obs_dim]`` float32: ``obs[..., h, :]`` is the observation the
      action of step h was chosen from
    * ``actions`` ``[T, E, H, act_dim]`` float32 (discrete: ``[T, E, H]`` int64)
    * ``rewards`` ``[T, E, H]`` float32, the reward of step h
    * ``mask`` ``[T, E, H]`` float32: 1 for steps that happened, 0 for padding after an
      episode ended (obs, actions and rewards are 0 there)
    * ``next_obs`` ``[T, E, H, obs_dim]`` float32: the observation step h led to (also after the
      last step of an episode, which ``obs`` does not hold; off-policy agents store (s, a, r, s'));
      None when a Rollout is built without it
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    next_obs: Tensor | None = None

    @property
    def T(self) -> int:
        return self.rewards.shape[0]

    @property
    def E(self) -> int:
        return self.rewards.shape[1]

    @property
    def H(self) -> int:
        return self.rewards.shape[2]

    def to(self, device) -> "Rollout":
        """A copy with every tensor on ``device``."""
        # not dataclasses.astuple: it deep-copies every tensor first
        return Rollout(*(None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                         for f in dataclasses.fields(self)))

    def flat(self) -> "Rollout":
        """The same data as views ``[T, E*H, ...]`` (episodes and steps merged per task)."""
        T, EH = self.T, self.E * self.H
        return Rollout(self.obs.view(T, EH, -1),
                       self.actions.view(T, EH, *self.actions.shape[3:]),
                       self.rewards.view(T, EH), self.mask.view(T, EH),
                       None if self.next_obs is None else self.next_obs.view(T, EH, -1))

    def returns(self) -> Tensor:
        """Undiscounted return of every episode, ``[T, E]``."""
        return (self.rewards * self.mask).sum(-1)


def _check_finite(dist: TaskDistribution, field: str, value: Tensor, valid: Tensor, h: int):
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return
    bad = ~finite
    if value.dim() > valid.dim():
        bad = bad.flatten(valid.dim()).any(-1)
    bad &= valid
    if bool(bad.any()):
        t, e = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{dist.name}: {field} has NaN or inf at step {h} (task {t}, "
                         f"episode {e}; {int(bad.sum())} entries in that step)")


def sample(dist: TaskDistribution, policy: Callable[[Tensor], Tensor],
           tasks: dict[str, Tensor], episodes: int, seed: int) -> Rollout:
    """Roll out ``policy`` for ``episodes`` episodes of each task of ``tasks``.

    Args:
        dist: the task distribution (``fastmeta.rl.make(name)``).
        policy: ``policy(obs [T, E, obs_dim]) -> actions`` (``[T, E, act_dim]`` float, or
            ``[T, E]`` int64 when ``dist.discrete``); it owns its randomness (e.g. a
            ``torch.Generator`` it was given), so a seeded policy gives a reproducible rollout.
        tasks: ``dist.sample_tasks(T, seed)`` or any dict of the same shapes.
        episodes: E, episodes per task.
        seed: seeds ``dist.reset`` (initial states, environment noise).

    Returns:
        :class:`Rollout` with H = ``dist.horizon``. Runs under ``torch.no_grad()``; stops
        early once every episode has ended.

    Raises:
        ValueError naming the distribution, the field and the step when an observation or a
        reward of a step that happened is NaN/inf; the distribution's ValueError/TypeError
        for bad tasks or actions (wrong shape, dtype, NaN).

    Example::

        dist = fastmeta.rl.make("nav2d")
        tasks = dist.sample_tasks(20, seed=0)
        ro = sample(dist, lambda obs: 0.1 * torch.randn(*obs.shape), tasks, episodes=20, seed=0)
        ro.rewards.shape  # [20, 20, 100]
    """
    if not isinstance(dist, TaskDistribution):
        raise TypeError(f"dist must be a TaskDistribution, got {type(dist).__name__}")
    if not callable(policy):
        raise TypeError(f"policy must be callable, got {type(policy).__name__}")
    with torch.no_grad():
        obs = dist.reset(tasks, episodes, seed)
        T, E, H = dist.T, dist.E, dist.horizon
        act_shape = (T, E, H) if dist.discrete else (T, E, H, dist.act_dim)
        # Only per-step slices are touched in the loop: an op over the whole [T, E, H] buffer
        # is multi-threaded, and at 2 threads on a busy 2-core machine each such op cost
        # ~15 ms (a thread waiting for a descheduled partner), more than the whole rollout.
        buf_obs = torch.empty(T, E, H, dist.obs_dim)
        buf_next = torch.empty(T, E, H, dist.obs_dim)
        buf_act = torch.empty(act_shape, dtype=torch.long if dist.discrete else torch.float32)
        buf_rew = torch.empty(T, E, H)
        mask = torch.empty(T, E, H)
        alive = torch.ones(T, E, dtype=torch.bool)
        all_alive, steps = True, H
        for h in range(H):
            _check_finite(dist, "observation", obs, alive, h)
            actions = policy(obs)
            next_obs, rew, done, _ = dist.step(actions)  # checks the actions
            _check_finite(dist, "reward", rew, alive, h)
            act, nxt = actions.detach(), next_obs
            if not all_alive:  # what an env returns after an episode ended is not data
                live = alive.view(T, E, *([1] * (act.dim() - 2)))
                obs = torch.where(alive[..., None], obs, 0.0)
                act = torch.where(live.to(act.device), act, torch.zeros((), dtype=act.dtype))
                rew = torch.where(alive, rew, 0.0)
                nxt = torch.where(alive[..., None], nxt, 0.0)
            buf_obs[:, :, h] = obs
            buf_next[:, :, h] = nxt
            buf_act[:, :, h] = act
            buf_rew[:, :, h] = rew
            mask[:, :, h] = alive
            alive = alive & ~done
            if not bool(alive.any()):
                steps = h + 1
                break
            all_alive = all_alive and bool(alive.all())
            obs = next_obs
        for buf in (buf_obs, buf_act, buf_rew, mask, buf_next):  # steps never taken
            buf[:, :, steps:] = 0
    return Rollout(buf_obs, buf_act, buf_rew, mask, buf_next)
