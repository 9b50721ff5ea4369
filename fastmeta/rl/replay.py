"""Per-task replay buffers as batched tensors (the off-policy store of PEARL, Rakelly et al. 2019).

One :class:`TaskReplay` holds N tasks' ring buffers at once: every field is one tensor
``[N, capacity, ...]``, with a write pointer and a size per task. Adding the transitions of T
tasks, clearing some tasks and sampling a batch for B tasks are each a few tensor operations,
never a Python loop over transitions or tasks.

Fields of a transition: ``obs [obs_dim]``, ``actions [act_dim]``, ``rewards []``, ``next_obs
[obs_dim]`` (float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

FIELDS = ("obs", "actions", "rewards", "next_obs")


class TaskReplay:
    """Ring buffers of ``capacity`` transitions for each of ``n_tasks`` tasks.

    Args:
        n_tasks, capacity: N tasks, transitions kept per task (the oldest are overwritten).
        obs_dim, act_dim: transition sizes.

    Example::

        buf = TaskReplay(40, 10_000, obs_dim=2, act_dim=2)
        buf.add(task_ids, obs, actions, rewards, next_obs, mask)   # [T, M, ...], mask [T, M]
        batch = buf.sample(task_ids[:8], 64, generator)          # dict of [8, 64, ...]
    """

    def __init__(self, n_tasks: int, capacity: int, obs_dim: int, act_dim: int):
        for what, v in (("n_tasks", n_tasks), ("capacity", capacity), ("obs_dim", obs_dim),
                        ("act_dim", act_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TaskReplay: {what} must be a positive int, got {v!r}")
        self.n_tasks, self.capacity = n_tasks, capacity
        self.obs_dim, self.act_dim = obs_dim, act_dim
        shapes = {"obs": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_obs": (obs_dim,)}
        self.data = {k: torch.zeros(n_tasks, capacity, *s) for k, s in shapes.items()}
        self.ptr = torch.zeros(n_tasks, dtype=torch.long)   # next slot to write, per task
        self.size = torch.zeros(n_tasks, dtype=torch.long)  # valid transitions, per task

    def _task_ids(self, task_ids, what: str = "task_ids") -> Tensor:
        if not isinstance(task_ids, Tensor) or task_ids.dtype != torch.long or task_ids.dim() != 1:
            raise TypeError(f"TaskReplay: {what} must be a 1-D int64 tensor, got "
                            f"{getattr(task_ids, 'dtype', type(task_ids).__name__)} "
                            f"{list(getattr(task_ids, 'shape', []))}")
        if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= self.n_tasks):
            raise ValueError(f"TaskReplay: {what} must lie in [0, {self.n_tasks}), got values in "
                             f"[{int(task_ids.min())}, {int(task_ids.max())}]")
        return task_ids

    def add(self, task_ids: Tensor, obs: Tensor, actions: Tensor, rewards: Tensor, next_obs: Tensor,
            mask: Tensor | None = None) -> None:
        """Append transitions ``[T, M, ...]`` to tasks ``task_ids [T]`` (distinct ids);
        ``mask [T, M]`` (1/True keeps a transition, e.g. a Rollout's mask) lets each task add a
        different number.

        Raises ValueError on wrong shapes, repeated task ids, NaN/inf values, or more than
        ``capacity`` transitions for one task in one call.
        """
        ids = self._task_ids(task_ids)
        T = ids.shape[0]
        if ids.unique().numel() != T:
            raise ValueError(f"TaskReplay.add: task_ids must be distinct, got {ids.tolist()}")
        values = {"obs": obs, "actions": actions, "rewards": rewards, "next_obs": next_obs}
        M = rewards.shape[1] if isinstance(rewards, Tensor) and rewards.dim() == 2 else None
        for k, v in values.items():
            want = (T, M, *self.data[k].shape[2:])
            if not isinstance(v, Tensor) or M is None or tuple(v.shape) != want:
                raise ValueError(f"TaskReplay.add: {k} must have shape [T, "
                                 f"M{', ...' * (len(want) > 2)}] = "
                                 f"{list(want) if M is not None else '[T, M]'} for T={T} task ids, "
                                 f"got {list(getattr(v, 'shape', [])) or type(v).__name__}")
            if not torch.isfinite(v).all():
                raise ValueError(f"TaskReplay.add: {k} has NaN or inf values")
        keep = torch.ones(T, M, dtype=torch.bool) if mask is None else mask.bool()
        if tuple(keep.shape) != (T, M):
            raise ValueError(f"TaskReplay.add: mask must have shape [T, M] = {[T, M]}, got "
                             f"{list(keep.shape)}")
        n = keep.sum(1)
        if bool((n > self.capacity).any()):
            raise ValueError(f"TaskReplay.add: at most capacity={self.capacity} transitions per "
                             f"task per call, got {int(n.max())}")
        # slot of the j-th kept transition of task t: (ptr_t + j) mod capacity
        order = keep.long().cumsum(1) - 1
        slot = (self.ptr[ids, None] + order) % self.capacity
        rows = ids[:, None].expand(T, M)[keep]
        cols = slot[keep]
        for k, v in values.items():
            self.data[k][rows, cols] = v[keep].to(self.data[k].dtype)
        self.ptr[ids] = (self.ptr[ids] + n) % self.capacity
        self.size[ids] = (self.size[ids] + n).clamp(max=self.capacity)

    def add_rollout(self, task_ids: Tensor, rollout) -> None:
        """:meth:`add` every step of a :class:`fastmeta.rl.Rollout` (with ``next_obs``) of tasks
        ``task_ids``."""
        if rollout.next_obs is None:
            raise ValueError("TaskReplay.add_rollout: the rollout has no next_obs (use "
                             "fastmeta.rl.sample)")
        f = rollout.flat()
        self.add(task_ids, f.obs, f.actions, f.rewards, f.next_obs, f.mask)

    def clear(self, task_ids: Tensor) -> None:
        """Forget every transition of tasks ``task_ids`` (PEARL's encoder buffer keeps only recent
        data)."""
        ids = self._task_ids(task_ids)
        self.ptr[ids] = 0
        self.size[ids] = 0

    def sample(self, task_ids: Tensor, n: int,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``n`` transitions drawn uniformly with replacement from each task of ``task_ids [B]``:
        a dict of ``[B, n, ...]`` tensors (keys :data:`FIELDS`). ValueError if a task is empty."""
        ids = self._task_ids(task_ids)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"TaskReplay.sample: n must be a positive int, got {n!r}")
        size = self.size[ids]
        if bool((size == 0).any()):
            empty = ids[size == 0].tolist()
            raise ValueError(f"TaskReplay.sample: tasks {empty} have no transitions (collect data "
                             "first)")
        u = torch.rand(ids.shape[0], n, generator=generator)
        # u * size may round up to size
        cols = torch.minimum((u * size[:, None]).long(), size[:, None] - 1)
        # slots [0, size) hold data whether or not the ring has wrapped
        return {k: v[ids[:, None], cols] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.data, "ptr": self.ptr, "size": self.size}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (checked whole before anything is overwritten)."""
        mine = self.state_dict()
        for k, cur in mine.items():
            if k not in state or tuple(state[k].shape) != tuple(cur.shape):
                raise ValueError(f"TaskReplay.load_state_dict: {k} must have shape "
                                 f"{list(cur.shape)}, got "
                                 f"{list(state[k].shape) if k in state else 'nothing'}")
        for k, cur in mine.items():
            cur.copy_(state[k])
