"""``python -m fastmeta demo``: every learner trained briefly on glyphs next to a pixel
nearest-neighbour baseline, MAML on sinusoid, the meta-RL agents (MAML-TRPO and PEARL on 2D
navigation, RL^2 on bandits), and where the time went."""

from __future__ import annotations

import argparse
import time

import torch

from fastmeta import data
from fastmeta.cli.recipes import DEMO_SKIP, LEARNERS, MAML_SINUSOID_DEMO, train_parser
from fastmeta.cli.rl import rl_parser, run_rl
from fastmeta.cli.run import run_training
from fastmeta.learners import PixelNN


def demo(argv: list[str]) -> int:
    """Train every learner that exists briefly on glyphs (5-way 1-shot) and print its test
    accuracy +- 95% CI next to a pixel nearest-neighbour baseline, on the same episodes; then
    MAML on sinusoid regression (test MSE +- 95% CI and Finn et al.'s adaptation figure) and
    MAML-TRPO on 2D navigation (held-out return before and after one inner step), RL^2 on
    5-armed bandits (trial return next to a random policy) and PEARL on 2D navigation (return
    with the prior only and after context)."""
    p = argparse.ArgumentParser(prog="python -m fastmeta demo")
    p.add_argument("--minutes", type=float, default=None,
                   help="training minutes per run (default: 3.5 minutes shared by all runs -- the glyph "
                        "learners, MAML on sinusoid, the three meta-RL agents -- at most 3 each; train "
                        "longer: --minutes 30)")
    p.add_argument("--sinusoid-minutes", type=float, default=None,
                   help="training minutes of MAML on sinusoid (default: its share, or --minutes when given)")
    p.add_argument("--shots", type=int, default=1)
    # 200 test episodes per glyph learner: each 600 cost 16-97 s on 2 cores (4 of the demo's
    # 10 minutes); the 95% CI is about 1.7x wider than with 600 (about +-1 point at 90 %
    # accuracy) and printed with every result
    p.add_argument("--episodes", type=int, default=200, help="test episodes per glyph learner")
    p.add_argument("--sinusoid-tasks", type=int, default=600, help="test tasks of MAML on sinusoid")
    p.add_argument("--rl-minutes", type=float, default=None,
                   help="training minutes of each meta-RL agent (MAML-TRPO, RL^2, PEARL; default: its share, "
                        "or --minutes when given; 0: skip them)")
    p.add_argument("--learners", default=",".join(n for n in LEARNERS if n not in DEMO_SKIP),
                   help="comma-separated subset (maml also runs on sinusoid)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--phases", default=None,
                   help="append 'phase<TAB>seconds<TAB>note' rows here (make demo prints them last)")
    a = p.parse_args(argv)

    phases = []

    def phase(name, seconds, note=""):
        phases.append(f"{name}\t{seconds:.0f}\t{note}")

    names = [n for n in a.learners.split(",") if n]
    unknown = set(names) - set(LEARNERS)
    if unknown:
        raise SystemExit(f"unknown learners {sorted(unknown)}; choose from {sorted(LEARNERS)}")
    # one training budget shared by every run of the demo, so that adding a run (meta-RL did)
    # does not lengthen it
    runs = len(names) + ("maml" in names) + 3 * (a.rl_minutes != 0)
    share = min(3.0, 3.5 / max(1, runs))
    minutes = a.minutes if a.minutes is not None else share
    print(f"fastmeta demo: {', '.join(names)} train {60 * minutes:.0f} s each on glyphs, 5-way {a.shots}-shot; "
          f"then MAML on sinusoid, MAML-TRPO and PEARL on 2D navigation, RL^2 on bandits (train longer: "
          f"`make demo DEMO_MINUTES=30` "
          f"or `python -m fastmeta demo --minutes 30`)")
    t0 = time.perf_counter()
    ds = data.load_dataset("glyphs")
    print(ds.summary())
    phase("glyph dataset (built or loaded)", time.perf_counter() - t0)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        args = train_parser().parse_args([
            name, "--dataset", "glyphs", "--ways", "5", "--shots", str(a.shots),
            "--steps", "1000000", "--minutes", str(minutes), "--val-every", "250", "--val-episodes", "100",
            "--ckpt-every", "250", "--test-episodes", str(a.episodes), "--device", a.device,
            "--run-dir", f"runs/demo-{name}-glyphs-5w{a.shots}s", *LEARNERS[name].demo_args,
        ])
        res = run_training(args)
        _training_phases(phase, f"{name} glyphs", res, time.perf_counter() - t0)
        rows.append((f"{name} ({res['steps']} steps, {res['train_seconds']:.0f} s)",
                     f"{100 * res['test_accuracy']:.2f} +- {100 * res['test_ci95']:.2f}"))
    t0 = time.perf_counter()
    test = data.episodes(ds, "test", 5, a.shots, 15, batch_size=16, num_batches=-(-a.episodes // 16),
                         seed=20_000, device=a.device)
    nn_res = PixelNN().evaluate(test, episodes=a.episodes)
    phase("pixel nearest neighbour: test", time.perf_counter() - t0, f"{a.episodes} episodes")
    rows.append(("pixel nearest neighbour (no training)", f"{100 * nn_res.mean:.2f} +- {100 * nn_res.ci95:.2f}"))
    sin = None
    if "maml" in names:
        sin_minutes = a.sinusoid_minutes if a.sinusoid_minutes is not None else minutes
        args = train_parser().parse_args([
            "maml", "--dataset", "sinusoid", "--steps", "1000000", "--minutes", str(sin_minutes),
            "--val-every", "500", "--val-episodes", "100", "--ckpt-every", "500",
            "--test-episodes", str(a.sinusoid_tasks), "--device", a.device, "--run-dir", "runs/demo-maml-sinusoid-10s",
            *MAML_SINUSOID_DEMO,
        ])
        t0 = time.perf_counter()
        sin = run_training(args)
        _training_phases(phase, "maml sinusoid", sin, time.perf_counter() - t0)
    rl_minutes = a.rl_minutes if a.rl_minutes is not None else minutes
    nav = bandit = pearl = None
    if rl_minutes > 0:
        t0 = time.perf_counter()
        nav = run_rl(rl_parser().parse_args([
            "maml-trpo", "--env", "nav2d", "--minutes", str(rl_minutes), "--eval-every", "0",
            "--eval-tasks", "40", "--run-dir", "runs/demo-maml-trpo-nav2d",
        ]))
        phase("maml-trpo nav2d: train", nav["train_seconds"], f"{nav['iterations']} iterations")
        phase("maml-trpo nav2d: test", nav["test_seconds"], f"{nav['eval_tasks']} held-out tasks")
        phase("maml-trpo nav2d: setup, checkpoint, plots",
              time.perf_counter() - t0 - nav["train_seconds"] - nav["test_seconds"])
        t0 = time.perf_counter()
        bandit = run_rl(rl_parser().parse_args([
            "rl2", "--env", "bandit-k5-n10", "--minutes", str(rl_minutes), "--eval-every", "0",
            "--eval-tasks", "2000", "--run-dir", "runs/demo-rl2-bandit-k5-n10", "--no-progress",
        ]))
        _rl_phases(phase, "rl2 bandit-k5-n10", bandit, time.perf_counter() - t0)
        t0 = time.perf_counter()
        pearl = run_rl(rl_parser().parse_args([
            "pearl", "--env", "nav2d", "--minutes", str(rl_minutes), "--eval-every", "0",
            "--eval-tasks", "20", "--run-dir", "runs/demo-pearl-nav2d", "--no-progress",
        ]))
        _rl_phases(phase, "pearl nav2d", pearl, time.perf_counter() - t0)
    print(f"\nglyphs 5-way {a.shots}-shot on the held-out test scripts {ds.groups('test')}: "
          f"accuracy % +- 95% CI over {a.episodes} episodes")
    w = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"  {r[0]:<{w}}  {r[1]}")
    if sin is not None:
        print(f"\nsinusoid regression (Finn et al. 2017), K={sin['shots']}, held-out tasks: MSE after "
              f"{sin['test_inner_steps']} inner steps +- 95% CI over {sin['test_episodes']} tasks")
        print(f"  maml ({sin['steps']} steps, {sin['train_seconds']:.0f} s)  "
              f"{sin['test_mse']:.3f} +- {sin['test_ci95']:.3f}   adapted curves: {sin['figure']}")
    if nav is not None:
        print(f"\n2D navigation (Finn et al. 2017, section 5.3), {nav['eval_tasks']} held-out goals: mean episode "
              f"return +- 95% CI (higher is better; the gap is what one inner step learned)")
        print(f"  maml-trpo ({nav['iterations']} iterations, {nav['train_seconds']:.0f} s)  before adaptation "
              f"{nav['pre_return']:.1f} +- {nav['pre_return_ci95']:.1f}, after one step "
              f"{nav['post_return']:.1f} +- {nav['post_return_ci95']:.1f}")
        print(f"  pearl ({pearl['iterations']} iterations, {pearl['train_seconds']:.0f} s)  prior only "
              f"{pearl['prior_return']:.1f} +- {pearl['prior_return_ci95']:.1f}, after context "
              f"{pearl['post_return']:.1f} +- {pearl['post_return_ci95']:.1f} ({pearl['eval_tasks']} goals)")
        print(f"\n5-armed Bernoulli bandits, 10 pulls (RL^2, Duan et al. 2016), {bandit['eval_tasks']} held-out "
              f"tasks: total reward +- 95% CI (random 5.0, Gittins 6.6)")
        print(f"  rl2 ({bandit['env_steps']:,} steps, {bandit['train_seconds']:.0f} s)  "
              f"{bandit['trial_return']:.2f} +- {bandit['trial_return_ci95']:.2f} (random policy "
              f"{bandit['random_trial_return']:.2f} +- {bandit['random_trial_return_ci95']:.2f})")
    if a.phases:
        with open(a.phases, "a") as f:
            f.write("".join(row + "\n" for row in phases))
    return 0


def _training_phases(phase, name: str, res: dict, total: float) -> None:
    phase(f"{name}: train + validation", res["train_seconds"], f"{res['steps']} steps")
    phase(f"{name}: test", res["test_seconds"], f"{res['test_episodes']} episodes")
    phase(f"{name}: setup, checkpoint, plots", total - res["train_seconds"] - res["test_seconds"])


def _rl_phases(phase, name: str, res: dict, total: float) -> None:
    phase(f"{name}: train", res["train_seconds"], f"{res['iterations']} iterations")
    phase(f"{name}: test", res["test_seconds"], f"{res['eval_tasks']} held-out tasks")
    phase(f"{name}: setup, checkpoint, plots", total - res["train_seconds"] - res["test_seconds"])
