"""RL^2: fast reinforcement learning via slow reinforcement learning (Duan et al. 2016;
Wang et al. 2016, "Learning to reinforcement learn").

The "fast" learner is the hidden state of a recurrent policy; the "slow" learner is an
ordinary RL algorithm (here PPO) that trains the policy's weights to maximise the return of a
whole *trial*: ``n`` episodes of one task, drawn afresh for every trial, with the hidden state
carried across the episode boundaries and reset between trials. To do well the policy must
explore in the first episodes and exploit what it found in the later ones.

Pseudo-code of one iteration (:meth:`RL2.step`)::

    tasks  ~ p(M)                                   T tasks
    trials = play E trials of n episodes per task   hidden state reset per trial only
    x      = [obs, previous action, reward, done]   per step (rl.recurrent.trial_inputs)
    A, R   = GAE over each trial (discount across the episode boundaries)
    PPO:   epochs x minibatches of trials, each policy pass from the trial's first step (BPTT)

The policy is :class:`fastmeta.rl.recurrent.GRUPolicy` (Duan et al.) or
:class:`fastmeta.rl.recurrent_snail.SNAILPolicy` (Mishra et al. 2018, section 4.2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastmeta.rl.envs.base import TaskDistribution
from fastmeta.rl.ppo import PPO, PPOConfig
from fastmeta.rl.recurrent import SequencePolicy, trial_inputs
from fastmeta.rl.trials import TrialRollout, sample_trials


class RL2(nn.Module):
    """The RL^2 agent: a sequence policy trained by PPO on whole trials.

    Args:
        policy: a :class:`~fastmeta.rl.recurrent.SequencePolicy` (GRU or SNAIL).
        config: :class:`~fastmeta.rl.ppo.PPOConfig` (Adam learning rate, clip, epochs, ...).

    The Adam state is part of the agent's ``state_dict`` (``get_extra_state``), so a
    checkpoint of the agent resumes the optimiser exactly.

    Example::

        dist = fastmeta.rl.make("bandit-k5-n10")
        agent = RL2(GRUPolicy(dist.obs_dim, dist.act_dim, dist.discrete, hidden=128))
        for i in range(1000):
            ro = agent.rollout(dist, dist.sample_tasks(250, seed=i), trials=1, episodes=1, seed=i)
            agent.step(ro)
    """

    def __init__(self, policy: SequencePolicy, config: PPOConfig | None = None):
        super().__init__()
        if not isinstance(policy, SequencePolicy):
            raise TypeError(f"policy must be a fastmeta.rl.recurrent.SequencePolicy, got "
                            f"{type(policy).__name__}")
        self.policy = policy
        self.ppo = PPO(policy, config)

    @property
    def config(self) -> PPOConfig:
        return self.ppo.cfg

    def get_extra_state(self) -> dict:
        return {"optimizer": self.ppo.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.ppo.optimizer.load_state_dict(state["optimizer"])

    def rollout(self, dist: TaskDistribution, tasks: dict[str, Tensor], trials: int, episodes: int,
                seed: int, generator: torch.Generator | None = None,
                deterministic: bool = False) -> TrialRollout:
        """``trials`` trials of ``episodes`` episodes per task (see
        :func:`~fastmeta.rl.trials.sample_trials`)."""
        return sample_trials(dist, self.policy, tasks, trials, episodes, seed, generator,
                             deterministic)

    def inputs(self, ro: TrialRollout) -> dict[str, Tensor]:
        """The policy inputs ``x [T*E, L, in_dim]`` and the PPO targets of a rollout, one row per
        trial."""
        f = ro.flat_trials()
        p = self.policy
        x = trial_inputs(f["obs"], f["actions"], f["rewards"], f["done"], p.act_dim, p.discrete)
        dev = next(p.parameters()).device
        return {"x": x.to(dev), "actions": f["actions"].to(dev), "rewards": f["rewards"].to(dev),
                "mask": f["mask"].to(dev)}

    def step(self, ro: TrialRollout, generator: torch.Generator | None = None) -> dict[str, float]:
        """One PPO update on the trials of ``ro``; statistics including the mean trial return
        (``return``) and the mean return of each episode of a trial (``episode_1``, ...)."""
        d = self.inputs(ro)
        stats = self.ppo.update(d["x"], d["actions"], d["rewards"], d["mask"], generator)
        return {**stats, **trial_summary(ro)}


def trial_summary(ro: TrialRollout) -> dict[str, float]:
    """Mean trial return (``return``) and mean return of episode k of a trial (``episode_k``)."""
    per_ep = ro.episode_returns().mean((0, 1))
    return {"return": float(ro.returns().mean()),
            **{f"episode_{k + 1}": float(r) for k, r in enumerate(per_ep)}}
