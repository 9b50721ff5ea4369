"""Throughput of RL^2's batched recurrent rollouts: T tasks' trials stepped together vs one task
at a time, env steps/s.

For each distribution, one GRU-128 RL^2 policy (untrained; the rollout's cost does not depend
on the weights), T tasks, one trial of n episodes per task:

* ``batched``: :func:`fastmeta.rl.sample_trials` on all T tasks: every step is one policy call
  on T rows and one batched environment step (one tensor op for the torch distributions,
  one ``SyncVectorEnv.step`` for the cheetah);
* ``one task at a time``: the same call on each task alone, T calls in a loop (what a
  per-task rollout loop costs).

The two are timed interleaved (batched, loop, batched, loop, ...) in one process, wall clock
and process CPU time, at 1 torch thread and at the default thread count; each distribution
uses its own environment object per mode (the cheetah's vector env is sized by T).
env steps/s = real steps of the rollout / median seconds.

Usage: ``python bench/bench_rl2_rollout.py [--reps 5] [--threads 1,2] [--only nav2d,...] [--quick]
[--no-save]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import fastmeta.rl as rl  # noqa: E402

# (distribution, tasks T, episodes per trial n)
CASES = [("bandit-k5-n10", 250, 1), ("bandit-k10-n100", 32, 1), ("tabular-mdp", 32, 10),
         ("nav2d", 32, 2), ("cheetah-vel", 8, 2)]
QUICK = [("bandit-k5-n10", 32, 1), ("tabular-mdp", 8, 2), ("nav2d", 8, 1)]


def measure(name: str, T: int, n: int, reps: int, threads: int) -> dict:
    dists = {"batched": rl.make(name), "one task at a time": rl.make(name)}
    d0 = dists["batched"]
    torch.manual_seed(0)
    policy = rl.GRUPolicy(d0.obs_dim, d0.act_dim, d0.discrete, hidden=128, init_std=0.1)
    tasks = d0.sample_tasks(T, seed=0)
    one = [{k: v[t:t + 1] for k, v in tasks.items()} for t in range(T)]
    steps = {}

    def run(mode: str, seed: int):
        dist = dists[mode]
        if mode == "batched":
            steps[mode] = int(rl.sample_trials(dist, policy, tasks, 1, n, seed).mask.sum())
        else:
            steps[mode] = sum(int(rl.sample_trials(dist, policy, tk, 1, n, seed).mask.sum())
                              for tk in one)

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    wall = {m: [] for m in dists}
    cpu = {m: [] for m in dists}
    try:
        for m in dists:  # warm-up (the cheetah builds its vector env here)
            run(m, 0)
        for r in range(reps):
            for m in dists:
                t0, c0 = time.perf_counter(), time.process_time()
                run(m, r + 1)
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    finally:
        torch.set_num_threads(saved)
        for d in dists.values():
            d.close()
    row = dict(dist=name, T=T, episodes=n, L=n * d0.horizon, bench_threads=threads, reps=reps)
    for m in dists:
        key = "batched" if m == "batched" else "loop"
        w, c = statistics.median(wall[m]), statistics.median(cpu[m])
        row.update({f"{key}_s": w, f"{key}_cpu_s": c, f"{key}_steps": steps[m],
                    f"{key}_steps_per_s": steps[m] / w, f"{key}_p20_s": _q(wall[m], 0.2),
                    f"{key}_p80_s": _q(wall[m], 0.8)})
    row["speedup"] = row["loop_s"] / row["batched_s"]
    row["cpu_speedup"] = row["loop_cpu_s"] / row["batched_cpu_s"]
    return row


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions per mode")
    p.add_argument("--quick", action="store_true", help="small cases only (a smoke run)")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and "
                   "the default)")
    p.add_argument("--only", default=None, help="comma-separated distributions to run (default: "
                   "all cases)")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    warning = _common.busy_warning()
    if warning:
        print(warning)
    threads = (sorted({int(t) for t in a.threads.split(",")}) if a.threads
               else sorted({1, torch.get_num_threads()}))
    rows = []
    cases = [c for c in (QUICK if a.quick else CASES)
             if a.only is None or c[0] in a.only.split(",")]
    for name, T, n in cases:
        for th in threads:
            try:
                rows.append(measure(name, T, n, a.reps, th))
            except ImportError as e:  # the cheetah needs the rl extra
                print(f"skipping {name}: {e}")
                break
    print(f"{_common.device_name(torch.device('cpu'))}, torch {torch.__version__}, load "
          f"{_common._loadavg()}")
    header = ["distribution", "T x n x H", "threads", "batched s (p20-p80)", "loop s (p20-p80)",
              "batched steps/s", "loop steps/s", "speedup wall", "speedup cpu"]
    body = [[r["dist"], f"{r['T']}x{r['episodes']}x{r['L'] // r['episodes']}",
             str(r["bench_threads"]),
             f"{r['batched_s']:.3f} ({r['batched_p20_s']:.3f}-{r['batched_p80_s']:.3f})",
             f"{r['loop_s']:.3f} ({r['loop_p20_s']:.3f}-{r['loop_p80_s']:.3f})",
             f"{r['batched_steps_per_s']:,.0f}", f"{r['loop_steps_per_s']:,.0f}",
             f"{r['speedup']:.1f}x", f"{r['cpu_speedup']:.1f}x"] for r in rows]
    print("\n".join(_common.format_table(header, body)))
    if not a.no_save and rows:
        path = _common.append_jsonl(rows, "rl2_rollout", torch.device("cpu"))
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
