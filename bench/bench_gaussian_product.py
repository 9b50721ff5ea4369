"""Benchmark ``fastmeta.ops.gaussian_product`` against what PEARL code does today.

PEARL (Rakelly et al. 2019) combines one Gaussian factor per context transition into the
posterior over the latent context, per task. Compared in one run, per shape, dtype and thread
count, forward ("fwd": inputs requiring grad) and forward+backward ("fwd+bwd": gradients of
both outputs w.r.t. ``mu`` and ``var``):

* ``fastmeta[auto]`` (backend chosen by the registry) and ``fastmeta[<backend>]`` for every
  backend ``fastmeta.ops.backends_for("gaussian_product", device)`` lists, except
  ``reference`` (and Triton on the CPU, which is the interpreter). The public function, with
  its input checks;
* ``eager``: ``fastmeta.ops.gaussian_product_ref`` (padding-safe ``torch.where`` form);
* ``pearl``: the pattern of PEARL's ``_product_of_gaussians`` (``torch.clamp(var, min=1e-7)``,
  ``torch.reciprocal``, ``sum`` over the context) with the mask multiplied in;
* ``compile``: ``torch.compile`` of ``eager`` (compiled and warmed up before timing).

Inputs: variable-length contexts (each task keeps a random 50-100 % of its C factors, bool
mask), ``var = softplus(.)`` as PEARL's encoder produces. Every implementation is first
checked against a float64 oracle (both outputs, both gradients); a wrong one is reported,
not timed. Timing, peak-memory and GB/s rules: ``bench/_common.py``.

Script::

    python bench/bench_gaussian_product.py [--shapes pearl-100-5,...,large] [--quick]
        [--threads 1,0] [--device cpu|cuda] [--dtypes float32] [--no-compile]
        [--backends cpp,triton] [--passes fwd,fwd+bwd] [--budget SECONDS]
        [--results-dir DIR] [--no-save]

``--threads 1,0`` (the default) runs every shape at 1 thread and at torch's default thread
count (0) back to back in one process. Prints one table per (shape, dtype, threads, pass) and
appends JSON rows to ``bench/results/gaussian_product-<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

STEM = "gaussian_product"
MIN_VAR = 1e-7  # PEARL's clamp

SHAPES = {
    # PEARL: 16 meta-batch tasks, context batch 100-256 transitions, latent dim 5 (PEARL's
    # default) to 32
    "pearl-100-5": dict(B=16, C=100, D=5),
    "pearl-100-32": dict(B=16, C=100, D=32),
    "pearl-256-5": dict(B=16, C=256, D=5),
    "pearl-256-32": dict(B=16, C=256, D=32),
    "large": dict(B=128, C=512, D=64),
}
BASELINES = ["eager", "pearl", "compile"]

try:
    import fastmeta.ops as fm

    FM_ERROR = ""
except Exception as _exc:  # noqa: BLE001 - the baselines still run without fastmeta
    fm = None
    FM_ERROR = f"{type(_exc).__name__}: {_exc}".splitlines()[0]


def pearl(mu, var, mask):
    """PEARL's product_of_gaussians over dim 1, with the mask as a 0/1 weight."""
    var = torch.clamp(var, min=MIN_VAR)
    prec = mask[..., None].to(mu.dtype) * torch.reciprocal(var)
    var_out = 1.0 / torch.sum(prec, dim=1)
    return var_out * torch.sum(mu * prec, dim=1), var_out


def make_compiled(fn):
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(fn, dynamic=False)


def make_case(shape: str, device: torch.device, dtype: torch.dtype) -> C.Case:
    p = SHAPES[shape]
    B, Cn, D = p["B"], p["C"], p["D"]
    elt = torch.empty((), dtype=dtype).element_size()

    def make_inputs(seed: int):
        g = torch.Generator().manual_seed(seed)
        mu = torch.randn(B, Cn, D, generator=g)
        var = F.softplus(torch.randn(B, Cn, D, generator=g))
        lengths = torch.randint(Cn // 2, Cn + 1, (B, 1), generator=g)
        mask = torch.arange(Cn)[None, :] < lengths
        return mu.to(device, dtype), var.to(device, dtype), mask.to(device)

    def reference(mu, var, mask):
        return fm.gaussian_product_ref(mu, var, mask, MIN_VAR)

    big, small = B * Cn * D * elt, B * D * elt
    return C.Case(
        op="gaussian_product", name=shape, params=dict(B=B, C=Cn, D=D),
        dtype=dtype, device=device, make_inputs=make_inputs, reference=reference,
        grad_argnums=(0, 1), grad_outputs=2,
        # fwd: read mu, var, mask, write two [B,D]; bwd: read them again + 2 cotangents, write
        # two [B,C,D] gradients
        min_bytes={"fwd": 2 * big + B * Cn + 2 * small,
                   "fwd+bwd": 4 * big + B * Cn + 4 * small + 2 * big},
    )


def fastmeta_backends(device, dtype, only):
    return C.timed_backends(fm.backends_for, "gaussian_product", device, dtype, only)


def make_impls(device, dtype, *, compile_=True, backends=None) -> list[C.Impl]:
    impls: list[C.Impl] = []
    if fm is None:
        impls.append(C.Impl("fastmeta", None, skip=f"fastmeta.ops does not import: {FM_ERROR}"))
    else:
        def fm_fn(backend):
            return lambda mu, var, mask: fm.gaussian_product(mu, var, mask, backend=backend)

        impls.append(C.Impl("fastmeta[auto]", fm_fn(None)))
        impls.extend(C.Impl(f"fastmeta[{b}]", fm_fn(b))
                     for b in fastmeta_backends(device, dtype, backends)[0])
        impls.append(C.Impl("eager", fm.gaussian_product_ref, baseline=True))
    impls.append(C.Impl("pearl", pearl, baseline=True))
    if compile_ and fm is not None:
        impls.append(C.Impl("compile", make_compiled(fm.gaussian_product_ref), baseline=True))
    else:
        impls.append(C.Impl("compile", None, baseline=True, skip="--no-compile or no fastmeta"))
    return impls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--threads", dest="thread_counts", default="1,0",
                    help="comma-separated thread counts, each run in turn (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="short budget")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--backends", default=None)
    ap.add_argument("--passes", default=",".join(C.PASSES))
    C.add_common_args(ap, "device", "budget", "results-dir", "no-save")
    args = C.parse_args(ap, argv)

    t_start = time.perf_counter()
    device = args.device
    shapes = C.comma_list(args.shapes)
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    default_threads = torch.get_num_threads()
    threads = [int(t) or default_threads for t in C.comma_list(args.thread_counts)]
    dtypes = [C.parse_dtype(d) for d in C.comma_list(args.dtypes)]
    passes = C.comma_list(args.passes)
    backends = C.comma_list(args.backends) or None
    budget = args.budget if args.budget is not None else (
        (0.1 if args.quick else 0.2) if device.type == "cuda" else (0.3 if args.quick else 1.0))

    C.print_banner(f"gaussian_product benchmark (threads {threads})", device)
    if fm is None:
        print(f"fastmeta.ops does not import ({FM_ERROR}); no oracle, nothing to run")
        return 1
    names, left_out = fastmeta_backends(device, dtypes[0], backends)
    print(f"fastmeta backends timed: {names or 'none'} (+ auto)"
          + "".join(f"; {b} left out: {why}" for b, why in left_out.items()), flush=True)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    all_results, saved_to = [], None
    for dtype in dtypes:
        impls = make_impls(device, dtype, compile_=not args.no_compile, backends=backends)
        for shape in shapes:
            for n in threads:
                torch.set_num_threads(n)
                print(f"\n--- {shape} {C.dtype_name(dtype)}: {n} thread(s)", flush=True)
                case = make_case(shape, device, dtype)
                case.params["threads"] = n
                results = C.run_case(case, impls, passes, budget_s=budget, log=log)
                C.print_table(results, BASELINES)
                all_results.extend(results)
                if not args.no_save:
                    saved_to = C.save_rows(results, STEM, results_dir=args.results_dir,
                                           extra=dict(quick=args.quick))
    torch.set_num_threads(default_threads)
    C.print_summary(all_results, t_start, saved_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
