"""Benchmark ``fastmeta.ops.inner_update`` (the MAML inner step ``p - lr * g`` for every tensor of
every task) against what meta-learning code does today.

Compared in one run, per shape and dtype, forward ("fwd": inputs requiring grad, graph recorded
and dropped) and forward+backward ("fwd+bwd": gradients of all outputs w.r.t. params, grads
and, for Meta-SGD, the learning rates, against fixed random cotangents; second-order MAML needs
all of them):

* ``fastmeta[auto]`` and ``fastmeta[<backend>]`` for every compiled backend that can run here;
* ``loop``: ``[p - lr * g for p, g in zip(params, grads)]`` (learn2learn, higher, the naive
  per-task code);
* ``foreach``: ``torch._foreach_sub(params, torch._foreach_mul(grads, lr))`` (torch.optim's
  multi-tensor path; broadcasts a per-element lr);
* ``compile``: ``torch.compile`` of ``loop`` (compiled and warmed up before timing).

Shapes: ``conv4`` (MAML's Conv4 for 28x28 Omniglot 5-way, hidden 64: 112,261 parameters,
T = 32 tasks, scalar lr), ``mlp`` (sinusoid MLP 1-40-40-1, 1,761 parameters, T = 25, scalar
lr), ``metasgd-conv4`` / ``metasgd-mlp`` (the same with a learned per-element lr ``[*shape]``
shared by the tasks, Li et al. 2017). Parameters are contiguous ``[T, *shape]`` tensors.

Every implementation is first checked against a float64 oracle (outputs and all gradients);
a wrong one is reported, not timed. Timing, memory and GB/s rules: ``bench/_common.py``
(GB/s: each input read once, each output written once).

Script::

    python bench/bench_inner_update.py [--shapes conv4,mlp,metasgd-conv4,metasgd-mlp]
        [--quick] [--device cuda|cpu] [--dtypes float32] [--no-compile] [--backends cpp]
        [--time-limit SECONDS] [--budget SECONDS] [--passes fwd,fwd+bwd] [--threads N]
        [--results-dir DIR] [--no-save]

prints one table per (shape, dtype, pass) and appends JSON rows to
``bench/results/inner_update-<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

STEM = "inner_update"
BASELINES = ["loop", "foreach", "compile"]


def conv4_shapes(in_ch=1, hidden=64, n_way=5, image=28):
    shapes, c = [], in_ch
    for _ in range(4):
        shapes += [(hidden, c, 3, 3), (hidden,), (hidden,), (hidden,)]  # conv w, b, bn w, b
        c = hidden
        image //= 2
    shapes += [(n_way, hidden * image * image), (n_way,)]
    return shapes


def mlp_shapes(sizes=(1, 40, 40, 1)):
    out = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        out += [(b, a), (b,)]
    return out


SHAPES = {
    "conv4": dict(model="conv4", T=32, lr="scalar"),
    "mlp": dict(model="mlp", T=25, lr="scalar"),
    "metasgd-conv4": dict(model="conv4", T=32, lr="per-element"),
    "metasgd-mlp": dict(model="mlp", T=25, lr="per-element"),
}
MODELS = {"conv4": conv4_shapes, "mlp": mlp_shapes}
LR = 0.4

try:
    import fastmeta.ops as fm

    FM_ERROR = ""
except Exception as _exc:  # noqa: BLE001 - the baselines still run without fastmeta
    fm = None
    FM_ERROR = f"{type(_exc).__name__}: {_exc}".splitlines()[0]


# ---------------------------------------------------------------------------------------------
# inputs, oracle, implementations
# ---------------------------------------------------------------------------------------------


def make_case(shape_name: str, device, dtype) -> C.Case:
    spec = SHAPES[shape_name]
    shapes = MODELS[spec["model"]]()
    T, per_elem = spec["T"], spec["lr"] == "per-element"
    n = len(shapes)
    numel = sum(math.prod(s) for s in shapes)

    def make_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        ps = [torch.randn((T, *s), generator=g).to(device, dtype) for s in shapes]
        gs = [torch.randn((T, *s), generator=g).to(device, dtype) for s in shapes]
        ls = [(0.1 + 0.5 * torch.rand(s, generator=g)).to(device, dtype) for s in shapes] if per_elem else []
        return (*ps, *gs, *ls)

    def reference(*flat):
        ps, gs, ls = flat[:n], flat[n:2 * n], flat[2 * n:]
        lrs = ls if per_elem else [LR] * n
        return [p - lr * g for p, g, lr in zip(ps, gs, lrs)]

    es = torch.empty((), dtype=dtype).element_size()
    big = T * numel
    lr_n = numel if per_elem else 0
    fwd = (3 * big + lr_n) * es                                   # read p, g, lr; write out
    bwd = (2 * big + (big + lr_n if per_elem else 0)) * es        # read go, write dg (+ read g, write dlr)
    return C.Case(
        op=STEM, name=shape_name,
        params=dict(T=T, tensors=n, params_per_task=numel, lr=spec["lr"]),
        dtype=dtype, device=device, make_inputs=make_inputs, reference=reference,
        grad_argnums=tuple(range(len(make_inputs(0)))), grad_outputs=n,
        min_bytes={"fwd": fwd, "fwd+bwd": fwd + bwd},
    )


def split(flat, n, per_elem):
    ps, gs, ls = list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:])
    return ps, gs, (ls if per_elem else LR)


def make_impls(case: C.Case, backends=None, compile_=True):
    n = case.params["tensors"]
    per_elem = case.params["lr"] == "per-element"
    impls = []
    if fm is not None:
        names = [b for b in fm.backends_for("inner_update", case.device, case.dtype) if b != "reference"]
        if backends is not None:
            names = [b for b in names if b in backends]
        keys = [f"t{i}" for i in range(n)]

        def fastmeta_fn(backend):
            def fn(*flat):
                ps, gs, lr = split(flat, n, per_elem)
                lr = dict(zip(keys, lr)) if per_elem else lr
                return list(fm.inner_update(dict(zip(keys, ps)), dict(zip(keys, gs)), lr,
                                            backend=backend).values())

            return fn

        impls.append(C.Impl("fastmeta[auto]", fastmeta_fn(None)))
        impls += [C.Impl(f"fastmeta[{b}]", fastmeta_fn(b)) for b in names]

    def loop(*flat):
        ps, gs, lr = split(flat, n, per_elem)
        lrs = lr if per_elem else [lr] * n
        return [p - l * g for p, g, l in zip(ps, gs, lrs)]

    def foreach(*flat):
        ps, gs, lr = split(flat, n, per_elem)
        return list(torch._foreach_sub(ps, torch._foreach_mul(gs, lr)))

    impls.append(C.Impl("loop", loop, baseline=True))
    impls.append(C.Impl("foreach", foreach, baseline=True))
    if compile_:
        impls.append(C.Impl("compile", torch.compile(loop), baseline=True))
    else:
        impls.append(C.Impl("compile", loop, baseline=True, skip="--no-compile"))
    return impls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="shorter timing budget")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--backends", default=None, help="comma list of fastmeta backends to time")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no new implementation after this many seconds")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    C.add_common_args(ap, "device", "threads", "budget", "results-dir", "no-save")
    args = C.parse_args(ap, argv)

    t_start = time.perf_counter()
    device = args.device
    shapes = C.comma_list(args.shapes)
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {list(SHAPES)}")
    dtypes = [C.parse_dtype(d) for d in C.comma_list(args.dtypes)]
    passes = C.comma_list(args.passes)
    backends = C.comma_list(args.backends) or None
    budget = args.budget if args.budget is not None else (
        (0.1 if args.quick else 0.3) if device.type == "cuda" else (0.2 if args.quick else 1.0))

    C.print_banner("inner_update benchmark", device)
    if fm is None:
        print(f"fastmeta.ops does not import ({FM_ERROR}); timing the baselines only", flush=True)
    else:
        probe = [torch.zeros(1, device=device, dtype=dtypes[0])]
        try:
            auto = fm.registry.select("inner_update", probe)
        except Exception:  # noqa: BLE001
            auto = "?"
        print(f"fastmeta[auto] picks {auto}; backends here: "
              f"{fm.backends_for('inner_update', device, dtypes[0])}", flush=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    deadline = t_start + args.time_limit if args.time_limit is not None else None
    all_results, saved_to = [], None
    for dtype in dtypes:
        for shape in shapes:
            case = make_case(shape, device, dtype)
            impls = make_impls(case, backends, compile_=not args.no_compile)
            t_case = time.perf_counter()
            results = C.run_case(case, impls, passes, budget_s=budget, log=log, deadline=deadline)
            log(f"... {shape} {C.dtype_name(dtype)} done in {time.perf_counter() - t_case:.1f} s")
            C.print_table(results, BASELINES)
            all_results += results
            if not args.no_save:
                saved_to = C.save_rows(results, STEM, results_dir=args.results_dir,
                                       extra=dict(quick=args.quick))
    C.print_summary(all_results, t_start, saved_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
