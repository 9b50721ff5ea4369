"""Benchmark ``fastmeta.func.inner_loop`` and ``fastmeta.func.task_hvp``.

1. **Meta-step memory curve** (the issue's "memory flat in k"): one second-order MAML
   meta-step -- k inner steps on the support set, the query loss, the gradient w.r.t. the
   shared parameters -- on TaskConv4 (T=32 tasks, 5-way 1-shot, 15 queries per class,
   28x28, hidden 64) for k = 1, 5, 10:

   * ``inner_loop[<hvp>]``: ``fastmeta.func.inner_loop`` (one autograd op; its backward runs k
     batched HVPs with recomputation), with the task_hvp backend named in brackets;
   * ``unrolled`` (baseline): the same task-batched model unrolled with
     ``torch.autograd.grad(create_graph=True)`` -- every step's activations and
     double-backward graph stay alive until the outer backward.

   Time (median, p20/p80) and peak memory beyond the inputs (bench/_common.py rules: CPU
   peak from the profiler's allocator events at 1 thread); ``+MB/step`` is the growth of the
   peak per extra inner step between the smallest and largest k, next to the size of one
   parameter iterate (``T x #params``), the growth inner_loop is designed to have.
2. **Batched HVP**: ``task_hvp`` backends (analytic, func, reference) against a plain double
   backward written out (baseline) on the sinusoid TaskMLP (1-40-40-1 ReLU, MSE, T=25, K=10).
3. **Sinusoid meta-step**: inner_loop vs the unrolled loop on the same TaskMLP, k = 1 and 5.

Correctness first: before timing, every row's outputs (meta-gradients / HVPs) are compared
with a float64 oracle (the per-task ``create_graph`` loop / per-task double backward) on the
same architecture with T=2 tasks (the algorithms do not depend on T); ``rel err`` is
``||out - ref|| / ||ref||`` of the row's own dtype. A wrong row is reported, not timed.

Usage::

    python bench/bench_inner_loop.py [--quick] [--parts conv4,hvp,sinusoid] [--ks 1,5,10]
        [--backends reference,func] [--device cpu|cuda] [--threads N] [--clock wall|thread]
        [--budget SECONDS] [--min-reps N] [--no-save]

On a shared, loaded CPU use ``--threads 1 --clock thread`` (per-call CPU time of the one
thread, not wall time; see ``time_thread_cpu``).

``--quick``: a smoke config (Conv4 T=4 hidden 16, k = 1, 2, 4; T=5 for the MLP; short
budget). Appends JSON rows to ``bench/results/inner_loop-<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

from fastmeta.func import task_function, task_losses  # noqa: E402
from fastmeta.nn import TaskConv4, TaskMLP  # noqa: E402
from fastmeta.func import inner_loop, task_hvp  # noqa: E402


# ---- models and data --------------------------------------------------------------------------


def conv4_setup(T, hidden, n_way=5, shots=1, queries=15, size=28, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = TaskConv4(1, n_way, hidden, size).to(device, dtype)
    sx = torch.randn(T, n_way * shots, 1, size, size, device=device, dtype=dtype)
    sy = torch.arange(n_way, device=device).repeat_interleave(shots).expand(T, -1).contiguous()
    qx = torch.randn(T, n_way * queries, 1, size, size, device=device, dtype=dtype)
    qy = torch.arange(n_way, device=device).repeat_interleave(queries).expand(T, -1).contiguous()
    return model, (sx, sy, qx, qy), F.cross_entropy, 0.4


def sinusoid_setup(T, K=10, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = TaskMLP([1, 40, 40, 1], "relu").to(device, dtype)
    amp = torch.rand(T, 1, 1, device=device, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, device=device, dtype=dtype) * 3.14159
    sx = torch.rand(T, K, 1, device=device, dtype=dtype) * 10 - 5
    qx = torch.rand(T, K, 1, device=device, dtype=dtype) * 10 - 5
    return model, (sx, amp * torch.sin(sx + phase), qx, amp * torch.sin(qx + phase)), F.mse_loss, 0.01


# ---- meta-step implementations ----------------------------------------------------------------


def meta_step_inner_loop(model, data, loss_fn, lr, k, backend):
    fn = task_function(model)
    own = list(fn.params().values())
    sx, sy, qx, qy = data

    def step():
        fast = inner_loop(fn, fn.expand(sx.shape[0]), sx, sy, k, lr, loss_fn=loss_fn,
                          hvp_backend=backend, recompute=True)  # the recomputing design's memory
        loss = task_losses(loss_fn, fn(fast, qx), qy).mean()
        return torch.autograd.grad(loss, own)

    return step


def meta_step_unrolled(model, data, loss_fn, lr, k, _backend=None):
    fn = task_function(model)
    own = list(fn.params().values())
    sx, sy, qx, qy = data

    def step():
        p = fn.expand(sx.shape[0])
        for _ in range(k):
            inner = task_losses(loss_fn, fn(p, sx), sy).sum()
            g = torch.autograd.grad(inner, list(p.values()), create_graph=True)
            p = {name: t - lr * gi for (name, t), gi in zip(p.items(), g)}
        loss = task_losses(loss_fn, fn(p, qx), qy).mean()
        return torch.autograd.grad(loss, own)

    return step


def meta_grad_oracle(model, data, loss_fn, lr, k):
    """float64, per task, torch.autograd.grad(create_graph=True): the reference meta-gradient."""
    fn = task_function(model)
    own = fn.params()
    sx, sy, qx, qy = data
    total = 0
    for t in range(sx.shape[0]):
        p = dict(own)
        for _ in range(k):
            out = model(sx[t:t + 1], params={n: v[None] for n, v in p.items()})[0]
            g = torch.autograd.grad(loss_fn(out, sy[t]), list(p.values()), create_graph=True)
            p = {n: v - lr * gi for (n, v), gi in zip(p.items(), g)}
        out = model(qx[t:t + 1], params={n: v[None] for n, v in p.items()})[0]
        total = total + loss_fn(out, qy[t])
    return torch.autograd.grad(total / sx.shape[0], list(own.values()))


def rel_err(outs, refs) -> float:
    num = sum(float((o.double() - r.double()).norm() ** 2) for o, r in zip(outs, refs)) ** 0.5
    den = sum(float(r.double().norm() ** 2) for r in refs) ** 0.5
    return num / den if den else num


# ---- running rows -----------------------------------------------------------------------------


def _case(op, name, params, dtype, device):
    return C.Case(op=op, name=name, params=params, dtype=dtype, device=torch.device(device),
                  make_inputs=lambda seed: (), reference=lambda: None, grad_argnums=(), min_bytes={})


MIN_REPS = [3]
CLOCK = ["wall"]
MEASURE_MEMORY = [True]


def time_thread_cpu(step, budget, min_reps):
    """Median/p20/p80 of the calling thread's CPU time (``time.thread_time``) per call: with
    one intra-op thread this is the compute time of the call, unaffected by other processes
    holding the cores (wall time on a CPU shared by a load of 8 is mostly waiting)."""
    import time

    step()
    t0 = time.thread_time()
    step()
    est = max(time.thread_time() - t0, 1e-6)
    reps = int(max(min_reps, min(500, budget / est)))
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        step()
        times.append((time.thread_time() - t0) * 1e3)
    return dict(C.summarize_ms(times), n=reps)


def run_row(case, impl, baseline, step, err, budget, tol):
    if err != err or err > tol:
        return C.Result(case, "fwd+bwd", impl, baseline, "WRONG", f"rel err {err:.3g} > tol {tol:.1g}; not timed",
                        err=err)
    try:
        if CLOCK[0] == "thread" and case.device.type == "cpu":
            t = time_thread_cpu(step, budget, MIN_REPS[0])
        else:
            t = C.time_fn(step, device=case.device, budget_s=budget, min_reps=MIN_REPS[0])
        peak = C.peak_memory_bytes(step, device=case.device) if MEASURE_MEMORY[0] else None
    except Exception as exc:  # noqa: BLE001 - the row says what happened
        return C.Result(case, "fwd+bwd", impl, baseline, "failed", C._first_line(exc), err=err)
    finally:
        C._free_device(case.device)
    return C.Result(case, "fwd+bwd", impl, baseline, "ok", "", t["median_ms"], t["p20_ms"], t["p80_ms"], t["n"],
                    peak, err)


def meta_step_rows(setup, setup_kw, check_kw, ks, backends, label, device, budget, log):
    """Rows for inner_loop[<backend>] and unrolled, for every k."""
    rows = []
    model, data, loss_fn, lr = setup(**setup_kw, device=device)
    fn = task_function(model)
    iterate_mb = sum(p.numel() for p in fn.params().values()) * data[0].shape[0] * data[0].element_size() / 2**20
    small, sdata, _, _ = setup(**check_kw, dtype=torch.float64, device=device, seed=1)
    small_dt = copy.deepcopy(small).to(data[0].dtype)
    sdata_dt = tuple(t.to(data[0].dtype) if t.is_floating_point() else t for t in sdata)
    impls = [(f"inner_loop[{b}]", meta_step_inner_loop, b, False) for b in backends]
    impls.append(("unrolled", meta_step_unrolled, None, True))
    for k in ks:
        case = _case("inner_loop", label, dict(**setup_kw, k=k), data[0].dtype, device)
        ref = meta_grad_oracle(small, sdata, loss_fn, lr, k)
        for name, make, backend, baseline in impls:
            log(f"... {label} k={k} {name}")
            err = rel_err(make(small_dt, sdata_dt, loss_fn, lr, k, backend)(), ref)
            rows.append(run_row(case, name, baseline, make(model, data, loss_fn, lr, k, backend), err, budget,
                                C.DEFAULT_TOL[data[0].dtype]))
            r = rows[-1]
            log(f"    {name} k={k}: {r.status} median {C._fmt_ms(r.median_ms)} ms, "
                f"peak {C._fmt_mb(r.peak_bytes)} MB, rel err {err:.1e}")
    C.fill_speedups(rows)
    return rows, iterate_mb


def growth_lines(rows, ks, iterate_mb):
    lines = [f"one parameter iterate (T x #params): {iterate_mb:.2f} MB"]
    by_impl = {}
    for r in rows:
        if r.ok and r.peak_bytes is not None:
            by_impl.setdefault(r.impl, {})[r.case.params["k"]] = r.peak_bytes / 2**20
    lo, hi = min(ks), max(ks)
    for impl, peaks in by_impl.items():
        if lo in peaks and hi in peaks and hi > lo:
            per = (peaks[hi] - peaks[lo]) / (hi - lo)
            lines.append(f"{impl}: peak {peaks[lo]:.1f} MB at k={lo} -> {peaks[hi]:.1f} MB at k={hi}: "
                         f"+{per:.2f} MB/step ({per / iterate_mb:.2f} iterates/step)")
    return lines


def hvp_rows(T, K, device, budget, log):
    rows = []
    model, data, loss_fn, _ = sinusoid_setup(T, K, device=device)
    fn = task_function(model)
    sx, sy = data[0], data[1]
    params = {n: p.detach() + 0.1 * torch.randn(T, *p.shape, device=device) for n, p in fn.params().items()}
    v = {n: torch.randn_like(p) for n, p in params.items()}

    def double_backward(model_, params_, x, y, v_):
        p = {n: t.detach().requires_grad_() for n, t in params_.items()}
        losses = task_losses(loss_fn, task_function(model_)(p, x), y)
        g = torch.autograd.grad(losses.sum(), list(p.values()), create_graph=True)
        return torch.autograd.grad(g, list(p.values()), grad_outputs=list(v_.values()))

    # oracle: float64, T=2, per task
    small, sdata, _, _ = sinusoid_setup(2, K, dtype=torch.float64, device=device, seed=1)
    sfn = task_function(small)
    sp = {n: p.detach() + 0.1 * torch.randn(2, *p.shape, device=device, dtype=torch.float64)
          for n, p in sfn.params().items()}
    sv = {n: torch.randn_like(p) for n, p in sp.items()}
    ref = []
    for t in range(2):
        p = {n: val[t].clone().requires_grad_() for n, val in sp.items()}
        loss = loss_fn(small(sdata[0][t:t + 1], params={n: q[None] for n, q in p.items()})[0], sdata[1][t])
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        ref.append(torch.autograd.grad(g, list(p.values()), grad_outputs=[sv[n][t] for n in p]))
    ref = [torch.stack([r[i] for r in ref]) for i in range(len(sp))]
    small32 = small.float()
    sp32 = {n: t.float() for n, t in sp.items()}
    sv32 = {n: t.float() for n, t in sv.items()}
    sx32, sy32 = sdata[0].float(), sdata[1].float()

    case = _case("task_hvp", "sinusoid-mlp", dict(T=T, K=K, widths="1-40-40-1"), torch.float32, device)
    impls = [(f"task_hvp[{b}]", (lambda b: lambda m, p, x, y, vv: list(
        task_hvp(m, p, x, y, vv, loss_fn=loss_fn, backend=b).values()))(b), False)
        for b in ("analytic", "func", "reference")]
    impls.append(("double backward", double_backward, True))
    for name, f, baseline in impls:
        log(f"... task_hvp {name}")
        err = rel_err(f(small32, sp32, sx32, sy32, sv32), ref)
        rows.append(run_row(case, name, baseline, lambda f=f: f(model, params, sx, sy, v), err, budget,
                            C.DEFAULT_TOL[torch.float32]))
    C.fill_speedups(rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke config (seconds)")
    ap.add_argument("--parts", default="conv4,hvp,sinusoid")
    ap.add_argument("--ks", default=None, help="inner steps for the Conv4 memory curve (default 1,5,10)")
    ap.add_argument("--backends", default="reference,func", help="task_hvp backends for Conv4 inner_loop rows")
    ap.add_argument("--min-reps", type=int, default=3, help="timed calls per row at least (1 for the big Conv4)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: CPU time of the calling thread (CPU only; use with --threads 1 on a "
                         "loaded machine)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory call of each row")
    C.add_common_args(ap, "device", "threads", "budget", "results-dir", "no-save")
    args = C.parse_args(ap, argv)
    device = args.device
    warn = C.busy_warning()
    if warn and device.type == "cpu":
        print(warn)
    MIN_REPS[0] = args.min_reps
    CLOCK[0] = args.clock
    MEASURE_MEMORY[0] = not args.no_memory
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise SystemExit("--clock thread measures one thread's CPU time: add --threads 1")
    parts = args.parts.split(",")
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 2.0)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else ([1, 2, 4] if args.quick else [1, 5, 10])
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    results, notes = [], []
    if "conv4" in parts:
        kw = dict(T=4, hidden=16) if args.quick else dict(T=32, hidden=64)
        rows, it_mb = meta_step_rows(conv4_setup, kw, dict(T=2, hidden=4), ks, args.backends.split(","),
                                     "conv4-5w1s15q", device, budget, log)
        results += rows
        notes += growth_lines(rows, ks, it_mb)
    if "hvp" in parts:
        results += hvp_rows(5 if args.quick else 25, 10, device, budget, log)
    if "sinusoid" in parts:
        rows, _ = meta_step_rows(sinusoid_setup, dict(T=5 if args.quick else 25, K=10), dict(T=2, K=10), [1, 5],
                                 ["analytic", "func"], "sinusoid-mlp", device, budget, log)
        results += rows
    C.print_table(results)
    for line in notes:
        print(line)
    if not args.no_save:
        path = C.save_rows(results, "inner_loop", results_dir=args.results_dir,
                           extra=dict(quick=args.quick, clock=args.clock))
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
