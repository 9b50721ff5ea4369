"""Reptile and iMAML (issue 17): memory as the number of inner steps k grows, and the meta-step
time of fastmeta's task-batched learners against a per-task loop.

Workload: glyphs-sized 5-way 1-shot episodes (28x28, 15 queries per class), T=8 tasks per
meta-batch (the demo recipe's), a plain ``nn.Sequential`` Conv4 (hidden 32, BatchNorm on batch
statistics) + a 5-way linear head -- the model a user writes, handed to fastmeta as it is.

1. **Memory vs k** (1, 5, 10, 20): peak bytes live during one meta-step (forward + backward)
   beyond its inputs, from torch's profiler allocator events at 1 thread (bench/_common.py's
   ``peak_memory_bytes``: every tensor the c10 CPU allocator hands out -- activations saved for
   backward, parameter iterates, temporaries). Rows: ``fastmeta.iMAML`` (cg_steps 5),
   ``fastmeta.Reptile``, ``fastmeta.MAML`` second order (inner_loop: recomputes activations,
   keeps the k parameter iterates) and an unrolled second-order MAML
   (``torch.autograd.grad(create_graph=True)`` over the same task-batched model: keeps every
   step's activations and double-backward graph).
2. **Meta-step time** at k=5: fastmeta's Reptile / iMAML (all T tasks at once) against the
   per-task loop research code writes (``torch.func.functional_call`` on the plain model, one
   task after another; iMAML's Hessian-vector products by double backward, per task), each
   pair doing the same work: ``Reptile.meta_loss`` reports the adapted parameters' query loss
   and accuracy (a forward of T*Q images), so it is timed against a loop that does that too,
   and ``meta_loss(sx, sy)`` (no query set, report on the support set) against the plain loop
   that reports nothing. The
   implementations are timed interleaved (one call of each in turn, ``--rounds`` times) so that
   the load of a shared machine falls on all of them alike; at 1 intra-op thread and at torch's
   default. Correct first: each loop's meta-gradient is compared with fastmeta's on the same
   weights and data in float64 before timing.

Usage::

    python bench/bench_reptile_imaml.py [--ks 1,5,10,20] [--threads 1,0] [--rounds 10] [--T 8]

(``--threads 0``: torch's default). Prints markdown tables (bench/results/reptile_imaml.md holds
a run) and appends JSON rows to ``bench/results/reptile_imaml-<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import _common as C  # noqa: E402
from bench_inner_loop import meta_step_unrolled  # noqa: E402

from fastmeta.learners import MAML, Reptile, iMAML  # noqa: E402

LR, LAM, CG = 0.002, 200.0, 5
# (fastmeta, the per-task loop doing the same work): Reptile's meta_loss reports the adapted
# parameters' query loss and accuracy, a forward the plain loop leaves out
PAIRS = [("fastmeta.Reptile", "per-task loop Reptile + query report"),
         ("fastmeta.Reptile, no query set", "per-task loop Reptile"),
         ("fastmeta.iMAML", "per-task loop iMAML")]


def conv4(hidden=32, n_way=5):
    layers = []
    for c in (1, hidden, hidden, hidden):
        layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, n_way))


def episodes(T, dtype=torch.float32, n_way=5, shots=1, queries=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n_way * shots, 1, 28, 28, generator=g, dtype=dtype)
    qx = torch.randn(T, n_way * queries, 1, 28, 28, generator=g, dtype=dtype)
    sy = torch.arange(n_way).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(n_way).repeat_interleave(queries).expand(T, -1).contiguous()
    return sx, sy, qx, qy


# ---- the per-task loops research code writes ---------------------------------------------------


def _adapt_loop(model, theta, x, y, k, lam=0.0):
    phi = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
    for _ in range(k):
        g = torch.autograd.grad(F.cross_entropy(functional_call(model, phi, (x,)), y), list(phi.values()))
        phi = {n: (p - LR * (gi + lam * (p - theta[n]))).detach().requires_grad_()
               for (n, p), gi in zip(phi.items(), g)}
    return phi


def reptile_loop(model, k, report=False):
    """Per task: k SGD steps, then (``report``) the adapted parameters' query loss and accuracy
    under no_grad -- the report fastmeta.Reptile.meta_loss makes; returns the per-task losses."""
    def step(sx, sy, qx, qy):
        theta = {n: p.detach() for n, p in model.named_parameters()}
        total = {n: torch.zeros_like(p) for n, p in theta.items()}
        losses, accs = [], []
        for t in range(sx.shape[0]):
            phi = _adapt_loop(model, theta, sx[t], sy[t], k)
            for n in total:
                total[n] += theta[n] - phi[n].detach()
            if report:
                with torch.no_grad():
                    out = functional_call(model, phi, (qx[t],))
                    losses.append(F.cross_entropy(out, qy[t]))
                    accs.append((out.argmax(-1) == qy[t]).to(out.dtype).mean())
        for n, p in model.named_parameters():
            p.grad = total[n] / sx.shape[0]
        return torch.stack(losses) if report else None

    return step


def imaml_loop(model, k):
    def step(sx, sy, qx, qy):
        theta = {n: p.detach() for n, p in model.named_parameters()}
        total = {n: torch.zeros_like(p) for n, p in theta.items()}
        for t in range(sx.shape[0]):
            phi = _adapt_loop(model, theta, sx[t], sy[t], k, LAM)
            params = list(phi.values())
            gq = torch.autograd.grad(F.cross_entropy(functional_call(model, phi, (qx[t],)), qy[t]), params)
            gs = torch.autograd.grad(F.cross_entropy(functional_call(model, phi, (sx[t],)), sy[t]), params,
                                     create_graph=True)
            # conjugate gradient on (I + H/lam) x = gq, H v by double backward
            x = [torch.zeros_like(g) for g in gq]
            r = [g.clone() for g in gq]
            p = [g.clone() for g in gq]
            rr = sum((a * a).sum() for a in r)
            for _ in range(CG):
                hv = torch.autograd.grad(gs, params, grad_outputs=p, retain_graph=True)
                ap = [pi + h / LAM for pi, h in zip(p, hv)]
                alpha = rr / sum((a * b).sum() for a, b in zip(p, ap))
                x = [xi + alpha * pi for xi, pi in zip(x, p)]
                r = [ri - alpha * a for ri, a in zip(r, ap)]
                rr_new = sum((a * a).sum() for a in r)
                p = [ri + rr_new / rr * pi for ri, pi in zip(r, p)]
                rr = rr_new
            for n, xi in zip(total, x):
                total[n] += xi
        for n, p in model.named_parameters():
            p.grad = total[n] / sx.shape[0]

    return step


def fastmeta_step(learner, query=True):
    """One meta-step; ``query=False``: Reptile without a query set (its report on the support
    set: the work of the plain per-task loop, which reports nothing)."""
    def step(sx, sy, qx, qy):
        for p in learner.parameters():
            p.grad = None
        res = learner.meta_loss(sx, sy, qx, qy) if query else learner.meta_loss(sx, sy)
        res.loss.backward()
        return res.task_loss

    return step


def unrolled_maml(model, k):
    def step(sx, sy, qx, qy):
        return meta_step_unrolled(model, (sx, sy, qx, qy), F.cross_entropy, LR, k)()

    return step


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def check(T=3, k=3) -> dict:
    """float64: each per-task loop's meta-gradient against fastmeta's (relative error)."""
    torch.manual_seed(0)
    model = conv4().double()
    data = episodes(T, torch.float64)
    out = {}
    reptile = Reptile(model, LR, steps=k)
    imaml = iMAML(model, LR, lam=LAM, steps=k, cg_steps=CG)
    for name, fast, loop in (
            ("reptile", fastmeta_step(reptile), reptile_loop(model, k, report=True)),
            ("reptile, no query", fastmeta_step(reptile, query=False), reptile_loop(model, k)),
            ("imaml", fastmeta_step(imaml), imaml_loop(model, k))):
        fast_losses = fast(*data)
        ref = grads(model)
        loop_losses = loop(*data)
        out[name] = float((grads(model) - ref).norm() / ref.norm())
        if name == "reptile":  # the report too: the query losses of the adapted parameters
            out["reptile report"] = float((loop_losses - fast_losses).norm() / fast_losses.norm())
    return out


def memory_rows(T, ks) -> list[dict]:
    C.warm_profiler()
    rows = []
    for k in ks:
        torch.manual_seed(0)
        model = conv4()
        data = episodes(T)
        impls = {"fastmeta.iMAML": fastmeta_step(iMAML(model, LR, lam=LAM, steps=k, cg_steps=CG)),
                 "fastmeta.Reptile": fastmeta_step(Reptile(model, LR, steps=k)),
                 "fastmeta.MAML (2nd order)": lambda *d, m=MAML(model, LR): m.meta_loss(*d, steps=k).loss.backward(),
                 "unrolled MAML (create_graph)": unrolled_maml(model, k)}
        for name, step in impls.items():
            step(*data)  # warm-up (tracing, caches)
            peak = C.peak_memory_bytes(lambda: step(*data), device="cpu")
            rows.append(dict(part="memory", impl=name, k=k, T=T, peak_mb=peak / 2**20))
            print(f"memory k={k:2d} {name:30s} {peak / 2**20:8.1f} MB", flush=True)
    return rows


def time_rows(T, k, threads_list, rounds) -> list[dict]:
    rows = []
    default = torch.get_num_threads()
    for threads in threads_list:
        torch.set_num_threads(threads or default)
        torch.manual_seed(0)
        model = conv4()
        data = episodes(T)
        reptile = Reptile(model, LR, steps=k)
        impls = {"fastmeta.Reptile": fastmeta_step(reptile),
                 "per-task loop Reptile + query report": reptile_loop(model, k, report=True),
                 "fastmeta.Reptile, no query set": fastmeta_step(reptile, query=False),
                 "per-task loop Reptile": reptile_loop(model, k),
                 "fastmeta.iMAML": fastmeta_step(iMAML(model, LR, lam=LAM, steps=k, cg_steps=CG)),
                 "per-task loop iMAML": imaml_loop(model, k)}
        times = {n: [] for n in impls}
        for step in impls.values():
            step(*data)
        for _ in range(rounds):  # interleaved: each round times every implementation once
            for name, step in impls.items():
                t0 = time.perf_counter()
                step(*data)
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name, ts in times.items():
            s = C.summarize_ms(ts)
            rows.append(dict(part="time", impl=name, k=k, T=T, threads=torch.get_num_threads(), **s))
        for fast_name, loop_name in PAIRS:
            fast, loop = (statistics.median(times[n]) for n in (fast_name, loop_name))
            print(f"time threads={torch.get_num_threads()} {fast_name}: {fast:.0f} ms, "
                  f"{loop_name}: {loop:.0f} ms, {loop / fast:.2f}x", flush=True)
            rows.append(dict(part="ratio", impl=fast_name, baseline=loop_name, k=k, T=T,
                             threads=torch.get_num_threads(), loop_over_fastmeta=loop / fast))
    torch.set_num_threads(default)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5, 10, 20])
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--time-k", type=int, default=5)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--skip-memory", action="store_true",
                   help="only the timing (and the float64 check)")
    a = p.parse_args(argv)
    errs = check()
    print(f"float64 meta-gradient, per-task loop vs fastmeta (rel err): {errs}", flush=True)
    bad = {n: e for n, e in errs.items() if not e < 1e-8}
    if bad:
        raise SystemExit(f"the per-task loops disagree with fastmeta: {bad}")
    if a.skip_memory:
        a.ks = []
    rows = memory_rows(a.T, a.ks) + time_rows(a.T, a.time_k, a.threads, a.rounds)
    info = C.env_info(torch.device("cpu"))
    if a.ks:
        names = sorted({r['impl'] for r in rows if r['part'] == 'memory'})
        print("\n| k | " + " | ".join(names) + " |")
    for k in a.ks:
        vals = {r["impl"]: r["peak_mb"] for r in rows if r["part"] == "memory" and r["k"] == k}
        print(f"| {k} | " + " | ".join(f"{vals[n]:.1f}" for n in sorted(vals)) + " |")
    print("\n| threads | implementation | median ms | p20-p80 ms |")
    for r in rows:
        if r["part"] == "time":
            print(f"| {r['threads']} | {r['impl']} | {r['median_ms']:.0f} | {r['p20_ms']:.0f}-{r['p80_ms']:.0f} |")
    print("\n| threads | fastmeta | per-task loop (same work) | loop / fastmeta |")
    for r in rows:
        if r["part"] == "ratio":
            print(f"| {r['threads']} | {r['impl']} | {r['baseline']} | "
                  f"{r['loop_over_fastmeta']:.2f}x |")
    if not a.no_save:
        out = Path(__file__).resolve().parent / "results" / f"reptile_imaml-{C.device_slug(torch.device('cpu'))}.jsonl"
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, **info, "check_rel_err": errs}) + "\n")
        print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
