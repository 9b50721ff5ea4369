"""Benchmark the Fisher-vector product of the MAML-TRPO meta-objective (issue 14).

On the same synthetic rollouts and parameters (float32), one product ``F_meta v`` by:

* ``A loop`` (baseline): pytorch-maml-rl's recipe -- the KL built task by task through a
  ``create_graph=True`` inner step of an unbatched functional policy, one double backward of
  ``grad_theta KL . v`` through every task's inner graph per product;
* ``B batched``: the same double backward on one task-batched graph (fastmeta.func);
* ``C fastmeta``: :class:`fastmeta.rl.meta_fvp.MetaFisher` -- ``(1/T) sum_t J_t^T F_t J_t v``
  from batched ``task_hvp`` and the analytic Gaussian Fisher (no third-order graph);
* ``D func``: ``torch.func.jvp(torch.func.grad(KL))`` (forward-over-reverse) of the batched
  KL, recomputed per product (it has no reusable graph).

Correctness first: each product is compared with a float64 oracle (B at float64); a row over
1e-3 relative error is reported WRONG and not timed. Then ``build`` (everything a CG solve does
once: graphs / iterates / activations) and ``product`` (the mean of the 11 products one TRPO
step makes after one build) are timed, methods interleaved in every repetition. ``step``: one
whole TRPO meta-step (FVP build, outer gradient, 10 CG iterations + the trust-region product =
11 products, line search re-adapting every task) for A (per-task loop throughout, as
pytorch-maml-rl) and C (``MAMLTRPO.step``, which takes the trust-region product ``F x`` from
CG's residual: 10 products).

Clock: wall time at the default thread count; the thread's CPU time (``time.thread_time``) at 1
thread, which other processes on a shared CPU do not inflate.

``--phase``: the optimisation phase of one MAML-TRPO iteration (everything but env stepping:
the adaptation the validation rollouts are sampled with, then the whole TRPO step: baseline
fits and GAE of both batches, inner step, outer gradient, FVP build, 10 CG iterations + the
trust-region product (C: from CG's residual), line search, update) on rollouts sampled once from the real task
distributions at the CLI's configurations (``nav2d:20x20`` = 20 tasks x 20 episodes x 100
steps, ``cheetah-vel:20x10`` with the CLI's action scale 10), fastmeta (``agent.adapt`` +
``agent.step``) vs the per-task loop (per-task inner steps, double-backward FVPs), side by side,
interleaved; the gate compares the two updates of theta.

Usage::

    python bench/bench_meta_fvp.py [--quick] [--threads default,1] [--reps 5] [--no-save]
    python bench/bench_meta_fvp.py --phase nav2d:20x20,cheetah-vel:20x10 --threads 1

Writes the table to bench/results/meta_fvp.md (with the command) and JSON rows to
bench/results/meta_fvp-<device>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import RESULTS_DIR, add_common_args, busy_warning, env_info, parse_args  # noqa: E402
from _meta_fvp_impls import (fvp_batched_builder, fvp_func_builder, fvp_loop_builder,  # noqa: E402
                             phase_fastmeta, phase_loop, step_loop)
from fastmeta import rl  # noqa: E402
from fastmeta.rl import GaussianMLPPolicy, MAMLTRPO  # noqa: E402
from fastmeta.rl.meta_fvp import MetaFisher, adapt  # noqa: E402


def make_rollouts(T, N, obs_dim, act_dim, seed):
    """Synthetic rollouts of T tasks x N samples (E = N / 100 episodes of H = 100 steps)."""
    H = 100 if N >= 100 else N
    E = N // H
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(T, E, H)
    return SimpleNamespace(obs=torch.randn(T, E, H, obs_dim, generator=g), mask=mask,
                           actions=torch.randn(T, E, H, act_dim, generator=g),
                           rewards=torch.randn(T, E, H, generator=g))


def setup(T, N, obs_dim, act_dim, dtype):
    torch.manual_seed(0)
    pol = GaussianMLPPolicy(obs_dim, act_dim).to(dtype)
    agent = MAMLTRPO(pol)
    train, valid = make_rollouts(T, N, obs_dim, act_dim, 1), make_rollouts(T, N, obs_dim, act_dim, 2)
    obs, actions, adv, w = agent.batch(train)
    x, y = agent._inner(obs, actions, adv, w)
    xv, av, advv, wv = agent.batch(valid)
    d = SimpleNamespace(pol=pol, agent=agent, train=train, valid=valid, x=x, y=y, xv=xv, av=av, advv=advv, wv=wv)
    g = torch.Generator().manual_seed(3)
    d.v = torch.randn(sum(p.numel() for p in pol.parameters()), generator=g, dtype=torch.float64).to(dtype)
    return d


def setup_env(env, T, E, seed=0):
    """Rollouts sampled from ``env`` (T tasks x E episodes, the distribution's horizon) with a
    fresh policy (train) and its per-task adapted parameters (valid), as one CLI iteration."""
    kw = {"action_scale": 10.0} if env.startswith("cheetah") else {}
    dist = rl.make(env, **kw)
    torch.manual_seed(seed)
    pol = GaussianMLPPolicy(dist.obs_dim, dist.act_dim)
    agent = MAMLTRPO(pol)
    gen = torch.Generator().manual_seed(seed)
    tasks = dist.sample_tasks(T, seed)
    t0 = time.perf_counter()
    train = rl.sample(dist, agent.actor(None, gen), tasks, E, seed + 1)
    valid = rl.sample(dist, agent.actor(agent.adapt(train), gen), tasks, E, seed + 2)
    sample_s = time.perf_counter() - t0
    x, y = agent._inner(*agent.batch(train))
    xv, av, advv, wv = agent.batch(valid)
    return SimpleNamespace(pol=pol, agent=agent, train=train, valid=valid, x=x, y=y, xv=xv, av=av,
                           advv=advv, wv=wv, sample_s=sample_s, obs_dim=dist.obs_dim,
                           act_dim=dist.act_dim, steps=int(train.mask.sum() + valid.mask.sum()))


def run_phase(env, T, E, reps, one_thread):
    """Median phase times (ms) of fastmeta and the per-task loop, interleaved, on one set of
    rollouts; the gate: relative difference of the two updates of theta."""
    d = setup_env(env, T, E)
    sd = {k: v.clone() for k, v in d.pol.state_dict().items()}
    tick = clock(one_thread)
    times = {"A loop": [], "C fastmeta": []}
    for r in range(reps + 1):  # the first repetition warms up (not timed)
        for name, fn in (("A loop", phase_loop), ("C fastmeta", phase_fastmeta)):
            t0 = tick()
            fn(d)
            dt = (tick() - t0) * 1e3
            d.pol.load_state_dict(sd)
            if r:
                times[name].append(dt)
    # the gate, in float64 (float32 rounding is amplified by CG: the two float32 updates differ
    # by up to ~1e-1 where their float64 updates agree to ~1e-10)
    d.pol.double()
    d.x, d.y = d.agent._inner(*d.agent.batch(d.train))
    d.xv, d.av, d.advv, d.wv = d.agent.batch(d.valid)
    ua, uc = (torch.cat([u.reshape(-1) for u in fn(d).values()])
              for fn in (phase_loop, phase_fastmeta))
    err = ((ua - uc).norm() / ua.norm().clamp_min(1e-30)).item()
    med = {n: statistics.median(t) for n, t in times.items()}
    return dict(env=env, T=T, E=E, N=int(d.train.mask.shape[1] * d.train.mask.shape[2]),
                obs_dim=d.obs_dim, act_dim=d.act_dim, sample_s=d.sample_s, env_steps=d.steps,
                A_ms=med["A loop"], C_ms=med["C fastmeta"],
                A_p20=_q(times["A loop"], 0.2), A_p80=_q(times["A loop"], 0.8),
                C_p20=_q(times["C fastmeta"], 0.2), C_p80=_q(times["C fastmeta"], 0.8),
                update_err=err, update_norm=ua.norm().item())


def _phase_line(r):
    ok = "" if r["update_err"] < 1e-6 else " DIFFERENT"
    return (f"| {r['env']} | {r['T']} x {r['E']} ({r['N']}/task) | {r['obs_dim']}/{r['act_dim']} | "
            f"{r['A_ms']:.0f} ({r['A_p20']:.0f}-{r['A_p80']:.0f}) | {r['C_ms']:.0f} "
            f"({r['C_p20']:.0f}-{r['C_p80']:.0f}) | **{r['A_ms'] / r['C_ms']:.2f}x** | "
            f"{r['update_err']:.1e}{ok} | {r['sample_s']:.1f} s |")


def main_phase(args, argv):
    cases = []
    for item in args.phase.split(","):
        env, te = item.split(":")
        T, E = (int(v) for v in te.split("x"))
        cases.append((env, T, E))
    reps = args.reps or 3
    default_threads = torch.get_num_threads()
    warn = busy_warning()
    if warn:
        print(warn)
    info = env_info(torch.device("cpu"))
    lines, records = [], []
    for th in (args.thread_list or "1").split(","):
        n_threads = default_threads if th == "default" else int(th)
        torch.set_num_threads(n_threads)
        one = n_threads == 1
        lines.append(f"\n### {n_threads} thread(s), clock: {'thread CPU time' if one else 'wall'}, "
                     f"1-min load {_load()} at start\n")
        lines.append("| env | tasks x episodes | obs/act | A per-task loop ms (p20-p80) | "
                     "C fastmeta ms | C vs A | update rel diff | sampling (wall) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for env, T, E in cases:
            r = run_phase(env, T, E, reps, one)
            r["threads"] = n_threads
            records.append(r)
            lines.append(_phase_line(r))
            print(lines[-1], flush=True)
    if args.no_save:
        return
    cmd = "python bench/bench_meta_fvp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = RESULTS_DIR / "meta_fvp_phase.md"
    head = (f"\nCommand: `{cmd}`\n\nMachine: {info['device']}, torch {info['torch']}, git "
            f"{info['git_sha'][:10]}, {info['cpu_count']} CPUs. {warn}\n")
    if not (args.append and md.exists()):
        head = PHASE_HEADER + head
    with open(md, "a" if args.append and md.exists() else "w") as f:
        f.write(head + "\n".join(lines) + "\n")
    with open(RESULTS_DIR / f"meta_fvp_phase-{info['device_slug']}.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps({**r, **info}, default=str) + "\n")
    print(f"wrote {md}")


PHASE_HEADER = (
    "# The optimisation phase of a MAML-TRPO iteration (bench/bench_meta_fvp.py --phase)\n\n"
    "Everything of one meta-iteration but env stepping, on the same rollouts (sampled once from "
    "the task distribution with a fresh 64-64 tanh policy and its adapted parameters, seeded), "
    "float32: the adaptation the validation rollouts are sampled with, then the whole TRPO step "
    "(baseline fits + GAE of both batches, inner step, outer gradient, FVP build, 10 CG "
    "iterations + the trust-region product (C takes it from CG's residual), line search, update). A: the per-task loop of "
    "pytorch-maml-rl (per-task inner steps of an unbatched functional policy, a create_graph KL "
    "per task, a double backward per FVP, per-task line-search re-adaptation; advantages from "
    "the same batched baseline/GAE code). C: fastmeta's `MAMLTRPO.adapt` + `MAMLTRPO.step`. "
    "Medians over interleaved repetitions (after one warm-up each). `update rel diff`: "
    "||dtheta_A - dtheta_C|| / ||dtheta_A|| of one phase of each in float64 on the same "
    "rollouts (the gate: the same step; over 1e-6 is marked DIFFERENT; in float32 CG's "
    "rounding alone moves the two updates apart by up to 1e-1).\n")


def _load():
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def fvp_fastmeta_builder(d):
    fn_names = list(d.agent.fn.names)
    theta = {k: p.detach() for k, p in d.agent.fn.params().items()}
    assert list(theta) == fn_names
    iters = adapt(d.pol, d.agent.fn.expand(d.x.shape[0], theta), d.x, d.y, d.agent.fast_lr, 1)
    return MetaFisher(d.pol, iters, d.x, d.y, d.agent.fast_lr, d.xv, d.wv, 0.0).fvp


BUILDERS = {"A loop": fvp_loop_builder, "B batched": fvp_batched_builder, "C fastmeta": fvp_fastmeta_builder,
            "D func": fvp_func_builder}


PRODUCTS = 11  # per build, as in one TRPO step (10 CG iterations + the trust-region scaling)


def clock(threads_one: bool):
    return time.thread_time if threads_one else time.perf_counter


def run_case(T, N, obs_dim, act_dim, reps, one_thread, with_step):
    d64 = setup(T, N, obs_dim, act_dim, torch.float64)
    oracle = fvp_batched_builder(d64)(d64.v)
    d = setup(T, N, obs_dim, act_dim, torch.float32)
    rows, fvps, errs = {}, {}, {}
    for name, build in BUILDERS.items():
        try:
            fvp = build(d)
            out = fvp(d.v).double()
        except Exception as e:  # noqa: BLE001 - report, do not time
            rows[name] = dict(status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        err = ((out - oracle).norm() / oracle.norm()).item()
        errs[name] = err
        if not err < 1e-3:
            rows[name] = dict(status="WRONG", err=err)
            continue
        fvps[name] = (build, fvp)
    tick = clock(one_thread)
    times = {n: {"build": [], "product": []} for n in fvps}
    steps = {"A loop": [], "C fastmeta": []} if with_step else {}
    for _ in range(reps):  # interleaved: every method once per repetition
        for name, (build, _) in fvps.items():
            t0 = tick()
            fvp = build(d)
            t1 = tick()
            for _ in range(PRODUCTS):
                fvp(d.v)
            t2 = tick()
            times[name]["build"].append((t1 - t0) * 1e3)
            times[name]["product"].append((t2 - t1) * 1e3 / PRODUCTS)
        for name in steps:
            sd = {k: v.clone() for k, v in d.pol.state_dict().items()}
            t0 = tick()
            if name == "C fastmeta":
                d.agent.step(d.train, d.valid)
            else:
                step_loop(d)
            steps[name].append((tick() - t0) * 1e3)
            d.pol.load_state_dict(sd)
    for name in fvps:
        rows[name] = dict(status="ok", err=errs[name],
                          build_ms=statistics.median(times[name]["build"]),
                          product_ms=statistics.median(times[name]["product"]),
                          product_p20=_q(times[name]["product"], 0.2), product_p80=_q(times[name]["product"], 0.8))
    for name, ts in steps.items():
        rows.setdefault(name, {})["step_ms"] = statistics.median(ts)
    return rows


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T in {10,20}, N=200, dims 2x2, 1 thread, 2 reps: ~30 s")
    ap.add_argument("--tasks", default=None, help="comma list of T (default 10,20,40)")
    ap.add_argument("--samples", default=None, help="comma list of samples per task (default 200,2000)")
    ap.add_argument("--dims", default=None, help="comma list of obs_dim x act_dim (default 2x2,17x6)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-step", action="store_true", help="skip the whole-TRPO-step timing")
    ap.add_argument("--append", action="store_true", help="append to meta_fvp.md instead of replacing it")
    ap.add_argument("--phase", default=None, help="time the optimisation phase of one iteration "
                    "on sampled rollouts instead: comma list env:TxE (e.g. "
                    "nav2d:20x20,cheetah-vel:20x10)")
    ap.add_argument("--threads", default=None, dest="thread_list",  # not _common's int --threads
                    help="comma list: 'default' and/or integers (default: default,1; --quick: 1)")
    add_common_args(ap, "no-save")
    args = parse_args(ap, argv)
    if args.phase:
        return main_phase(args, argv)
    Ts = [int(t) for t in (args.tasks or ("10,20" if args.quick else "10,20,40")).split(",")]
    Ns = [int(n) for n in (args.samples or ("200" if args.quick else "200,2000")).split(",")]
    dims = [tuple(int(v) for v in d.split("x")) for d in (args.dims or ("2x2" if args.quick else "2x2,17x6")).split(",")]
    reps = args.reps or (2 if args.quick else 5)
    default_threads = torch.get_num_threads()
    warn = busy_warning()
    if warn:
        print(warn)
    lines, records = [], []
    for th in (args.thread_list or ("1" if args.quick else "default,1")).split(","):
        n_threads = default_threads if th == "default" else int(th)
        torch.set_num_threads(n_threads)
        one = n_threads == 1
        lines.append(f"\n### {n_threads} thread(s), clock: {'thread CPU time' if one else 'wall'}\n")
        lines.append("| obs/act | T | N/task | A loop product ms | B batched | C fastmeta | D func | C vs A | C vs B | "
                     "build A / C ms | TRPO step A / C ms | step C vs A | max rel err |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for od, ad in dims:
            for N in Ns:
                for T in Ts:
                    rows = run_case(T, N, od, ad, reps, one, not args.no_step)
                    rec = dict(obs_dim=od, act_dim=ad, T=T, N=N, threads=n_threads, rows=rows)
                    records.append(rec)
                    lines.append(_line(rec))
                    print(lines[-1], flush=True)
    text = "\n".join(lines)
    if not args.no_save:
        info = env_info(torch.device("cpu"))
        cmd = "python bench/bench_meta_fvp.py " + " ".join(argv if argv is not None else sys.argv[1:])
        md = RESULTS_DIR / "meta_fvp.md"
        if args.append and md.exists():
            with open(md, "a") as f:
                f.write(f"\nCommand: `{cmd}` (load {info['loadavg_1m']} at start)\n" + text + "\n")
        else:
            md.write_text(_header(cmd, info, warn) + text + "\n")
        with open(RESULTS_DIR / f"meta_fvp-{info['device_slug']}.jsonl", "a") as f:
            for r in records:
                f.write(json.dumps({**r, **info}, default=str) + "\n")
        print(f"wrote {md}")


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _line(rec):
    r = rec["rows"]

    def p(n):
        row = r.get(n, {})
        return row.get("product_ms") if row.get("status") == "ok" else None

    def cell(n):
        row = r.get(n, {})
        return _fmt(p(n)) if row.get("status") == "ok" else row.get("status", "-")

    a, b, c = p("A loop"), p("B batched"), p("C fastmeta")
    sa, sc = r.get("A loop", {}).get("step_ms"), r.get("C fastmeta", {}).get("step_ms")
    errs = [row["err"] for row in r.values() if "err" in row]
    return (f"| {rec['obs_dim']}/{rec['act_dim']} | {rec['T']} | {rec['N']} | {cell('A loop')} | {cell('B batched')} | "
            f"{cell('C fastmeta')} | {cell('D func')} | {_fmt(a / c if a and c else None)}x | "
            f"{_fmt(b / c if b and c else None)}x | {_fmt(r.get('A loop', {}).get('build_ms'), '.1f')} / "
            f"{_fmt(r.get('C fastmeta', {}).get('build_ms'), '.1f')} | {_fmt(sa, '.0f')} / {_fmt(sc, '.0f')} | "
            f"{_fmt(sa / sc if sa and sc else None)}x | {_fmt(max(errs) if errs else None, '.1e')} |")


def _header(cmd, info, warn):
    return (f"# Meta-FVP of MAML-TRPO (bench/bench_meta_fvp.py)\n\nCommand: `{cmd}`\n\n"
            f"Machine: {info['device']}, torch {info['torch']}, git {info['git_sha'][:10]}, "
            f"1-min load {info['loadavg_1m']} on {info['cpu_count']} CPUs at start. {warn}\n\n"
            "float32, Gaussian 64-64 tanh policy, one inner step (lr 0.1), same rollouts and "
            "parameters for every method; medians over interleaved repetitions. `product`: one "
            "F_meta v (mean of the 11 products made after one build); `build`: the per-solve setup; `TRPO step`: FVP build + gradient + 11 "
            "products + line search (A: per-task loop throughout; C: MAMLTRPO.step, 10 products: "
            "the trust-region product from CG's residual). "
            "`max rel err`: largest ||F v - oracle|| / ||oracle|| over the methods, oracle = B at float64.\n")


if __name__ == "__main__":
    main()
