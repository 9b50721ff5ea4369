"""PEARL: off-policy meta-RL with probabilistic context variables (Rakelly et al., "Efficient
Off-Policy Meta-Reinforcement Learning via Probabilistic Context Variables", ICML 2019).

A latent task variable z conditions a soft actor-critic (fastmeta.rl.sac); a permutation-
invariant encoder infers q(z | c) from a context of transitions (fastmeta.rl.context, the
product of Gaussian factors through ``fastmeta.ops.gaussian_product``). Meta-training
(Algorithm 1 of the paper)::

    once: for every train task, collect episodes with z ~ prior          -> replay, context buffer
    each iteration, for K sampled train tasks (all stepped together):
        clear the task's context buffer (context = recent experience)
        collect E_prior episodes with z ~ N(0, I)                       -> replay and context buffer
        collect E_post episodes with z ~ q(z | context from the buffer) -> replay
    then `updates` gradient steps, each on B train tasks:
        c ~ context buffer, batch ~ replay;  z ~ q(z | c)  (reparameterised)
        critic + encoder:  L_Q(cat(s, z), a, r, cat(s', z))
                           + kl_weight * sum_b KL(q(z|c_b) || N(0, I))
        actor, alpha:      SAC losses on cat(s, z.detach())

Test time (:meth:`PEARL.adapt`), posterior sampling: episode 1 with z ~ prior, episode k > 1 with
z ~ q(z | every transition of episodes 1..k-1); actions are the policy's mean. Episode ends at
the horizon are time limits, not terminals: the targets always bootstrap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmeta.rl.context import ContextEncoder, kl_to_prior, transition_features
from fastmeta.rl.envs.base import TaskDistribution
from fastmeta.rl.replay import TaskReplay
from fastmeta.rl.sac import SAC
from fastmeta.rl.sampler import Rollout, sample


class PEARL:
    """The PEARL agent for one task distribution and a fixed set of training tasks.

    Args:
        dist: a continuous-action :class:`fastmeta.rl.TaskDistribution`.
        train_tasks: the N training tasks (``dist.sample_tasks(N, seed)``).
        latent_dim: size of z (paper: 5). hidden: MLP widths of encoder, actor and critics.
        lr: Adam step of every network and of the temperature (paper: 3e-4; 1e-3 learned nav2d
            faster here but degraded later, bench/results/pearl.md). kl_weight: the KL's coefficient
            (paper's lambda 0.1, applied to the sum over the meta-batch as in their code).
        meta_batch: B tasks per gradient step. batch_size: transitions per task per step.
        context_size: transitions per task in the encoder's context during training.
        capacity: replay transitions kept per task. context_capacity: the context buffer's.
        gamma, tau, reward_scale: SAC's discount, target rate and reward multiplier (the CLI uses
            PEARL's 5).
        dense_critic: train the critic on ``dist.dense_reward(tasks, next_obs)`` instead of the
            stored reward (PEARL's code does so for sparse-reward tasks; the encoder and every
            return reported still use the environment's sparse reward). policy_reg, fixed_alpha:
            see fastmeta.rl.sac (fixed_alpha None: automatic temperature, target entropy
            -act_dim).
        seed: seeds the agent's generator (z, actions and replay draws of the updates).

    State for exact resume: :meth:`state_dict` holds networks, optimisers, both buffers and the
    generator. Actions sent to ``dist`` are ``tanh`` outputs times ``dist.max_action`` (or 1).
    """

    def __init__(self, dist: TaskDistribution, train_tasks: dict[str, Tensor], latent_dim: int = 5,
                 hidden: tuple[int, ...] = (64, 64), lr: float = 1e-3, kl_weight: float = 0.1,
                 meta_batch: int = 8, batch_size: int = 64, context_size: int = 64,
                 capacity: int = 20_000, context_capacity: int = 400, gamma: float = 0.99,
                 tau: float = 0.005, reward_scale: float = 1.0, dense_critic: bool = False,
                 policy_reg: float = 0.0, fixed_alpha: float | None = None, seed: int = 0):
        if not isinstance(dist, TaskDistribution) or dist.discrete:
            raise TypeError(f"PEARL needs a continuous-action TaskDistribution, got {dist!r}")
        self.n_train = dist.check_tasks(train_tasks)
        if meta_batch > self.n_train:
            raise ValueError(f"meta_batch ({meta_batch}) must be <= the number of train tasks "
                             f"({self.n_train})")
        if dense_critic and not hasattr(dist, "dense_reward"):
            raise ValueError(f"dense_critic=True needs a distribution with dense_reward(), "
                             f"{dist.name} has none")
        self.dist, self.train_tasks, self.dense_critic = dist, train_tasks, dense_critic
        self.meta_batch, self.batch_size, self.context_size = meta_batch, batch_size, context_size
        self.kl_weight, self.reward_scale = float(kl_weight), float(reward_scale)
        self.action_scale = float(getattr(dist, "max_action", 1.0))
        o, a = dist.obs_dim, dist.act_dim
        self.encoder = ContextEncoder(o, a, latent_dim, hidden)
        self.sac = SAC(o + latent_dim, a, hidden, gamma=gamma, tau=tau, policy_reg=policy_reg,
                       fixed_alpha=fixed_alpha)
        self.opt_q = torch.optim.Adam([*self.sac.critic.parameters(), *self.encoder.parameters()],
                                      lr=lr)
        self.opt_pi = torch.optim.Adam(self.sac.actor.parameters(), lr=lr)
        self.opt_alpha = torch.optim.Adam([self.sac.log_alpha], lr=lr)
        self.replay = TaskReplay(self.n_train, capacity, o, a)
        self.context = TaskReplay(self.n_train, context_capacity, o, a)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    # ---- acting -------------------------------------------------------------------------------

    def actor(self, z: Tensor, generator: torch.Generator | None = None,
              deterministic: bool = False):
        """``callable(obs [T, E, obs_dim]) -> actions [T, E, act_dim]`` for the sampler, with the
        latent ``z [T, E, D]`` fixed for the episode."""

        def act(obs: Tensor) -> Tensor:
            x = torch.cat([obs, z.to(obs.dtype)], dim=-1)
            return self.action_scale * self.sac.act(x, generator, deterministic)

        return act

    def posterior(self, context: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``q(z | context)``: ``(mu [T, D], var [T, D])`` (see
        :meth:`ContextEncoder.posterior`)."""
        return self.encoder.posterior(context, mask)

    def _store(self, task_ids: Tensor, ro: Rollout, to_context: bool) -> Rollout:
        # the buffers keep the policy's action in [-1, 1], the space the critic and actor use
        ro = Rollout(ro.obs, ro.actions / self.action_scale, ro.rewards, ro.mask, ro.next_obs)
        self.replay.add_rollout(task_ids, ro)
        if to_context:
            self.context.add_rollout(task_ids, ro)
        return ro

    @torch.no_grad()
    def collect(self, task_ids: Tensor, episodes: int, seed: int, posterior: bool, to_context: bool,
                generator: torch.Generator) -> Rollout:
        """Roll out train tasks ``task_ids [K]`` for ``episodes`` episodes each, all stepped
        together, z drawn once per episode from the prior or from the posterior of a context
        sampled from the task's context buffer; the transitions go to the replay (and, if
        ``to_context``, to the context buffer). Returns the Rollout as stored: actions in the
        policy's [-1, 1] space (the env received them times ``action_scale``)."""
        tasks = {k: v[task_ids] for k, v in self.train_tasks.items()}
        K, D = task_ids.shape[0], self.latent_dim
        if posterior:
            c = self.context.sample(task_ids, self.context_size, generator)
            mu, var = self.posterior(transition_features(c["obs"], c["actions"], c["rewards"],
                                                         c["next_obs"]))
            z = self.encoder.sample(mu[:, None].expand(K, episodes, D),
                                    var[:, None].expand(K, episodes, D), generator)
        else:
            z = torch.randn(K, episodes, D, generator=generator)
        ro = sample(self.dist, self.actor(z, generator), tasks, episodes, seed)
        return self._store(task_ids, ro, to_context)

    @torch.no_grad()
    def adapt(self, tasks: dict[str, Tensor], episodes: int, seed: int,
              generator: torch.Generator) -> Tensor:
        """Posterior sampling on (held-out) ``tasks``: ``episodes`` episodes in sequence, all tasks
        together; returns the undiscounted returns ``[T, episodes]`` (column 0: prior only)."""
        T = self.dist.check_tasks(tasks)
        feats, masks, returns = [], [], []
        for k in range(episodes):
            # every transition so far; the mask drops the padding of episodes that ended early
            if feats:
                mu, var = self.posterior(torch.cat(feats, dim=1), torch.cat(masks, dim=1))
                z = self.encoder.sample(mu, var, generator)[:, None]
            else:
                z = torch.randn(T, 1, self.latent_dim, generator=generator)
            ro = sample(self.dist, self.actor(z, generator, deterministic=True), tasks, 1, seed + k)
            returns.append(ro.returns()[:, 0])
            f = ro.flat()
            feats.append(transition_features(f.obs, f.actions / self.action_scale, f.rewards,
                                             f.next_obs))
            masks.append(f.mask)
        return torch.stack(returns, dim=1)

    # ---- learning -----------------------------------------------------------------------------

    def update(self) -> dict[str, float]:
        """One gradient step of critic + encoder, actor and (if automatic) temperature on
        ``meta_batch`` tasks."""
        g = self.generator
        ids = torch.randperm(self.n_train, generator=g)[: self.meta_batch]
        c = self.context.sample(ids, self.context_size, g)
        b = self.replay.sample(ids, self.batch_size, g)
        mu, var = self.posterior(transition_features(c["obs"], c["actions"], c["rewards"],
                                                     c["next_obs"]))
        kl = kl_to_prior(mu, var).sum()
        z = self.encoder.sample(mu, var, g)
        zb = z[:, None].expand(-1, self.batch_size, -1)
        x = torch.cat([b["obs"], zb], dim=-1).flatten(0, 1)
        x2 = torch.cat([b["next_obs"], zb.detach()], dim=-1).flatten(0, 1)
        if self.dense_critic:
            b["rewards"] = self.dist.dense_reward({k: v[ids] for k, v in self.train_tasks.items()},
                                                  b["next_obs"])
        r = self.reward_scale * b["rewards"].flatten()
        y = self.sac.q_target(r, x2, torch.ones_like(r), g)
        q_loss = self.sac.critic_loss(x, b["actions"].flatten(0, 1), y)
        self.opt_q.zero_grad(set_to_none=True)
        (q_loss + self.kl_weight * kl).backward()
        self.opt_q.step()
        actor_loss, alpha_loss, logp = self.sac.actor_alpha_loss(x.detach(), g)
        self.opt_pi.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.opt_pi.step()
        if self.sac.learn_alpha:
            self.opt_alpha.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.opt_alpha.step()
        self.sac.update_target()
        return {"q_loss": q_loss.item(), "actor_loss": actor_loss.item(),
                "kl": kl.item() / self.meta_batch, "alpha": self.sac.alpha.item(),
                "entropy": -logp.item()}

    # ---- checkpoint (the Trainer calls these as on a module) -----------------------------------

    def train(self, mode: bool = True) -> "PEARL":
        self.encoder.train(mode)
        self.sac.train(mode)
        return self

    def state_dict(self) -> dict:
        return {"encoder": self.encoder.state_dict(), "sac": self.sac.state_dict(),
                "opt_q": self.opt_q.state_dict(), "opt_pi": self.opt_pi.state_dict(),
                "opt_alpha": self.opt_alpha.state_dict(), "replay": self.replay.state_dict(),
                "context": self.context.state_dict(), "generator": self.generator.get_state(),
                "train_tasks": dict(self.train_tasks)}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.train_tasks.items():
            if not torch.equal(state["train_tasks"][k], v):
                raise ValueError(f"checkpoint was written for other training tasks ({k!r} differs)")
        self.encoder.load_state_dict(state["encoder"])
        self.sac.load_state_dict(state["sac"])
        for k in ("opt_q", "opt_pi", "opt_alpha"):
            getattr(self, k).load_state_dict(state[k])
        self.replay.load_state_dict(state["replay"])
        self.context.load_state_dict(state["context"])
        self.generator.set_state(state["generator"])
