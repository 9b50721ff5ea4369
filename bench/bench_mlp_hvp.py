"""Benchmark ``fastmeta.ops.mlp_grad_hvp`` (per-task loss + gradient + exact HVP of a small
MLP, T tasks at once) against what research code does for second-order MAML today.

Compared in one run, per case (all produce losses [T], gradients and H_t v_t for every task):

* ``fastmeta[auto]`` and ``fastmeta[<backend>]`` for every non-reference backend that can
  run on the device (Triton on the CPU is the interpreter: left out unless asked for);
* ``double-bwd`` (baseline): torch double backward on the summed per-task losses of the
  task-batched (bmm) MLP, ``fastmeta.ops.mlp_grad_hvp_ref`` (create_graph=True, then a
  second ``autograd.grad`` of ``<g, v>``);
* ``func-fwd-over-rev`` (baseline): ``torch.func.jvp`` of ``torch.func.grad_and_value`` of
  one task's loss, ``vmap``-ed over T (torch.func's recommended HVP);
* ``loop`` (baseline): a per-task Python loop of double backward on ``nn.functional``
  layers, as learn2learn/higher-style code computes it.

Cases: ``sinusoid`` (MAML's regression MLP 1-40-40-1, relu, mse, T=25 tasks, N=10 shots),
``sinusoid-tanh`` (same with tanh: exercises the act'' term), ``classifier`` (a 5-way MLP
784-256-128-64-5, relu, cross_entropy, T=32, N=5). Each implementation is checked against
a float64 oracle (max relative error over losses, gradients and HVPs) before it is timed.
Timing/memory rules: ``bench/_common.py`` (median, p20/p80, peak memory of one call).

Script::

    python bench/bench_mlp_hvp.py [--cases sinusoid,sinusoid-tanh,classifier] [--quick]
        [--device cpu|cuda] [--dtype float32] [--threads N] [--budget S] [--backends cpp]
        [--results-dir DIR] [--no-save]

prints one table per case and appends JSON rows to ``bench/results/mlp_hvp-<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402
import fastmeta.ops as fm  # noqa: E402

STEM = "mlp_hvp"
PASS = "grad+hvp"

CASES = {
    "sinusoid": dict(sizes=(1, 40, 40, 1), T=25, N=10, activation="relu", loss="mse"),
    "sinusoid-tanh": dict(sizes=(1, 40, 40, 1), T=25, N=10, activation="tanh", loss="mse"),
    "classifier": dict(sizes=(784, 256, 128, 64, 5), T=32, N=5, activation="relu",
                       loss="cross_entropy"),
}
BASELINES = ["double-bwd", "func-fwd-over-rev", "loop"]
_ACT = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
        "identity": lambda t: t}


def make_inputs(p: dict, device, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    sizes, T, N = p["sizes"], p["T"], p["N"]
    pairs = list(zip(sizes[:-1], sizes[1:]))

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    ws = [r(T, o, i, scale=(2.0 / i) ** 0.5) for i, o in pairs]
    bs = [r(T, o, scale=0.1) for _, o in pairs]
    vw = [r(T, o, i, scale=(1.0 / i) ** 0.5) for i, o in pairs]
    vb = [r(T, o, scale=0.1) for _, o in pairs]
    if sizes[0] == 1:  # sinusoid: x in [-5, 5], y = A sin(x - phase)
        x = (torch.rand(T, N, 1, generator=g) * 10 - 5)
        amp = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1
        phase = torch.rand(T, 1, 1, generator=g) * 3.1416
        x, y = x.to(device, dtype), (amp * torch.sin(x - phase)).to(device, dtype)
    else:
        x = r(T, N, sizes[0])
        y = torch.randint(0, sizes[-1], (T, N), generator=g).to(device)
    return ws, bs, x, y, vw, vb


def _flat(out) -> list[torch.Tensor]:
    res = []
    for item in out:
        if item is None:
            continue
        res.extend([item] if isinstance(item, torch.Tensor) else list(item))
    return res


# ---- baselines -----------------------------------------------------------------------------


def make_double_bwd(act, loss):
    def run(ws, bs, x, y, vw, vb):
        return fm.mlp_grad_hvp_ref(ws, bs, x, y, vw, vb, act, loss)

    return run


def _task_loss(act, loss, L):
    f = _ACT[act]

    def task_loss(params, x, y):
        h = x
        for i in range(L):
            h = F.linear(h, params[i], params[L + i])
            if i + 1 < L:
                h = f(h)
        # (h - y)^2 mean, not F.mse_loss: forward-mode AD through mse_loss's backward hits
        # "ZeroTensors are immutable" in torch 2.13
        return ((h - y) ** 2).mean() if loss == "mse" else F.cross_entropy(h, y)

    return task_loss


def make_func(act, loss, L):
    from torch.func import grad_and_value, jvp, vmap

    task_loss = _task_loss(act, loss, L)

    def one(params, v, x, y):
        (g, value), (hv, _) = jvp(lambda p: grad_and_value(task_loss)(p, x, y), (params,), (v,))
        return value, g, hv

    batched = vmap(one)

    def run(ws, bs, x, y, vw, vb):
        value, g, hv = batched(tuple(ws) + tuple(bs), tuple(vw) + tuple(vb), x, y)
        return value, list(g[:L]), list(g[L:]), list(hv[:L]), list(hv[L:])

    return run


def make_loop(act, loss, L):
    task_loss = _task_loss(act, loss, L)

    def run(ws, bs, x, y, vw, vb):
        T = x.shape[0]
        losses, gs, hs = [], [], []
        for t in range(T):
            params = [p[t].detach().requires_grad_() for p in (*ws, *bs)]
            vt = [v[t] for v in (*vw, *vb)]
            with torch.enable_grad():
                value = task_loss(params, x[t], y[t])
                g = torch.autograd.grad(value, params, create_graph=True)
                dot = sum((gi * vi).sum() for gi, vi in zip(g, vt))
                h = torch.autograd.grad(dot, params)
            losses.append(value.detach())
            gs.append([gi.detach() for gi in g])
            hs.append(h)
        st = lambda k, src: torch.stack([s[k] for s in src])  # noqa: E731
        n = 2 * L
        g = [st(k, gs) for k in range(n)]
        h = [st(k, hs) for k in range(n)]
        return torch.stack(losses), g[:L], g[L:], h[:L], h[L:]

    return run


def make_fastmeta(act, loss, backend):
    def run(ws, bs, x, y, vw, vb):
        return fm.mlp_grad_hvp(ws, bs, x, y, vw, vb, act, loss, backend=backend)

    return run


# ---- running ---------------------------------------------------------------------------------


def fastmeta_backends(device, dtype, only):
    return C.timed_backends(fm.backends_for, "mlp_grad_hvp", device, dtype, only)[0]


def run_case(name, device, dtype, budget, backends, log):
    p = CASES[name]
    act, loss, L = p["activation"], p["loss"], len(p["sizes"]) - 1
    case = C.Case(op="mlp_grad_hvp", name=name,
                  params=dict(sizes="-".join(map(str, p["sizes"])), T=p["T"], N=p["N"],
                              activation=act, loss=loss),
                  dtype=dtype, device=device, make_inputs=lambda s: make_inputs(p, device, dtype, s),
                  reference=None, grad_argnums=(), min_bytes={})
    impls = [C.Impl("fastmeta[auto]", make_fastmeta(act, loss, None))]
    impls += [C.Impl(f"fastmeta[{b}]", make_fastmeta(act, loss, b))
              for b in fastmeta_backends(device, dtype, backends)]
    impls += [C.Impl("double-bwd", make_double_bwd(act, loss), baseline=True),
              C.Impl("func-fwd-over-rev", make_func(act, loss, L), baseline=True),
              C.Impl("loop", make_loop(act, loss, L), baseline=True)]
    # float64 oracle on a separate draw
    chk = make_inputs(p, device, dtype, 1000)
    to64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    ws, bs, x, y, vw, vb = chk
    oracle = _flat(fm.mlp_grad_hvp_ref(to64(ws), to64(bs), x.double(),
                                        y.double() if loss == "mse" else y, to64(vw), to64(vb),
                                        act, loss))
    inputs = make_inputs(p, device, dtype, 0)
    results = []
    for impl in impls:
        log(f"... {name} {impl.name}")
        try:
            out = _flat(impl.fn(*chk))
            err = max(C._rel_err(o, r) for o, r in zip(out, oracle))
            if len(out) != len(oracle) or not (err <= C.DEFAULT_TOL.get(dtype, 1e-3)):
                results.append(C.Result(case, PASS, impl.name, impl.baseline, "WRONG",
                                        f"rel err {err:.3g}", err=err))
                continue
            step = lambda f=impl.fn: f(*inputs)  # noqa: E731
            t = C.time_fn(step, device=device, budget_s=budget, min_reps=5)
            peak = C.peak_memory_bytes(step, device=device)
            results.append(C.Result(case, PASS, impl.name, impl.baseline, "ok", "",
                                    t["median_ms"], t["p20_ms"], t["p80_ms"], t["n"], peak, err))
        except Exception as exc:  # noqa: BLE001
            results.append(C.Result(case, PASS, impl.name, impl.baseline, "failed",
                                    C._first_line(exc)))
    C.fill_speedups(results)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default=None)
    C.add_common_args(ap, "device", "threads", "budget", "results-dir", "no-save")
    args = C.parse_args(ap, argv)
    device = args.device
    dtype = C.parse_dtype(args.dtype)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.5)
    backends = C.comma_list(args.backends) or None
    C.print_banner("mlp_grad_hvp benchmark", device)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    saved = None
    for name in C.comma_list(args.cases):
        res = run_case(name, device, dtype, budget, backends, log)
        C.print_table(res, BASELINES)
        for r in res:
            if not r.ok:
                print(f"  {r.impl}: {r.status}: {r.message}")
        if not args.no_save:
            saved = C.save_rows(res, STEM, results_dir=args.results_dir,
                                extra=dict(quick=args.quick))
    print(f"\n{time.perf_counter() - t0:.0f} s; load after: {os.getloadavg()[0]:.2f}"
          + (f"; rows appended to {saved}" if saved else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
