"""Sampling throughput of the meta-RL task distributions (fastmeta.rl.envs), env steps/s.

For each distribution and T tasks x E episodes (H = its horizon), per call (median of
:func:`_common.time_fn`), at 1 torch thread and at this process's thread count:

* ``sample()``: ``fastmeta.rl.sample`` with a random policy (a seeded ``torch.randn`` /
  ``torch.randint`` per step, the cheapest policy there is): reset + H steps + the padded
  ``[T, E, H, ...]`` buffers, NaN checks and masks -- what a meta-RL learner pays per batch
  apart from its policy network;
* ``reset+step loop``: ``dist.reset`` and H ``dist.step`` calls on pre-drawn actions, no
  sampler (the environment alone);
* ``per-episode loop (numpy)`` (2D navigation only): the same dynamics stepped one episode
  at a time in Python/numpy, as a gym env in a vector env does it -- the baseline of the
  batched tensor step;
* ``first reset`` (cheetah only): building the T*E-env ``SyncVectorEnv`` (one MuJoCo model
  load per sub-env) plus the reset; later resets with the same T*E reuse it.

env steps/s = T * E * H / median time. Usage:
``python bench/bench_rl_envs.py [--budget 2] [--quick] [--no-save]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import fastmeta.rl as rl  # noqa: E402

CASES = [("nav2d", 20, 20), ("nav2d", 40, 20), ("cheetah-vel", 10, 10), ("cheetah-dir", 10, 10),
         ("cheetah-vel", 20, 10), ("bandit-k5-n10", 20, 20), ("bandit-k5-n100", 20, 20),
         ("tabular-mdp", 20, 20), ("tabular-mdp", 100, 100)]
QUICK = [("nav2d", 20, 20), ("cheetah-vel", 2, 2), ("bandit-k5-n10", 20, 20),
         ("tabular-mdp", 20, 20)]


def random_policy(dist, seed: int):
    g = torch.Generator().manual_seed(seed)

    def act(obs):
        T, E = obs.shape[:2]
        if dist.discrete:
            return torch.randint(0, dist.act_dim, (T, E), generator=g)
        return 0.3 * torch.randn(T, E, dist.act_dim, generator=g)
    return act


def nav_numpy_loop(goals: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """2D navigation stepped one episode at a time (the per-env pattern of a gym vector env)."""
    T, E, H, _ = actions.shape
    rewards = np.empty((T, E, H), dtype=np.float32)
    for t in range(T):
        for e in range(E):
            pos = np.zeros(2, dtype=np.float32)
            for h in range(H):
                pos = pos + np.clip(actions[t, e, h], -0.1, 0.1)
                rewards[t, e, h] = -np.sqrt(((pos - goals[t]) ** 2).sum())
    return rewards


def case_rows(name: str, T: int, E: int, budget: float) -> list[dict]:
    dist = rl.make(name)
    H = dist.horizon
    tasks = dist.sample_tasks(T, 0)
    rows = []
    if name.startswith("cheetah"):
        start = time.perf_counter()
        dist.reset(tasks, E, seed=0)
        rows.append(dict(impl="first reset", threads=torch.get_num_threads(),
                         median_ms=(time.perf_counter() - start) * 1e3, n=1))
    pol = random_policy(dist, 0)
    acts = [pol(torch.zeros(T, E, dist.obs_dim)) for _ in range(H)]
    seeds = iter(range(10**9))

    def loop():
        dist.reset(tasks, E, seed=next(seeds))
        for a in acts:
            dist.step(a)

    threads = torch.get_num_threads()
    try:
        for th in sorted({1, threads}):
            torch.set_num_threads(th)
            rows.append(dict(impl="sample()", threads=th, **_common.time_fn(
                lambda: rl.sample(dist, pol, tasks, E, seed=next(seeds)), device="cpu",
                budget_s=budget)))
            rows.append(dict(impl="reset+step loop", threads=th,
                             **_common.time_fn(loop, device="cpu", budget_s=budget)))
    finally:
        torch.set_num_threads(threads)
    if name == "nav2d":
        goals, a = tasks["goal"].numpy(), torch.stack(acts, 2).numpy()
        rows.append(dict(impl="per-episode loop (numpy)", threads=1, **_common.time_fn(
            lambda: nav_numpy_loop(goals, a), device="cpu", budget_s=budget, min_reps=1,
            warmup=1)))
    for r in rows:
        r.update(dist=name, T=T, E=E, H=H, env_steps=T * E * H)
        if r["impl"] != "first reset":
            r["steps_per_s"] = T * E * H / (r["median_ms"] * 1e-3)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small cases only (a smoke run)")
    _common.add_common_args(p, "budget", "no-save", budget=2.0)
    a = _common.parse_args(p, argv)
    _common.print_banner("meta-RL environments benchmark", torch.device("cpu"))
    rows = []
    for name, T, E in (QUICK if a.quick else CASES):
        rows.extend(case_rows(name, T, E, a.budget))
    print(f"{_common.device_name(torch.device('cpu'))}, torch {torch.__version__}")
    print("| distribution | T x E x H | impl | threads | median ms | p20-p80 ms | env steps/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        spread = f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}" if "p20_ms" in r else "-"
        rate = f"{r['steps_per_s']:,.0f}" if "steps_per_s" in r else "-"
        print(f"| {r['dist']} | {r['T']}x{r['E']}x{r['H']} | {r['impl']} | {r['threads']} | "
              f"{r['median_ms']:.1f} | {spread} | {rate} |")
    if not a.no_save:
        info = _common.env_info(torch.device("cpu"))
        out = _common.RESULTS_DIR / f"rl_envs-{info['device_slug']}.jsonl"
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps({**info, **r, "bench": "rl_envs"}, default=str) + "\n")
        print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
