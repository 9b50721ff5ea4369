"""``python -m fastmeta rl maml-trpo --env nav2d|cheetah-vel|cheetah-dir|bandit-k5-n10|tabular-mdp``:
MAML for RL (Finn et al. 2017, section 5.3) with an outer TRPO step; the PNG shows the pre- and
post-adaptation return per iteration, ``results.json`` both on held-out tasks (+- 95% CI).
The cheetahs run with ``--action-scale 10`` unless told otherwise (pytorch-maml-rl's
``normalization_scale``: see ``ACTION_SCALE``). With ``--inner-steps k > 1`` every inner step
gets a fresh train batch, sampled with the previous step's adapted policy.

Under ``torchrun``, each rank samples and adapts tasks ``rank::world`` of every meta-batch
(``--meta-batch`` a multiple of the world size) with its own random streams, the TRPO statistics
are averaged so every rank takes the same step, the held-out tasks are split and gathered, and
rank 0 alone writes the run folder.
"""

from __future__ import annotations

import argparse
import time

import torch

from fastmeta import distributed, rl
from fastmeta.cli.rl_common import (add_common_args, check_resume, run_dir_of, saved_args, stream_seed,
                                    write_results)
from fastmeta.learners import confidence_interval
from fastmeta.train import Trainer, TrainConfig

HELP = "MAML with a TRPO outer step (Finn et al. 2017): Gaussian or categorical MLP policy"
# pytorch-maml-rl's configs: meta-batch 20 tasks (HalfCheetah 40), 20 episodes per task
META_BATCH = {"nav2d": 20, "cheetah-vel": 40, "cheetah-dir": 40}
# pytorch-maml-rl's HalfCheetah configs (normalization_scale 10): the policy acts in units of 10x
# MuJoCo's torques, so its initial std 1 explores with torque noise 0.1 instead of the full
# actuator range; 20 tasks x 10 episodes, 100 iterations: adaptation gap +2..+5 with scale 1,
# +20..+23 with 10 (bench/results/maml_trpo.md)
ACTION_SCALE = {"cheetah-vel": 10.0, "cheetah-dir": 10.0}
LOG_FIELDS = ("pre_return", "post_return", "kl", "step_size")
PLOT_FIELDS = ("pre_return", "post_return")  # beside the return; kl and step size only in the CSV
# the seed streams of one iteration (tasks, train rollouts, valid rollouts, actions) and of the
# held-out tasks; iteration i of stream s uses stream_seed(seed, s, i)
_TASKS, _TRAIN, _VALID, _ACTIONS = range(4)
_VAL_SET, _TEST_SET = 10, 11


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="nav2d", help="task distribution: nav2d, cheetah-vel, cheetah-dir (Gaussian "
                   "policy), bandit-k{K}-n{N}, tabular-mdp (categorical policy)")
    p.add_argument("--iterations", type=int, default=500, help="meta-iterations (train longer: raise this)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per iteration (default 20; cheetah 40)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task and rollout")
    p.add_argument("--hidden", default="64,64", help="policy MLP widths")
    p.add_argument("--fast-lr", type=float, default=0.1, help="inner policy-gradient step size")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--action-scale", type=float, default=None,
                   help="cheetah only: policy actions are this times MuJoCo's (default 10, as "
                   "pytorch-maml-rl)")
    p.add_argument("--max-kl", type=float, default=1e-2)
    p.add_argument("--cg-iters", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=25, help="held-out validation every N iterations (0: never)")
    p.add_argument("--eval-tasks", type=int, default=40, help="held-out tasks of the final evaluation")
    p.add_argument("--val-tasks", type=int, default=10, help="held-out tasks of each validation")
    # the 64-64 policy's ops are too small for intra-op threads: on this 2-core machine, busy, a
    # nav2d iteration took 3-7 s at 1 thread and 34-52 s at 2 (bench/results/maml_trpo.md)
    add_common_args(p)


class _Runner:
    """Samples and steps one meta-iteration; evaluates held-out tasks before/after adaptation."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        # rank r of a torchrun job samples its tasks' rollouts from its own streams (rank 0, or
        # a single process, from --seed's)
        self.seed = args.seed + 1_000_000 * distributed.rank()
        kw = {}
        if args.action_scale is not None and args.env not in ACTION_SCALE:
            raise SystemExit(f"--action-scale applies to cheetah-vel/cheetah-dir, not {args.env!r}")
        if args.env in ACTION_SCALE:
            scale = args.action_scale
            kw["action_scale"] = ACTION_SCALE[args.env] if scale is None else scale
        try:
            self.dist = rl.make(args.env, **kw)
        except ValueError as e:
            raise SystemExit(f"--env: {e}") from None
        hidden = tuple(int(h) for h in args.hidden.split(",") if h)
        policy = rl.CategoricalMLPPolicy if self.dist.discrete else rl.GaussianMLPPolicy
        self.policy = policy(self.dist.obs_dim, self.dist.act_dim, hidden=hidden)
        self.agent = rl.MAMLTRPO(self.policy, fast_lr=args.fast_lr, inner_steps=args.inner_steps,
                                 max_kl=args.max_kl, cg_iters=args.cg_iters)

    def rollouts(self, tasks, seed: int, stream: int, i: int):
        """Pre-adaptation (theta) and post-adaptation rollouts of ``tasks``: ``(train, valid)``,
        ``train`` a list of one batch per inner step (batch j sampled with the j-step iterate, as
        pytorch-maml-rl resamples; one batch when ``--inner-steps 1``)."""
        gen = torch.Generator().manual_seed(stream_seed(seed, _ACTIONS + 4 * stream, i))
        E = self.args.episodes
        train_seed = stream_seed(seed, _TRAIN + 4 * stream, i)
        train = [rl.sample(self.dist, self.agent.actor(None, gen), tasks, E, train_seed)]
        for j in range(1, self.args.inner_steps):
            train.append(rl.sample(self.dist, self.agent.actor(self.agent.adapt(train), gen), tasks,
                                   E, stream_seed(train_seed, j, 0)))
        adapted = self.agent.adapt(train)
        valid = rl.sample(self.dist, self.agent.actor(adapted, gen), tasks, E,
                          stream_seed(seed, _VALID + 4 * stream, i))
        return train, valid

    def step(self, i: int):
        a = self.args
        tasks = distributed.shard(self.dist.sample_tasks(a.meta_batch, stream_seed(a.seed, _TASKS, i)))
        train, valid = self.rollouts(tasks, self.seed, 0, i)
        m = self.agent.step(train, valid)
        return m["loss_after"], m["post_return"], m

    def evaluate(self, n_tasks: int, which: int):
        """Per held-out task mean episode return before and after adaptation: two EvalResults."""
        a = self.args
        tasks = distributed.shard(self.dist.sample_tasks(n_tasks, stream_seed(a.seed, which, 0)))
        train, valid = self.rollouts(tasks, self.seed, which, 0)
        # [T]: mean return before (theta's batch) and after adaptation
        per_task = [distributed.all_gather_cat(r.returns().mean(1)) for r in (train[0], valid)]
        return tuple(confidence_interval(t, metric="return") for t in per_task)


def run(args: argparse.Namespace) -> dict:
    """Train MAML-TRPO on ``args.env``, evaluate it on held-out tasks; the results dict."""
    if args.meta_batch is None:
        args.meta_batch = META_BATCH.get(args.env, 20)
    if args.action_scale is None and args.env in ACTION_SCALE:
        args.action_scale = ACTION_SCALE[args.env]  # saved in the checkpoint, checked on resume
    try:
        distributed.check_divisible(args.meta_batch, "--meta-batch")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.manual_seed(args.seed)
    run_dir = run_dir_of(args)
    check_resume(run_dir / "checkpoint.pt", args, ("env", "hidden", "inner_steps", "action_scale"))
    runner = _Runner(args)

    def validate():
        return runner.evaluate(args.val_tasks, _VAL_SET)[1]

    cfg = TrainConfig(steps=args.iterations, minutes=args.minutes, log_every=1, plot_fields=PLOT_FIELDS,
                      val_every=args.eval_every or 10**12, ckpt_every=args.ckpt_every,
                      episodes_per_step=args.meta_batch * args.episodes * (args.inner_steps + 1),
                      run_dir=run_dir, resume=args.resume,
                      progress=not args.no_progress, metric="return", extra_fields=LOG_FIELDS)
    trainer = Trainer(runner.policy, None, lambda start: iter(range(start, 2**62)), runner.step,
                      validate if args.eval_every else None, cfg, extra_state={"args": saved_args(args)})
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre, post = runner.evaluate(args.eval_tasks, _TEST_SET)
    out = dict(agent=args.agent, env=args.env, iterations=trainer.step, meta_batch=args.meta_batch,
               episodes=args.episodes, train_seconds=round(train_s, 1),
               test_seconds=round(time.perf_counter() - t0, 1), eval_tasks=args.eval_tasks,
               pre_return=pre.mean, pre_return_ci95=pre.ci95, post_return=post.mean, post_return_ci95=post.ci95,
               run_dir=str(run_dir))
    if args.action_scale is not None:
        out["action_scale"] = args.action_scale
    if distributed.world_size() > 1:
        out["world_size"] = distributed.world_size()
    if not distributed.is_main():
        return out
    write_results(run_dir, out)
    print(f"{args.agent} on {args.env}, {args.eval_tasks} held-out tasks, mean episode return +- 95% CI: "
          f"before adaptation {pre.mean:.2f} +- {pre.ci95:.2f}, after {args.inner_steps} inner step"
          f"{'s' * (args.inner_steps != 1)} {post.mean:.2f} +- {post.ci95:.2f}")
    print(f"run folder: {run_dir} (checkpoint.pt, metrics.csv, learning_curve.png, results.json)")
    return out
