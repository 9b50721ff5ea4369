"""Batched recurrent trial sampler (RL^2, Duan et al. 2016, section 2.2).

A *trial* is ``n`` consecutive episodes of one task played by one recurrent policy whose
state is carried across the episode boundaries and reset between trials. :func:`sample_trials`
plays E trials of each of T tasks at once: every step of every trial is one batched call of
the policy (``T*E`` rows) and one batched step of the task distribution (pure torch for the
bandits, tabular MDPs and 2D navigation; gymnasium's vector env for the cheetah).

Episode ``k`` of every trial starts together (``dist.reset``); an episode that ends early
(2D navigation at the goal) waits, its state frozen, until every episode ``k`` has ended.
Each trial's real steps are stored *packed*: step ``l`` of a trial's row is its ``l``-th real
step, the padding comes after its last one. So the whole trial is one sequence that a GRU or
a causal attention model reads in one call (:meth:`SequencePolicy.forward`), and it sees the
same inputs the step-by-step rollout saw.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .envs.base import TaskDistribution, positive_int, seeded_generator
from .recurrent import SequencePolicy, no_action, step_input
from .sampler import Rollout, _check_finite


@dataclasses.dataclass
class TrialRollout(Rollout):
    """E trials of each of T tasks, ``L = episodes * horizon`` packed steps each.

    * ``obs [T, E, L, obs_dim]``, ``actions [T, E, L]`` int64 / ``[T, E, L, act_dim]``,
      ``rewards [T, E, L]``, ``mask [T, E, L]`` (1 for real steps: a prefix of each row)
    * ``done [T, E, L]`` bool: the step ended an episode
    * ``episode [T, E, L]`` int64: the episode (0 .. ``episodes - 1``) of each step; padding
      holds ``episodes``
    * ``episodes``: n, episodes per trial
    * ``states``: ``[T, E, L, S]``, the policy state each step's action was chosen from
      (only when sampled with ``keep_states=True`` and the state is a ``[N, S]`` tensor)

    ``returns()`` (from :class:`~fastmeta.rl.sampler.Rollout`) is each trial's total return.
    """

    done: Tensor = None
    episode: Tensor = None
    episodes: int = 1
    states: Tensor | None = None

    def to(self, device) -> "TrialRollout":
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if torch.is_tensor(getattr(self, f.name))}
        return dataclasses.replace(self, **moved)

    def episode_returns(self) -> Tensor:
        """``[T, E, episodes]``: the undiscounted return of each episode of each trial."""
        out = torch.zeros(*self.rewards.shape[:2], self.episodes + 1, dtype=self.rewards.dtype)
        out.scatter_add_(2, self.episode, self.rewards * self.mask)
        return out[..., :-1]

    def flat_trials(self) -> dict[str, Tensor]:
        """``obs, actions, rewards, mask, done`` as ``[T*E, L, ...]`` views (one row per trial)."""
        N = self.T * self.E
        return {k: getattr(self, k).reshape(N, *getattr(self, k).shape[2:])
                for k in ("obs", "actions", "rewards", "mask", "done")}


def sample_trials(dist: TaskDistribution, policy: SequencePolicy, tasks: dict[str, Tensor],
                  trials: int, episodes: int, seed: int, generator: torch.Generator | None = None,
                  deterministic: bool = False, keep_states: bool = False) -> TrialRollout:
    """Play ``trials`` trials of ``episodes`` episodes of every task in ``tasks``.

    Args:
        dist: the task distribution (``fastmeta.rl.make(name)``).
        policy: a :class:`~fastmeta.rl.recurrent.SequencePolicy` (GRU or SNAIL).
        tasks: ``dist.sample_tasks(T, seed)``; trial ``e`` of task ``t`` is row ``t*E + e``.
        trials: E, trials per task (each from a fresh policy state).
        episodes: n, episodes per trial (the hidden state is carried across them).
        seed: seeds the environment: episode ``k`` is reset with a seed drawn from ``seed``.
        generator: the policy's sampling randomness (None: torch's global generator).
        deterministic: take the most likely action instead of sampling.
        keep_states: also return the policy state before every step (``states``).

    Returns:
        :class:`TrialRollout`, run under ``torch.no_grad()``.

    Raises:
        TypeError/ValueError for a bad ``dist``, ``policy``, counts or seed; ValueError naming
        the step, task and trial when an observation or reward of a real step is NaN/inf.
    """
    if not isinstance(dist, TaskDistribution):
        raise TypeError(f"dist must be a TaskDistribution, got {type(dist).__name__}")
    if not isinstance(policy, SequencePolicy):
        raise TypeError(f"policy must be a fastmeta.rl.recurrent.SequencePolicy, got "
                        f"{type(policy).__name__}")
    if ((policy.obs_dim, policy.act_dim, policy.discrete)
            != (dist.obs_dim, dist.act_dim, dist.discrete)):
        raise ValueError(f"policy (obs_dim {policy.obs_dim}, act_dim {policy.act_dim}, discrete "
                         f"{policy.discrete}) does not fit {dist.name} (obs_dim {dist.obs_dim}, "
                         f"act_dim {dist.act_dim}, discrete {dist.discrete})")
    E, n = positive_int(trials, "trials"), positive_int(episodes, "episodes")
    reset_seeds = torch.randint(0, 2**62, (n,), generator=seeded_generator(seed)).tolist()
    T = dist.check_tasks(tasks)
    N, H, A = T * E, dist.horizon, dist.act_dim
    L = n * H
    act_tail = () if dist.discrete else (A,)
    p = next(policy.parameters())
    buf = {"obs": torch.zeros(N, L, dist.obs_dim), "rewards": torch.zeros(N, L),
           "mask": torch.zeros(N, L),
           "actions": torch.zeros(N, L, *act_tail,
                                  dtype=torch.long if dist.discrete else torch.float32),
           "done": torch.zeros(N, L, dtype=torch.bool),
           "episode": torch.full((N, L), n, dtype=torch.long)}
    rows = torch.arange(N)
    pos = torch.zeros(N, dtype=torch.long)
    prev_a, prev_r, prev_d = no_action((N,), A, dist.discrete), torch.zeros(N), torch.zeros(N)
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        state = policy.initial_state(N)
        states = (torch.zeros(N, L, state.shape[-1]) if keep_states and torch.is_tensor(state)
                  else None)
        for k in range(n):
            obs = dist.reset(tasks, E, reset_seeds[k])
            alive = torch.ones(N, dtype=torch.bool)
            for h in range(H):
                _check_finite(dist, "observation", obs, alive.view(T, E), k * H + h)
                o = obs.reshape(N, -1)
                x = step_input(o, prev_a, prev_r, prev_d, A, dist.discrete).to(p.device, p.dtype)
                if states is not None:
                    states[rows[alive], pos[alive]] = state[alive].float().cpu()
                out, state = policy.step(x, state, pos.to(p.device), alive.to(p.device))
                a = policy.sample(out, generator, deterministic).cpu()
                next_obs, rew, done, _ = dist.step(a.view(T, E, *act_tail))
                _check_finite(dist, "reward", rew, alive.view(T, E), k * H + h)
                r, d = rew.reshape(N), done.reshape(N)
                i, at = rows[alive], pos[alive]
                for key, val in (("obs", o), ("actions", a), ("rewards", r), ("done", d)):
                    buf[key][i, at] = val[alive]
                buf["mask"][i, at] = 1.0
                buf["episode"][i, at] = k
                keep = alive if dist.discrete else alive.unsqueeze(-1)
                prev_a = torch.where(keep, a, prev_a)
                prev_r = torch.where(alive, r, prev_r)
                prev_d = torch.where(alive, d.float(), prev_d)
                pos += alive.long()
                alive = alive & ~d
                if not bool(alive.any()):
                    break
                obs = next_obs
    policy.train(was_training)
    shaped = {k: v.view(T, E, *v.shape[1:]) for k, v in buf.items()}
    return TrialRollout(**shaped, episodes=n,
                        states=None if states is None else states.view(T, E, L, -1))
