"""``python -m fastmeta rl rl2 --env bandit-k5-n10|bandit-k10-n100|tabular-mdp|nav2d|cheetah-vel
[--policy gru|snail]``: RL^2 (Duan et al. 2016) trained by PPO on whole trials.

Every iteration plays ``--trials`` trials of ``--episodes`` episodes of each of ``--tasks``
fresh tasks and takes one PPO update. The CSV and the PNG carry the mean return of each episode
of a trial (``episode_1``, ``episode_2``, ...: rising with k is what the hidden state learned);
``results.json`` holds the held-out mean trial return and each episode's return (+- 95% CI over
tasks) beside a uniformly random policy's.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fastmeta import rl
from fastmeta.cli.rl_common import (add_common_args, check_resume, run_dir_of, saved_args,
                                    stream_seed, write_results)
from fastmeta.learners import confidence_interval
from fastmeta.rl.envs.bandit import BernoulliBandit, greedy_returns
from fastmeta.rl.ppo import PPOConfig
from fastmeta.rl.recurrent import GRUPolicy
from fastmeta.rl.recurrent_snail import SNAILPolicy
from fastmeta.rl.rl2 import RL2
from fastmeta.train import Trainer, TrainConfig

HELP = "RL^2 (Duan et al. 2016): a GRU or SNAIL policy trained by PPO on trials of several episodes"
# per distribution: episodes per trial (the RL^2 paper: a bandit trial is one episode of n pulls,
# a tabular-MDP trial n = 10 episodes), tasks per iteration, GAE lambda, Gaussian init std, and the
# reward scale of the value targets (trial returns of ~100 in magnitude -> ~10). Bandits: 10 / n
# pulls, at most 1 (None below): with n = 100 and scale 1 the GRU learned to repeat its arm but
# not to condition on the reward in 80 iterations (bench/results/rl2.md); with 0.1 it did.
# k = 10, n = 100 reached 75+ only with `--tasks 50 --action-reward --lam 0.95` (rl2.md); these
# defaults stay those of the k = 5, n = 10 runs (and of the demo)
DEFAULTS = {
    "bandit": dict(episodes=1, tasks=250, lam=0.3, init_std=1.0, reward_scale=None),
    "tabular-mdp": dict(episodes=10, tasks=100, lam=0.3, init_std=1.0, reward_scale=0.1),
    "nav2d": dict(episodes=2, tasks=50, lam=0.95, init_std=0.1, reward_scale=0.1),
    "cheetah-vel": dict(episodes=2, tasks=20, lam=0.95, init_std=0.5, reward_scale=0.1),
    "cheetah-dir": dict(episodes=2, tasks=20, lam=0.95, init_std=0.5, reward_scale=0.1),
}
_TASKS, _ENV, _ACTIONS, _SHUFFLE = range(4)
_VAL_SET, _TEST_SET, _GREEDY = 10, 11, 12
# Held-out tasks rolled out at once: a SNAIL policy's caches hold ~1.3 MB per task at 100 steps
# (a 10,000-task evaluation in one piece was killed at 13.3 GB); 2,000 keeps the demo's one piece.
EVAL_CHUNK = 2000


def _defaults(env: str) -> dict:
    return DEFAULTS.get("bandit" if env.startswith("bandit") else env, DEFAULTS["nav2d"])


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="bandit-k5-n10", help="bandit-k{K}-n{N}, tabular-mdp, nav2d, "
                   "cheetah-vel, cheetah-dir")
    p.add_argument("--policy", choices=("gru", "snail"), default="gru",
                   help="GRU (Duan et al.) or SNAIL (Mishra et al. 2018) policy")
    p.add_argument("--hidden", type=int, default=128, help="GRU hidden size (SNAIL: hidden / 4 "
                   "channels, 128 -> the paper's 32)")
    p.add_argument("--action-reward", action="store_true", help="GRU: also feed onehot(previous "
                   "action) * previous reward (discrete actions)")
    p.add_argument("--value-gru", action="store_true", help="GRU: a separate GRU for the value")
    p.add_argument("--env-steps", type=float, default=None, help="training budget in environment "
                   "steps (sets --iterations)")
    p.add_argument("--iterations", type=int, default=500, help="PPO iterations")
    p.add_argument("--tasks", type=int, default=None, help="tasks per iteration (default: per env)")
    p.add_argument("--trials", type=int, default=1, help="trials per task and iteration")
    p.add_argument("--episodes", type=int, default=None, help="episodes per trial (bandits 1, "
                   "tabular-mdp 10, nav2d and cheetah 2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per iteration")
    p.add_argument("--minibatches", type=int, default=4, help="minibatches of trials per epoch")
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--lam", type=float, default=None, help="GAE lambda (bandits, tabular 0.3; else "
                   "0.95)")
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--entropy", type=float, default=0.003, help="entropy bonus coefficient")
    p.add_argument("--reward-scale", type=float, default=None,
                   help="scale of the rewards the value function learns (default: bandits "
                   "min(1, 10 / n pulls), else 0.1)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out validation every N "
                   "iterations (0: never)")
    p.add_argument("--val-tasks", type=int, default=100)
    p.add_argument("--eval-tasks", type=int, default=1000, help="held-out tasks of the final "
                   "evaluation")
    add_common_args(p)


def _fill_defaults(args: argparse.Namespace, dist) -> None:
    d = _defaults(args.env)
    args.episodes = args.episodes or d["episodes"]
    args.tasks = args.tasks or d["tasks"]
    args.lam = d["lam"] if args.lam is None else args.lam
    if args.reward_scale is None:
        args.reward_scale = d["reward_scale"] or min(1.0, 10.0 / dist.horizon)
    per_iter = args.tasks * args.trials * args.episodes * dist.horizon
    if args.env_steps is not None:
        args.iterations = max(1, math.ceil(args.env_steps / per_iter))
    args.steps_per_iteration = per_iter  # at most: nav2d episodes may end early


def build_agent(args: argparse.Namespace, dist) -> RL2:
    init_std = _defaults(args.env)["init_std"]
    if args.policy == "gru":
        policy = GRUPolicy(dist.obs_dim, dist.act_dim, dist.discrete, hidden=args.hidden,
                           init_std=init_std, action_reward=getattr(args, "action_reward", False),
                           value_gru=getattr(args, "value_gru", False))
    else:
        policy = SNAILPolicy(dist.obs_dim, dist.act_dim, dist.discrete,
                             seq_len=args.episodes * dist.horizon, channels=args.hidden // 4,
                             init_std=init_std)
    cfg = PPOConfig(lr=args.lr, clip=args.clip, epochs=args.epochs, minibatches=args.minibatches,
                    gamma=args.gamma, lam=args.lam, entropy_coef=args.entropy,
                    reward_scale=args.reward_scale)
    return RL2(policy, cfg)


def random_policy_returns(dist, tasks, episodes: int, seed: int) -> torch.Tensor:
    """``[T]``: each task's trial return (``episodes`` episodes) under uniformly random actions."""
    g = torch.Generator().manual_seed(seed)

    def act(obs):
        T, E = obs.shape[:2]
        if dist.discrete:
            return torch.randint(0, dist.act_dim, (T, E), generator=g)
        return torch.rand(T, E, dist.act_dim, generator=g) * 2 - 1

    return rl.sample(dist, act, tasks, episodes, seed).returns().sum(1)


class _Runner:
    def __init__(self, args: argparse.Namespace, dist, agent: RL2):
        self.args, self.dist, self.agent = args, dist, agent

    def play(self, n_tasks: int, stream: int, i: int, trials: int):
        a = self.args
        tasks = self.dist.sample_tasks(n_tasks, stream_seed(a.seed, _TASKS + 4 * stream, i))
        gen = torch.Generator().manual_seed(stream_seed(a.seed, _ACTIONS + 4 * stream, i))
        return tasks, self.agent.rollout(self.dist, tasks, trials, a.episodes,
                                         stream_seed(a.seed, _ENV + 4 * stream, i), gen)

    def step(self, i: int):
        _, ro = self.play(self.args.tasks, 0, i, self.args.trials)
        gen = torch.Generator().manual_seed(stream_seed(self.args.seed, _SHUFFLE, i))
        m = self.agent.step(ro, gen)
        loss = m["pi_loss"] + self.agent.config.value_coef * m["v_loss"]
        return loss, m["return"], m

    def evaluate(self, n_tasks: int, which: int):
        """Held-out tasks, rolled out ``EVAL_CHUNK`` at a time (chunk ``c`` draws its tasks and
        randomness from item ``c`` of the held-out streams): a list of ``(tasks, per-task trial
        returns [t], per-episode returns [t, n])``, one per chunk."""
        out = []
        for c, start in enumerate(range(0, n_tasks, EVAL_CHUNK)):
            tasks, ro = self.play(min(EVAL_CHUNK, n_tasks - start), which, c, 1)
            out.append((tasks, ro.returns().mean(1), ro.episode_returns().mean(1)))
        return out


def run(args: argparse.Namespace) -> dict:
    """Train RL^2 on ``args.env``, evaluate it on held-out tasks; the results dict."""
    try:
        dist = rl.make(args.env)
    except ValueError as e:
        raise SystemExit(f"--env: {e}") from None
    _fill_defaults(args, dist)
    torch.manual_seed(args.seed)
    run_dir = run_dir_of(args)
    check_resume(run_dir / "checkpoint.pt", args, ("env", "policy", "hidden", "episodes",
                                                          "action_reward", "value_gru"))
    agent = build_agent(args, dist)
    runner = _Runner(args, dist, agent)
    fields = tuple(f"episode_{k + 1}" for k in range(args.episodes)) + ("entropy", "approx_kl",
                                                                        "clip_frac")
    plot = tuple(dict.fromkeys(f"episode_{k}" for k in (1, 2, args.episodes) if k <= args.episodes))

    def validate():
        return confidence_interval(torch.cat([r for _, r, _ in runner.evaluate(args.val_tasks,
                                                                              _VAL_SET)]),
                                   metric="return")

    cfg = TrainConfig(steps=args.iterations, minutes=args.minutes, log_every=1,
                      plot_fields=plot if args.episodes > 1 else (),
                      val_every=args.eval_every or 10**12, ckpt_every=args.ckpt_every,
                      episodes_per_step=args.tasks * args.trials * args.episodes, run_dir=run_dir,
                      resume=args.resume, progress=not args.no_progress, metric="return",
                      extra_fields=fields)
    trainer = Trainer(agent, None, lambda start: iter(range(start, 2**62)), runner.step,
                      validate if args.eval_every else None, cfg,
                      extra_state={"args": saved_args(args)})
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    chunks = runner.evaluate(args.eval_tasks, _TEST_SET)
    per_task = torch.cat([r for _, r, _ in chunks])
    per_episode = torch.cat([e for _, _, e in chunks])
    ret = confidence_interval(per_task, metric="return")
    # the random policy on the same tasks, chunk by chunk (chunk 0: the seed of a one-piece run)
    rand = confidence_interval(
        torch.cat([random_policy_returns(dist, tasks, args.episodes,
                                         stream_seed(args.seed, _TEST_SET, 1 + c))
                   for c, (tasks, _, _) in enumerate(chunks)]),
        metric="return")
    greedy = {}
    if isinstance(dist, BernoulliBandit) and args.episodes == 1:  # greedy on the same bandits
        for name, prior in (("greedy", False), ("greedy_beta", True)):
            ci = confidence_interval(torch.cat([
                greedy_returns(dist, tasks, stream_seed(args.seed, _TEST_SET, 1 + c),
                               torch.Generator().manual_seed(stream_seed(args.seed, _GREEDY, c)),
                               prior=prior)
                for c, (tasks, _, _) in enumerate(chunks)]), metric="return")
            greedy.update({f"{name}_trial_return": ci.mean, f"{name}_trial_return_ci95": ci.ci95})
    eps = [confidence_interval(per_episode[:, k], metric="return") for k in range(args.episodes)]
    out = dict(agent=args.agent, env=args.env, policy=args.policy, hidden=args.hidden,
               iterations=trainer.step, tasks=args.tasks, trials=args.trials,
               episodes=args.episodes, env_steps=trainer.step * args.steps_per_iteration,
               train_seconds=round(train_s, 1), test_seconds=round(time.perf_counter() - t0, 1),
               eval_tasks=args.eval_tasks, trial_return=ret.mean, trial_return_ci95=ret.ci95,
               episode_returns=[e.mean for e in eps], episode_returns_ci95=[e.ci95 for e in eps],
               random_trial_return=rand.mean, random_trial_return_ci95=rand.ci95, **greedy,
               run_dir=str(run_dir))
    write_results(run_dir, out)
    print(f"rl2 ({args.policy}) on {args.env}, {args.eval_tasks} held-out tasks, trial of "
          f"{args.episodes} episode(s): return {ret.mean:.3f} +- {ret.ci95:.3f} (random policy "
          f"{rand.mean:.3f} +- {rand.ci95:.3f}"
          + ("".join(f", {g} {out[f'{g}_trial_return']:.3f}" for g in ("greedy", "greedy_beta"))
             if greedy else "") + "); per episode "
          + ", ".join(f"{e.mean:.2f}" for e in eps))
    print(f"run folder: {run_dir} (checkpoint.pt, metrics.csv, learning_curve.png, results.json)")
    return out
