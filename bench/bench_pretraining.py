"""Issue 17's table: every learner of fastmeta on glyphs (or Omniglot / mini-ImageNet, given
their folders) 5-way 1-shot and 5-shot, trained on the SAME NUMBER OF TRAINING EPISODES, 3
seeds, tested like the demo (200 test episodes by default, seed 20000 + seed) -- does
pretraining (Baseline / Baseline++, Chen et al. 2019) match the meta-learners?

Each run is one ``python -m fastmeta train`` subprocess (1 intra-op thread, ``nice``) with the
learner's demo recipe (``LearnerSpec.demo_args``) except ProtoNet's 20-way training episodes:
every learner trains on 5-way K-shot episodes of the test shot, ``--steps = episodes / batch``.
No validation (the last parameters are tested). Resumable: a run whose ``results.json``
exists is skipped, so the script can be stopped and started again; ``--jobs`` runs at once.

    python bench/bench_pretraining.py --episodes 160 --jobs 2          # run the grid
    python bench/bench_pretraining.py --report                          # the table of what is done
    python bench/bench_pretraining.py --dataset omniglot --data-root data/omniglot --episodes 40000

The table: per learner and shot, the mean test accuracy over the seeds +- the 95% CI of that
mean (Student t over the seeds, so it holds training and test-episode variance), the per-seed
accuracies, and the median training time of one run (wall clock, on whatever the machine was
doing) and the median training CPU seconds (``time.process_time`` around the training loop,
user + system of the run's process at 1 intra-op thread: the compute each learner got, nearly
independent of the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastmeta.cli.recipes import LEARNERS

# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_args(learner: str, shots: int, seed: int, episodes: int, test_episodes: int, run_dir: Path,
             dataset: str = "glyphs", data_root: str | None = None) -> list[str]:
    """The ``train`` command line of one run: ``episodes`` training episodes of 5-way ``shots``-shot."""
    spec = LEARNERS[learner]
    recipe = list(spec.demo_args)
    parsed = argparse.ArgumentParser(add_help=False)
    parsed.add_argument("--batch", type=int, default=spec.default_batch)
    batch = parsed.parse_known_args(recipe)[0].batch
    if episodes % batch:
        raise SystemExit(f"--episodes {episodes} is not a multiple of {learner}'s batch {batch}")
    root = ["--data-root", data_root] if data_root else []
    return [learner, "--dataset", dataset, *root, "--ways", "5", "--shots", str(shots), *recipe,
            "--train-ways", "5", "--steps", str(episodes // batch), "--seed", str(seed),
            "--val-episodes", "0", "--ckpt-every", "0", "--test-episodes", str(test_episodes),
            "--threads", "1", "--no-progress", "--run-dir", str(run_dir)]


def grid(a) -> list[tuple[str, int, int, Path]]:
    return [(learner, shots, seed, Path(a.out) / f"{learner}-{a.dataset}-{shots}s-seed{seed}")
            for shots in a.shots for seed in a.seeds for learner in a.learners]


def run_grid(a) -> None:
    todo = [g for g in grid(a) if not (g[3] / "results.json").exists()]
    print(f"{len(todo)} runs to do", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, str, float]] = []
    while todo or running:
        jobs = a.jobs
        if a.jobs_file and Path(a.jobs_file).exists():  # changed while running: yield cores to others
            jobs = int(Path(a.jobs_file).read_text().strip() or a.jobs)
        while todo and len(running) < jobs:
            learner, shots, seed, run_dir = todo.pop(0)
            if (run_dir / "results.json").exists():  # finished meanwhile (by an earlier driver)
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = ["nice", "-n", "5", sys.executable, "-m", "fastmeta", "train",
                   *run_args(learner, shots, seed, a.episodes, a.test_episodes, run_dir, a.dataset, a.data_root)]
            log = open(run_dir / "log.txt", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            run_dir.name, time.time()))
        time.sleep(2)
        for p, name, t0 in list(running):
            if p.poll() is not None:
                running.remove((p, name, t0))
                print(f"{time.strftime('%H:%M:%S')} {name}: exit {p.returncode} after {time.time() - t0:.0f} s",
                      flush=True)


def report(a) -> str:
    rows = {}
    for learner, shots, seed, run_dir in grid(a):
        f = run_dir / "results.json"
        if f.exists():
            rows.setdefault((learner, shots), []).append(json.loads(f.read_text()))
    lines = ["| learner | shots | test accuracy % (mean over seeds +- 95% CI) | per seed "
             "| training CPU s (median) | training wall s (median) |",
             "|---|---:|---|---|---:|---:|"]
    for shots in a.shots:
        for learner in sorted(a.learners, key=lambda n: -statistics.mean(
                r["test_accuracy"] for r in rows.get((n, shots), [{"test_accuracy": 0}]))):
            rs = rows.get((learner, shots))
            if not rs:
                continue
            acc = [100 * r["test_accuracy"] for r in rs]
            ci = T95[len(acc) - 1] * statistics.stdev(acc) / len(acc) ** 0.5 if len(acc) > 1 else float("nan")
            per_seed = ", ".join(f"{x:.1f}" for x in acc)
            cpu = [r["train_cpu_seconds"] for r in rs if "train_cpu_seconds" in r]
            cpu_s = f"{statistics.median(cpu):.0f}" if cpu else "-"
            lines.append(f"| {learner} | {shots} | {statistics.mean(acc):.1f} +- {ci:.1f} | {per_seed} | "
                         f"{cpu_s} | {statistics.median(r['train_seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=160, help="training episodes per run (every learner)")
    p.add_argument("--test-episodes", type=int, default=200)
    p.add_argument("--dataset", default="glyphs", choices=["glyphs", "omniglot", "miniimagenet"])
    p.add_argument("--data-root", default=None, help="the dataset's folder (omniglot, miniimagenet)")
    p.add_argument("--shots", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--learners", type=lambda s: s.split(","), default=list(LEARNERS))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (1 thread each)")
    p.add_argument("--jobs-file", default=None, help="if this file exists, its number overrides --jobs (read "
                   "before every start: edit it to run fewer at once on a shared machine)")
    p.add_argument("--out", default="runs/pretraining")
    p.add_argument("--report", action="store_true", help="only print the table of the finished runs")
    a = p.parse_args(argv)
    unknown = set(a.learners) - set(LEARNERS)
    if unknown:
        raise SystemExit(f"unknown learners {sorted(unknown)}; choose from {sorted(LEARNERS)}")
    if not a.report:
        run_grid(a)
    print(report(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
