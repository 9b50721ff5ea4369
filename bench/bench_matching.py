"""Benchmark ``fastmeta.ops.matching_loss`` against what Matching Networks code does today.

Compared in one run, per shape and dtype, forward ("fwd": the forward of a training step,
inputs requiring grad) and forward+backward ("fwd+bwd": gradients w.r.t. query and support):

* ``fastmeta[auto]`` (backend chosen by the registry) and ``fastmeta[<backend>]`` for every
  backend ``fastmeta.ops.backends_for("matching_loss", device)`` lists, except ``reference``
  (and Triton on the CPU, which is the interpreter);
* ``eager`` (a): the pattern of public Matching Networks code: ``F.normalize`` both sides,
  ``bmm``, ``softmax`` over the support set, ``bmm`` with the one-hot labels, ``log``,
  ``nll_loss`` (keeps ``[B,Q,S]`` twice for backward, underflows to -inf for far classes);
* ``sdpa`` (b): ``F.scaled_dot_product_attention(qn, sn, onehot, scale=scale)``, ``log``,
  ``nll_loss``;
* ``compile`` (c): ``torch.compile`` of ``eager`` (compiled and warmed up before timing).

Shapes: ``5w5s``, ``20w5s`` (32 episodes), ``large``, and the set ``one-episode`` (issue 13:
the head called once per episode, B=1, D=64, 5-way and 20-way, 1 and 5 shots).

Timing on a CPU at ``--threads 1`` (``--interleaved auto``): interleaved rounds, thread CPU
time (``bench_proto.run_interleaved``); elsewhere ``_common.run_case``.

Every implementation returns ``(loss, acc)`` and is first checked against a float64 oracle
(``fastmeta.ops.matching_loss_ref`` in float64: loss, accuracy, both gradients); a wrong one is
reported, not timed. Timing, peak-memory and GB/s rules: ``bench/_common.py``.

Script::

    python bench/bench_matching.py [--shapes 5w5s,20w5s,large,one-episode] [--quick]
        [--interleaved auto|on|off] [--rounds 15] [--calls 200] [--device cpu|cuda]
        [--dtypes float32] [--no-compile] [--backends cpp,triton] [--passes fwd,fwd+bwd]
        [--budget SECONDS] [--threads N] [--results-dir DIR] [--no-save]

prints one table per (shape, dtype, pass) and appends JSON rows to
``bench/results/matching-<device>.jsonl``. ``--quick`` times less and skips the large-support
shape on the CPU.
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

STEM = "matching"
EPS = 1e-8
SCALE = 10.0

SHAPES = {
    # 5-way 5-shot, 15 queries per class, Conv4 on mini-ImageNet features
    "5w5s": dict(B=32, Q=75, S=25, N=5, D=1600),
    # 20-way 5-shot Omniglot, 15 queries per class
    "20w5s": dict(B=32, Q=300, S=100, N=20, D=64),
    # large support set
    "large": dict(B=1, Q=4096, S=4096, N=1000, D=256),
    # one episode per call (issue 13), D=64 (Conv4 on Omniglot): 5-way 1-shot and 5-shot with 15
    # queries per class, 20-way 1-shot and 5-shot with 5 queries per class
    "one-5w1s": dict(B=1, Q=75, S=5, N=5, D=64),
    "one-5w5s": dict(B=1, Q=75, S=25, N=5, D=64),
    "one-20w1s": dict(B=1, Q=100, S=20, N=20, D=64),
    "one-20w5s": dict(B=1, Q=100, S=100, N=20, D=64),
}
SHAPE_SETS = {"one-episode": ["one-5w1s", "one-5w5s", "one-20w1s", "one-20w5s"]}
BASELINES = ["eager", "sdpa", "compile"]

try:
    import fastmeta.ops as fm

    FM_ERROR = ""
except Exception as _exc:  # noqa: BLE001 - the baselines still run without fastmeta
    fm = None
    FM_ERROR = f"{type(_exc).__name__}: {_exc}".splitlines()[0]


# ---------------------------------------------------------------------------------------------
# the baselines (all return (loss, acc))
# ---------------------------------------------------------------------------------------------


def _nll(logp, ql):
    loss = F.nll_loss(logp.flatten(0, 1), ql.flatten())
    acc = (logp.detach().argmax(-1) == ql).to(logp.dtype).mean()
    return loss, acc


def eager(q, s, sl, ql, n_way, scale):
    qn, sn = F.normalize(q, dim=-1, eps=EPS), F.normalize(s, dim=-1, eps=EPS)
    attn = torch.softmax(scale * torch.bmm(qn, sn.mT), dim=-1)
    probs = torch.bmm(attn, F.one_hot(sl, n_way).to(attn.dtype))
    return _nll(torch.log(probs), ql)


def sdpa(q, s, sl, ql, n_way, scale):
    qn, sn = F.normalize(q, dim=-1, eps=EPS), F.normalize(s, dim=-1, eps=EPS)
    probs = F.scaled_dot_product_attention(qn, sn, F.one_hot(sl, n_way).to(qn.dtype), scale=scale)
    return _nll(torch.log(probs), ql)


def _configure_dynamo():
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def make_compiled(fn, n_way, scale):
    _configure_dynamo()
    compiled = torch.compile(fn, dynamic=False)
    return lambda q, s, sl, ql: compiled(q, s, sl, ql, n_way, scale)


# ---------------------------------------------------------------------------------------------
# cases and implementations
# ---------------------------------------------------------------------------------------------


def make_case(shape: str, device: torch.device, dtype: torch.dtype) -> C.Case:
    p = SHAPES[shape]
    B, Q, S, N, D = p["B"], p["Q"], p["S"], p["N"], p["D"]
    elt = torch.empty((), dtype=dtype).element_size()

    def make_inputs(seed: int):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(B, N, D, generator=g)
        sl = torch.stack([torch.randperm(S, generator=g) % N for _ in range(B)])
        ql = torch.randint(0, N, (B, Q), generator=g)
        support = centers.gather(1, sl[:, :, None].expand(B, S, D)) + torch.randn(B, S, D, generator=g)
        query = centers.gather(1, ql[:, :, None].expand(B, Q, D)) + torch.randn(B, Q, D, generator=g)
        return (query.to(device, dtype), support.to(device, dtype), sl.to(device), ql.to(device))

    def reference(q, s, sl, ql):
        return fm.matching_loss_ref(q, s, sl, N, ql, SCALE)

    in_bytes = (B * Q * D + B * S * D) * elt + (B * S + B * Q) * 8
    return C.Case(
        op="matching_loss", name=shape, params=dict(B=B, Q=Q, S=S, N=N, D=D, scale=SCALE),
        dtype=dtype, device=device, make_inputs=make_inputs, reference=reference,
        grad_argnums=(0, 1),
        min_bytes={"fwd": in_bytes, "fwd+bwd": in_bytes + (B * Q * D + B * S * D) * elt},
        # fwd: the [Q,D]x[D,S] similarity product; bwd: recompute + two more of that size.
        flops={"fwd": 2 * B * Q * S * D, "fwd+bwd": 8 * B * Q * S * D},
    )


def fastmeta_backends(device, dtype, only):
    return C.timed_backends(fm.backends_for, "matching_loss", device, dtype, only)


def make_impls(shape, device, dtype, *, compile_=True, backends=None) -> list[C.Impl]:
    p = SHAPES[shape]
    N = p["N"]
    impls: list[C.Impl] = []
    if fm is None:
        impls.append(C.Impl("fastmeta", None, skip=f"fastmeta.ops does not import: {FM_ERROR}"))
    else:
        def fm_fn(backend):
            return lambda q, s, sl, ql: fm.matching_loss(q, s, sl, N, ql, SCALE, backend=backend)

        impls.append(C.Impl("fastmeta[auto]", fm_fn(None)))
        impls.extend(C.Impl(f"fastmeta[{b}]", fm_fn(b)) for b in fastmeta_backends(device, dtype, backends)[0])
    impls.append(C.Impl("eager", lambda q, s, sl, ql: eager(q, s, sl, ql, N, SCALE), baseline=True))
    impls.append(C.Impl("sdpa", lambda q, s, sl, ql: sdpa(q, s, sl, ql, N, SCALE), baseline=True))
    if compile_:
        impls.append(C.Impl("compile", make_compiled(eager, N, SCALE), baseline=True))
    else:
        impls.append(C.Impl("compile", None, baseline=True, skip="--no-compile"))
    return impls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--quick", action="store_true", help="short budget; skip 'large' on the CPU")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--backends", default=None)
    ap.add_argument("--passes", default=",".join(C.PASSES))
    ap.add_argument("--interleaved", choices=("auto", "on", "off"), default="auto",
                    help="interleaved rounds, thread CPU time (auto: on for a CPU at 1 thread)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per row")
    ap.add_argument("--calls", type=int, default=200,
                    help="calls per implementation per interleaved round (fewer for ms-long calls)")
    C.add_common_args(ap, "device", "threads", "budget", "results-dir", "no-save")
    args = C.parse_args(ap, argv)

    t_start = time.perf_counter()
    device = args.device
    shapes = [x for s in C.comma_list(args.shapes) for x in SHAPE_SETS.get(s, [s])]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    if args.quick and device.type == "cpu" and "large" in shapes:
        shapes.remove("large")
        print("--quick on the CPU: skipping the 'large' shape", flush=True)
    dtypes = [C.parse_dtype(d) for d in C.comma_list(args.dtypes)]
    passes = C.comma_list(args.passes)
    backends = C.comma_list(args.backends) or None
    budget = args.budget if args.budget is not None else (
        (0.1 if args.quick else 0.2) if device.type == "cuda" else (0.3 if args.quick else 1.0))

    interleaved = args.interleaved == "on" or (
        args.interleaved == "auto" and device.type == "cpu" and torch.get_num_threads() == 1)
    C.print_banner("matching_loss benchmark", device)
    if fm is None:
        print(f"fastmeta.ops does not import ({FM_ERROR}); no oracle, nothing to run")
        return 1
    names, left_out = fastmeta_backends(device, dtypes[0], backends)
    print(f"fastmeta backends timed: {names or 'none'} (+ auto)"
          + "".join(f"; {b} left out: {why}" for b, why in left_out.items()), flush=True)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    all_results = []
    saved_to = None
    for dtype in dtypes:
        for shape in shapes:
            case = make_case(shape, device, dtype)
            impls = make_impls(shape, device, dtype, compile_=not args.no_compile, backends=backends)
            if interleaved:
                from bench_proto import run_interleaved

                results = run_interleaved(case, impls, passes, rounds=args.rounds,
                                          min_calls=args.calls, log=log)
            else:
                results = C.run_case(case, impls, passes, budget_s=budget, log=log)
            C.print_table(results, BASELINES)
            all_results.extend(results)
            if not args.no_save:
                saved_to = C.save_rows(results, STEM, results_dir=args.results_dir,
                                       extra=dict(quick=args.quick, interleaved=interleaved))
    C.print_summary(all_results, t_start, saved_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
