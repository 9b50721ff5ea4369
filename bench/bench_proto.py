"""Benchmark ``fastmeta.ops.proto_loss`` against what ProtoNet code does today.

Compared in one run, per shape and dtype, forward ("fwd": the forward of a training step,
inputs requiring grad) and forward+backward ("fwd+bwd": gradients w.r.t. query and protos):

* ``fastmeta[auto]`` (backend chosen by the registry) and ``fastmeta[<backend>]`` for every
  backend ``fastmeta.ops.backends_for("proto_loss", device)`` lists, except ``reference``;
* ``naive``: ``((x[:, :, None] - y[:, None]) ** 2).sum(-1)`` + cross_entropy, as in public
  ProtoNet code (materialises ``[B, Q, N, D]``);
* ``cdist``: ``torch.cdist(x, y) ** 2`` + cross_entropy (best eager);
* ``mm``: ``|x|^2 + |y|^2 - 2 x @ y^T`` + cross_entropy;
* ``compile``: ``torch.compile`` of ``cdist`` (compiled and warmed up before timing; a compile
  failure is reported in its row);
* cosine metric (shape ``episode-cosine``): fastmeta vs ``norm+bmm`` (``F.normalize`` both,
  ``bmm``, scale, cross_entropy) and ``compile`` of it;
* ``cdist+acc``, ``mm+acc``, ``norm+bmm+acc``: those baselines returning ``(loss, acc)`` with
  the accuracy computed as the public ProtoNet repositories do (jakesnell/prototypical-networks,
  orobix/prototypical-networks-pytorch: the highest-scoring class == label, float, mean), the
  same work as fastmeta's ``(loss, acc)``; the loss-only baselines do less work than fastmeta.

Shapes: ``episode`` (32 mini-ImageNet episodes, D=1600), ``omniglot`` (32 20-way episodes,
D=64), ``many-way``, ``episode-cosine``, and the set ``one-episode`` (issue 13: the head called
once per episode, B=1, Q=25..100, N=5..20, D=64, plus B=4 and a cosine one, and 32 5-way
episodes at D=64).

Timing on a CPU at ``--threads 1`` (``--interleaved auto``): interleaved rounds, each running
every implementation in turn for a batch of (up to ``--calls``, default 200) calls, thread CPU
time, median over ``--rounds`` (default 15) rounds (:func:`run_interleaved`); elsewhere
``_common.run_case`` (each implementation timed in one block).

Every implementation is first checked against a float64 oracle (loss, accuracy where
returned, both gradients) on fresh inputs; a wrong one is reported, not timed. Timing, memory
and GB/s rules: see ``bench/_common.py``. For the ``many-way`` shape the run also measures
the device's copy bandwidth and matmul rate and says how far the best fastmeta row is from
the memory-bandwidth floor and the compute floor.

Script::

    python bench/bench_proto.py [--shapes episode,many-way,omniglot,episode-cosine,one-episode]
        [--interleaved auto|on|off] [--rounds 15] [--calls 200] [--quick] [--device cuda|cpu] [--dtypes float32,bfloat16] [--no-compile]
        [--compile-dtypes float32] [--backends cpp,triton] [--time-limit SECONDS]
        [--budget SECONDS] [--passes fwd,fwd+bwd] [--threads N] [--results-dir DIR] [--no-save]

prints one table per (shape, dtype, pass) and appends JSON rows to
``bench/results/proto-<device>.jsonl``. ``--quick`` (< 2 min on a 2-core CPU) times less
and skips the naive many-way baseline (12 s and 12+ GB per call on a CPU).

pytest-benchmark::

    pytest bench/bench_proto.py --benchmark-only                 # episode + omniglot, fwd+bwd
    FASTMETA_BENCH_FULL=1 pytest bench/bench_proto.py --benchmark-only   # + many-way
    # saved under bench/results/pytest-benchmark/:
    pytest bench/bench_proto.py --benchmark-only --benchmark-save=proto
    pytest bench/bench_proto.py --benchmark-only --benchmark-json=bench/results/proto-pytest.json

(``FASTMETA_BENCH_DEVICE=cuda|cpu`` picks the device, default cuda when available.)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

STEM = "proto"
EPS = 1e-8

SHAPES = {
    "episode": dict(B=32, Q=75, N=5, D=1600, metric="sqeuclidean", scale=1.0),
    "many-way": dict(B=1, Q=2048, N=1000, D=512, metric="sqeuclidean", scale=1.0),
    "omniglot": dict(B=32, Q=100, N=20, D=64, metric="sqeuclidean", scale=1.0),
    "episode-cosine": dict(B=32, Q=75, N=5, D=1600, metric="cosine", scale=10.0),
    # one episode per call (issue 13), as a per-episode training loop calls the head: 5-way with
    # 5 and 15 queries per class, 20-way with 5, four 5-way episodes, and cosine (D=64, Conv4 on
    # Omniglot); plus 32 episodes at D=64 with N=5 (between these and omniglot)
    "one-5w15q": dict(B=1, Q=75, N=5, D=64, metric="sqeuclidean", scale=1.0),
    "one-5w5q": dict(B=1, Q=25, N=5, D=64, metric="sqeuclidean", scale=1.0),
    "one-20w5q": dict(B=1, Q=100, N=20, D=64, metric="sqeuclidean", scale=1.0),
    "four-5w15q": dict(B=4, Q=75, N=5, D=64, metric="sqeuclidean", scale=1.0),
    "one-5w15q-cosine": dict(B=1, Q=75, N=5, D=64, metric="cosine", scale=10.0),
    "batch-5w15q-d64": dict(B=32, Q=75, N=5, D=64, metric="sqeuclidean", scale=1.0),
}
# fastmeta.ops.prototypes (support [B, N*K, D] in class order, labels [B, N*K]) at one episode
PROTOTYPE_SHAPES = {
    "protos-5w1s": dict(B=1, N=5, K=1, D=64),
    "protos-5w5s": dict(B=1, N=5, K=5, D=64),
    "protos-20w5s": dict(B=1, N=20, K=5, D=64),
    "protos-32x5w5s-d1600": dict(B=32, N=5, K=5, D=1600),
}
PROTOTYPE_BASELINES = ["onehot-bmm", "index_add", "view-mean"]
SHAPE_ALIASES = {"cosine": "episode-cosine", "manyway": "many-way", "many_way": "many-way"}
# shape sets: --shapes one-episode runs all of them
SHAPE_SETS = {"one-episode": ["one-5w15q", "one-5w5q", "one-20w5q", "four-5w15q",
                              "one-5w15q-cosine", "batch-5w15q-d64"],
              "prototypes": list(PROTOTYPE_SHAPES)}
EUCLID_BASELINES = ["naive", "cdist", "mm", "cdist+acc", "mm+acc", "compile"]
COSINE_BASELINES = ["norm+bmm", "norm+bmm+acc", "compile"]

try:
    import fastmeta.ops as fm

    FM_ERROR = ""
except Exception as _exc:  # noqa: BLE001 - the baselines still run without fastmeta
    fm = None
    FM_ERROR = f"{type(_exc).__name__}: {_exc}".splitlines()[0]


# ---------------------------------------------------------------------------------------------
# the oracle and the baselines
# ---------------------------------------------------------------------------------------------


def proto_loss_f64(q, p, labels, metric="sqeuclidean", scale=1.0):
    """Float64 oracle ``(loss, acc)``; the expansion keeps many-way at O(B*Q*N) memory (in
    float64 its cancellation error is ~1e-13, far below what is being measured). Checked
    against ``fastmeta.ops.proto_loss_ref`` at start-up so the two cannot drift apart."""
    if metric == "cosine":
        qn, pn = F.normalize(q, dim=-1, eps=EPS), F.normalize(p, dim=-1, eps=EPS)
        logits = scale * torch.bmm(qn, pn.mT)
    else:
        d = (q * q).sum(-1)[:, :, None] + (p * p).sum(-1)[:, None, :] - 2 * torch.bmm(q, p.mT)
        logits = -scale * d.clamp_min(0)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    acc = (logits.detach().argmax(-1) == labels).to(logits.dtype).mean()
    return loss, acc


def _scaled(neg_dists, scale):
    return neg_dists if scale == 1.0 else scale * neg_dists


def make_naive(scale):
    def naive(x, y, labels):
        dists = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
        return F.cross_entropy(_scaled(-dists, scale).flatten(0, 1), labels.flatten())

    return naive


def make_cdist(scale):
    def cdist(x, y, labels):
        dists = torch.cdist(x, y) ** 2
        return F.cross_entropy(_scaled(-dists, scale).flatten(0, 1), labels.flatten())

    return cdist


def make_mm(scale):
    def mm(x, y, labels):
        dists = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * torch.bmm(x, y.mT)
        return F.cross_entropy(_scaled(-dists, scale).flatten(0, 1), labels.flatten())

    return mm


def with_accuracy(logits_fn):
    """``(loss, acc)`` as the public ProtoNet code computes them (jakesnell/prototypical-networks
    and orobix/prototypical-networks-pytorch: the loss, then the accuracy as the class of largest
    score compared with the label, as float, averaged): the same work as fastmeta's
    ``(loss, acc)``."""
    def run(x, y, labels):
        logits = logits_fn(x, y)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return loss, acc

    return run


def make_cdist_acc(scale):
    return with_accuracy(lambda x, y: _scaled(-(torch.cdist(x, y) ** 2), scale))


def make_mm_acc(scale):
    def logits(x, y):
        d = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * torch.bmm(x, y.mT)
        return _scaled(-d, scale)

    return with_accuracy(logits)


def make_norm_bmm_acc(scale):
    return with_accuracy(lambda x, y: scale * torch.bmm(F.normalize(x, dim=-1, eps=EPS),
                                                        F.normalize(y, dim=-1, eps=EPS).mT))


def make_norm_bmm(scale):
    def norm_bmm(x, y, labels):
        xn, yn = F.normalize(x, dim=-1, eps=EPS), F.normalize(y, dim=-1, eps=EPS)
        logits = scale * torch.bmm(xn, yn.mT)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    return norm_bmm


def _configure_dynamo():
    # One compiled wrapper per case, all sharing one code object: allow a recompile per
    # (shape, dtype) instead of silently falling back to eager after 8.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(
            256, torch._dynamo.config.accumulated_recompile_limit)


def make_compiled(fn):
    _configure_dynamo()
    compiled = torch.compile(fn, dynamic=False)

    def run(x, y, labels):
        return compiled(x, y, labels)

    return run


# ---------------------------------------------------------------------------------------------
# cases and implementations
# ---------------------------------------------------------------------------------------------


def make_case(shape: str, device: torch.device, dtype: torch.dtype) -> C.Case:
    p = SHAPES[shape]
    B, Q, N, D = p["B"], p["Q"], p["N"], p["D"]
    metric, scale = p["metric"], p["scale"]
    elt = torch.empty((), dtype=dtype).element_size()

    def make_inputs(seed: int):
        g = torch.Generator().manual_seed(seed)
        protos = torch.randn(B, N, D, generator=g)
        labels = torch.randint(0, N, (B, Q), generator=g)
        own = protos.gather(1, labels[:, :, None].expand(B, Q, D))
        query = 0.3 * own + torch.randn(B, Q, D, generator=g)
        # 1/sqrt(D) keeps squared distances O(1): softmax neither saturated nor flat, so
        # gradients are informative and low-precision errors show.
        s = 1.0 / math.sqrt(D)
        return ((query * s).to(device, dtype), (protos * s).to(device, dtype), labels.to(device))

    def reference(q, pr, labels):
        return proto_loss_f64(q, pr, labels, metric, scale)

    in_bytes = (B * Q * D + B * N * D) * elt + B * Q * 8
    return C.Case(
        op="proto_loss", name=shape, params=dict(B=B, Q=Q, N=N, D=D, metric=metric, scale=scale),
        dtype=dtype, device=device, make_inputs=make_inputs, reference=reference,
        grad_argnums=(0, 1),
        # fwd: read query, protos, labels; fwd+bwd: also write grad_query, grad_protos.
        min_bytes={"fwd": in_bytes, "fwd+bwd": in_bytes + (B * Q * D + B * N * D) * elt},
        # fwd: the [Q,D]x[D,N] distance product; bwd: two more products of that size.
        flops={"fwd": 2 * B * Q * N * D, "fwd+bwd": 6 * B * Q * N * D},
    )


def make_prototypes_case(shape: str, device: torch.device, dtype: torch.dtype) -> C.Case:
    p = PROTOTYPE_SHAPES[shape]
    B, N, K, D = p["B"], p["N"], p["K"], p["D"]
    elt = torch.empty((), dtype=dtype).element_size()

    def make_inputs(seed: int):
        g = torch.Generator().manual_seed(seed)
        support = torch.randn(B, N * K, D, generator=g).to(device, dtype)
        labels = torch.arange(N).repeat_interleave(K).expand(B, N * K).contiguous().to(device)
        return support, labels

    def reference(support, labels):
        onehot = F.one_hot(labels, N).to(support.dtype)
        return torch.bmm(onehot.mT, support) / onehot.sum(1)[..., None]

    in_bytes = B * N * K * D * elt + B * N * K * 8
    return C.Case(
        op="prototypes", name=shape, params=dict(B=B, N=N, K=K, D=D), dtype=dtype, device=device,
        make_inputs=make_inputs, reference=reference, grad_argnums=(0,),
        min_bytes={"fwd": in_bytes + B * N * D * elt,
                   "fwd+bwd": in_bytes + 2 * B * N * D * elt + B * N * K * D * elt},
        flops={"fwd": B * N * K * D, "fwd+bwd": 2 * B * N * K * D},
    )


def make_prototypes_impls(shape: str, device: torch.device, dtype: torch.dtype) -> list[C.Impl]:
    """fastmeta.ops.prototypes (any label order) vs what ProtoNet code does: the one-hot
    matmul (any order), index_add_ of the rows by label then a division by the counts (any
    order), and ``support.view(B, N, K, D).mean(2)`` (public ProtoNet repositories: the support
    set must be sorted by class with K examples each; less work, no labels read)."""
    p = PROTOTYPE_SHAPES[shape]
    B, N, K, D = p["B"], p["N"], p["K"], p["D"]
    impls = []
    if fm is None:
        impls.append(C.Impl("fastmeta", None, skip=f"fastmeta.ops does not import: {FM_ERROR}"))
    else:
        impls.append(C.Impl("fastmeta[auto]", lambda s, y: fm.prototypes(s, y, N)))
        impls.append(C.Impl("fastmeta[cpp]", lambda s, y: fm.prototypes(s, y, N, backend="cpp")))

    def onehot_bmm(s, y):
        onehot = F.one_hot(y, N).to(s.dtype)
        return torch.bmm(onehot.mT, s) / onehot.sum(1)[..., None]

    def index_add(s, y):
        flat = (y + N * torch.arange(B, device=y.device)[:, None]).flatten()
        sums = s.new_zeros(B * N, D).index_add(0, flat, s.flatten(0, 1))
        counts = torch.bincount(flat, minlength=B * N).to(s.dtype)
        return (sums / counts[:, None]).view(B, N, D)

    impls.append(C.Impl("onehot-bmm", onehot_bmm, baseline=True))
    impls.append(C.Impl("index_add", index_add, baseline=True))
    impls.append(C.Impl("view-mean", lambda s, y: s.view(B, N, K, D).mean(2), baseline=True))
    return impls


def fastmeta_backends(
    device: torch.device, dtype: torch.dtype, only: list[str] | None
) -> tuple[list[str], dict]:
    """Backends to time (reference excluded) and the reasons others are left out."""
    if fm is None:
        return [], {}
    try:
        try:
            names = list(fm.backends_for("proto_loss", device, dtype))
        except TypeError:
            names = list(fm.backends_for("proto_loss", device))
    except Exception as exc:  # noqa: BLE001
        return [], {"backends_for": f"{type(exc).__name__}: {exc}"}
    names = [b for b in names if b != "reference"]
    left_out = {}
    if device.type == "cpu" and "triton" in names and not (only and "triton" in only):
        names.remove("triton")
        left_out["triton"] = ("Triton on the CPU is the interpreter (~1000x slower); "
                              "ask with --backends triton")
    if only:
        left_out.update({b: "not in --backends" for b in names if b not in only})
        names = [b for b in names if b in only]
    return names, left_out


def make_impls(shape: str, device: torch.device, dtype: torch.dtype, *, quick: bool = False,
               compile_: bool = True, backends: list[str] | None = None) -> list[C.Impl]:
    p = SHAPES[shape]
    metric, scale = p["metric"], p["scale"]
    impls: list[C.Impl] = []
    if fm is None:
        impls.append(C.Impl("fastmeta", None, skip=f"fastmeta.ops does not import: {FM_ERROR}"))
    else:
        names, _left_out = fastmeta_backends(device, dtype, backends)

        def fm_fn(backend):
            def run(q, pr, labels):
                return fm.proto_loss(q, pr, labels, metric, scale, "mean", backend=backend)

            return run

        impls.append(C.Impl("fastmeta[auto]", fm_fn(None)))
        impls.extend(C.Impl(f"fastmeta[{b}]", fm_fn(b)) for b in names)

    if metric == "cosine":
        impls.append(C.Impl("norm+bmm", make_norm_bmm(scale), baseline=True))
        impls.append(C.Impl("norm+bmm+acc", make_norm_bmm_acc(scale), baseline=True))
        eager_for_compile = make_norm_bmm(scale)
    else:
        B, Q, N, D = p["B"], p["Q"], p["N"], p["D"]
        elt = torch.empty((), dtype=dtype).element_size()
        naive_skip = None
        if quick and shape == "many-way":
            naive_skip = ("--quick (the broadcast takes ~12 s and 4 x 4 GB per call on a "
                          "2-core CPU)") if device.type == "cpu" else None
        impls.append(C.Impl("naive", make_naive(scale), baseline=True, skip=naive_skip,
                            # diff, its square, and two [B,Q,N,D] temporaries in backward
                            est_bytes=lambda case: 4 * B * Q * N * D * elt))
        impls.append(C.Impl("cdist", make_cdist(scale), baseline=True))
        impls.append(C.Impl("mm", make_mm(scale), baseline=True))
        impls.append(C.Impl("cdist+acc", make_cdist_acc(scale), baseline=True))
        impls.append(C.Impl("mm+acc", make_mm_acc(scale), baseline=True))
        eager_for_compile = make_cdist(scale)
    if compile_:
        impls.append(C.Impl("compile", make_compiled(eager_for_compile), baseline=True))
    else:
        impls.append(C.Impl("compile", None, baseline=True, skip="--no-compile/--compile-dtypes"))
    return impls


def cross_check_reference(device: torch.device) -> str:
    """Compare the local float64 oracle with fastmeta.ops.proto_loss_ref (small shape)."""
    if fm is None or not hasattr(fm, "proto_loss_ref"):
        return "oracle: local float64 (fastmeta.ops.proto_loss_ref not available to cross-check)"
    worst = 0.0
    for metric, scale in (("sqeuclidean", 1.0), ("cosine", 10.0)):
        g = torch.Generator().manual_seed(123)
        q = torch.randn(3, 17, 33, generator=g, dtype=torch.float64).to(device).requires_grad_()
        p = torch.randn(3, 7, 33, generator=g, dtype=torch.float64).to(device).requires_grad_()
        lab = torch.randint(0, 7, (3, 17), generator=g).to(device)
        a = proto_loss_f64(q, p, lab, metric, scale)
        b = fm.proto_loss_ref(q, p, lab, metric, scale, "mean")
        ga = torch.autograd.grad(a[0], [q, p])
        gb = torch.autograd.grad(b[0], [q, p])
        for x, y in zip([a[0], a[1], *ga], [b[0], b[1], *gb]):
            worst = max(worst, C._rel_err(x, y))
    status = "agrees" if worst < 1e-10 else "DISAGREES"
    return f"oracle: local float64; fastmeta.ops.proto_loss_ref {status} (max rel diff {worst:.1e})"


# ---------------------------------------------------------------------------------------------
# interleaved timing (small per-call times on a shared CPU)
# ---------------------------------------------------------------------------------------------


def run_interleaved(case: C.Case, impls: list[C.Impl], passes: list[str], *, rounds: int = 15,
                    min_calls: int = 200, round_s: float = 0.5, measure_memory: bool = True,
                    log=print, deadline: float | None = None) -> list[C.Result]:
    """:func:`_common.run_case` with interleaved timing: every implementation is checked
    against the float64 oracle first (a wrong one is not timed), then, per pass, ``rounds``
    rounds each run every implementation in turn for a batch of calls and record the mean per
    call of that batch; the row's median/p20/p80 are over the rounds. A batch is ``min_calls``
    calls, fewer only where that would take more than ``round_s`` seconds (calls of several
    ms). So a slow or busy stretch of the shared machine hits every implementation alike.

    Clock: the calling thread's CPU time (``time.thread_time``) at 1 thread (``at::parallel_for``
    runs inline then: all of the op's work, none of other processes'), wall time otherwise."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    results: list[C.Result] = []
    try:
        chk_inputs, ref_pack, cot = C.reference_outputs(case, seed=1000)
    except Exception as exc:  # noqa: BLE001
        return [C.Result(case, p, i.name, i.baseline, "failed", f"reference failed: {exc}")
                for i in impls for p in passes]
    inputs = case.make_inputs(0)
    good, errs = [], {}
    for impl in impls:
        if impl.skip or (deadline is not None and time.perf_counter() > deadline):
            why = impl.skip or "time limit reached"
            results.extend(C.Result(case, p, impl.name, impl.baseline, "skipped", why) for p in passes)
            continue
        log(f"... {case.name} {C.dtype_name(case.dtype)} {impl.name}: checking")
        try:
            err, where = C.check_impl(case, impl, chk_inputs, ref_pack, cot)
        except Exception as exc:  # noqa: BLE001
            results.extend(C.Result(case, p, impl.name, impl.baseline, "failed", C._first_line(exc))
                           for p in passes)
            continue
        if math.isnan(err) or err > case.tolerance():
            results.extend(C.Result(case, p, impl.name, impl.baseline, "WRONG",
                                    f"rel err {err:.3g} in {where}; not timed", err=err)
                           for p in passes)
            continue
        good.append(impl)
        errs[impl.name] = err
    if measure_memory:
        C.warm_profiler()
    for p in passes:
        steps = {i.name: C.make_step(case, i, inputs, p, cot) for i in good}
        calls = {}
        for name, step in steps.items():  # warm-up, and the batch size from its time
            t0 = clock()
            for _ in range(10):
                step()
            per_call = max((clock() - t0) / 10, 1e-7)
            calls[name] = max(1, min(min_calls, int(round_s / per_call)))
        times = {name: [] for name in steps}
        log(f"... {case.name} {C.dtype_name(case.dtype)} {p}: {rounds} interleaved rounds")
        for _ in range(rounds):
            for name, step in steps.items():
                n = calls[name]
                t0 = clock()
                for _ in range(n):
                    step()
                times[name].append((clock() - t0) / n * 1e3)
        for impl in good:
            t = C.summarize_ms(times[impl.name])
            peak = C.peak_memory_bytes(steps[impl.name], device=case.device) if measure_memory else None
            results.append(C.Result(case, p, impl.name, impl.baseline, "ok", "", t["median_ms"],
                                    t["p20_ms"], t["p80_ms"], t["n"] * calls[impl.name], peak,
                                    errs[impl.name]))
    C.fill_speedups(results)
    return results


# ---------------------------------------------------------------------------------------------
# script mode
# ---------------------------------------------------------------------------------------------


def _parse_shapes(text: str) -> list[str]:
    out = []
    for s in C.comma_list(text):
        if s in SHAPE_SETS:
            out.extend(SHAPE_SETS[s])
            continue
        s = SHAPE_ALIASES.get(s, s)
        if s not in SHAPES and s not in PROTOTYPE_SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {', '.join(SHAPES)} "
                             f"or the sets {', '.join(SHAPE_SETS)}")
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma list of {', '.join([*SHAPES, *PROTOTYPE_SHAPES])} or the sets "
                         f"{', '.join(SHAPE_SETS)}")
    ap.add_argument("--dtypes", default=None,
                    help="comma list (default float32 on CPU; float32,float16,bfloat16 on CUDA)")
    ap.add_argument("--quick", action="store_true",
                    help="short timing budget, skip naive many-way on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--compile-dtypes", default=None,
                    help="run the compile baseline only for these dtypes (10-30 s per compile)")
    ap.add_argument("--backends", default=None, help="only these fastmeta backends (comma list)")
    ap.add_argument("--passes", default=",".join(C.PASSES), help="fwd,fwd+bwd")
    ap.add_argument("--interleaved", choices=("auto", "on", "off"), default="auto",
                    help="interleaved rounds, thread CPU time (auto: on for a CPU at 1 thread)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per row")
    ap.add_argument("--calls", type=int, default=200,
                    help="calls per implementation per interleaved round (fewer for ms-long calls)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop starting new cases after this many seconds (rows say 'skipped')")
    C.add_common_args(ap, "device", "threads", "budget", "results-dir", "no-save")
    args = C.parse_args(ap, argv)

    t_start = time.perf_counter()
    device = args.device
    shapes = _parse_shapes(args.shapes)
    if args.dtypes:
        dtypes = [C.parse_dtype(d) for d in C.comma_list(args.dtypes)]
    else:
        low = [torch.float16, torch.bfloat16] if device.type == "cuda" else []
        dtypes = [torch.float32, *low]
    passes = C.comma_list(args.passes)
    compile_dtypes = dtypes
    if args.compile_dtypes:
        compile_dtypes = [C.parse_dtype(d) for d in C.comma_list(args.compile_dtypes)]
    backends = C.comma_list(args.backends) or None
    if args.budget is not None:
        budget = args.budget
    elif device.type == "cuda":
        budget = 0.1 if args.quick else 0.2
    else:
        budget = 0.15 if args.quick else 1.0

    interleaved = args.interleaved == "on" or (
        args.interleaved == "auto" and device.type == "cpu" and torch.get_num_threads() == 1)
    C.print_banner("proto_loss benchmark", device)
    if fm is None:
        print(f"fastmeta.ops does not import ({FM_ERROR}); timing the baselines only", flush=True)
    else:
        names, left_out = fastmeta_backends(device, dtypes[0], backends)
        try:
            probe = [torch.zeros(1, 1, 1, device=device, dtype=dtypes[0])] * 2
            auto = fm.registry.select("proto_loss", probe)
        except Exception:  # noqa: BLE001 - informational only
            auto = "?"
        print(f"fastmeta backends timed on {device.type}: {names or 'none'} "
              f"(+ auto, which picks {auto})"
              + "".join(f"; {b} left out: {why}" for b, why in left_out.items()), flush=True)
        try:
            print(cross_check_reference(device), flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"oracle cross-check failed: {type(exc).__name__}: {exc}", flush=True)
    timing = (f"interleaved: {args.rounds} rounds of up to {args.calls} calls per row, "
              f"{'thread CPU time' if torch.get_num_threads() == 1 else 'wall time'}"
              if interleaved else f"budget {budget} s per row")
    print(f"passes: {passes}; {timing}; dtypes {[C.dtype_name(d) for d in dtypes]}", flush=True)

    all_results: list[C.Result] = []
    ceilings: dict = {}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    saved_to = None
    # fp32 first over all shapes, then the low-precision dtypes: under a time limit the
    # headline numbers come first.
    for dtype in dtypes:
        for shape in shapes:
            if shape in PROTOTYPE_SHAPES:
                case = make_prototypes_case(shape, device, dtype)
                impls = make_prototypes_impls(shape, device, dtype)
            else:
                case = make_case(shape, device, dtype)
                impls = make_impls(shape, device, dtype, quick=args.quick, backends=backends,
                                   compile_=(not args.no_compile and dtype in compile_dtypes))
            if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
                results = [C.Result(case, p, i.name, i.baseline, "skipped", "--time-limit reached")
                           for i in impls for p in passes]
            else:
                deadline = t_start + args.time_limit if args.time_limit is not None else None
                t_case = time.perf_counter()
                if interleaved:
                    results = run_interleaved(case, impls, passes, rounds=args.rounds,
                                              min_calls=args.calls, log=log, deadline=deadline)
                else:
                    results = C.run_case(case, impls, passes, budget_s=budget, log=log,
                                         deadline=deadline)
                dt = time.perf_counter() - t_case
                log(f"... {shape} {C.dtype_name(dtype)} done in {dt:.1f} s")
            if case.op == "prototypes":
                base = PROTOTYPE_BASELINES
            else:
                base = EUCLID_BASELINES if case.params["metric"] == "sqeuclidean" else COSINE_BASELINES
            C.print_table(results, base)
            all_results.extend(results)
            if not args.no_save:
                saved_to = C.save_rows(results, STEM, results_dir=args.results_dir,
                                       extra=dict(quick=args.quick, interleaved=interleaved))
            if shape == "many-way" and any(r.ok for r in results):
                try:
                    key = C.dtype_name(dtype)
                    if key not in ceilings:
                        ceilings[key] = C.measure_ceilings(device, dtype)
                    print("\n".join(C.floor_report(results, ceilings[key])), flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"ceiling measurement failed: {type(exc).__name__}: {exc}", flush=True)

    for key, c in ceilings.items():
        print(f"measured ceilings ({key}): copy {c['copy_GBps']:.1f} GB/s (read+write), matmul "
              f"{c['matmul_GFLOPs']:.1f} GFLOP/s ({c['matmul_dtype']}, n={c['matmul_n']})")
    C.print_summary(all_results, t_start, saved_to)
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark mode
# ---------------------------------------------------------------------------------------------

if "pytest" in sys.modules:  # only under pytest: script mode neither needs nor imports it
    import pytest

    _PT_DEVICE = C.resolve_device(os.environ.get("FASTMETA_BENCH_DEVICE") or None)
    _PT_SHAPES = ["episode", "omniglot"]
    if os.environ.get("FASTMETA_BENCH_FULL") == "1":
        _PT_SHAPES.append("many-way")
    _PT_IMPLS = [
        "fastmeta[auto]",
        *[f"fastmeta[{b}]" for b in fastmeta_backends(_PT_DEVICE, torch.float32, None)[0]],
        *EUCLID_BASELINES,
    ]
    _PT_CACHE: dict = {}

    @pytest.mark.parametrize("impl_name", _PT_IMPLS)
    @pytest.mark.parametrize("shape", _PT_SHAPES)
    def test_proto_loss_fwd_bwd(benchmark, shape, impl_name):
        """fwd+bwd of proto_loss, fp32, one benchmark per (shape, impl)."""
        device, dtype = _PT_DEVICE, torch.float32
        case = make_case(shape, device, dtype)
        impls = {i.name: i for i in make_impls(shape, device, dtype)}
        if impl_name not in impls:
            pytest.skip(f"{impl_name}: {FM_ERROR or 'not available here'}")
        impl = impls[impl_name]
        if impl.skip:
            pytest.skip(impl.skip)
        free = C.mem_available_bytes(device)
        if impl.est_bytes is not None and free is not None and impl.est_bytes(case) > 0.7 * free:
            pytest.skip(f"needs ~{impl.est_bytes(case) / 2**30:.1f} GiB")
        if (shape, device) not in _PT_CACHE:
            _PT_CACHE[(shape, device)] = C.reference_outputs(case, seed=1000)
        chk_inputs, ref_pack, cot = _PT_CACHE[(shape, device)]
        err, where = C.check_impl(case, impl, chk_inputs, ref_pack, cot)  # also compiles/warms up
        if not (err <= case.tolerance()):
            pytest.fail(f"{impl_name} is wrong on {shape}: rel err {err:.3g} in {where} "
                        f"> {case.tolerance():.1g}")
        step = C.make_step(case, impl, case.make_inputs(0), "fwd+bwd", cot)

        def run():
            step()
            C.synchronize(device)

        t_ms = min(C._one_call_ms(run, device) for _ in range(2))
        rounds = int(max(3, min(200, 1.0 / max(t_ms * 1e-3, 1e-6))))
        benchmark.group = f"proto_loss fwd+bwd {shape} {C.dtype_name(dtype)} {device.type}"
        peak = C.peak_memory_bytes(step, device=device)
        benchmark.extra_info.update(
            impl=impl_name, shape=shape, params=case.params, dtype=C.dtype_name(dtype),
            rel_err=err, peak_mb=(peak / 2**20 if peak is not None else None),
            min_bytes=case.min_bytes["fwd+bwd"], flops=case.flops["fwd+bwd"],
        )
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        med = getattr(getattr(stats, "stats", None), "median", None)
        if med:
            benchmark.extra_info["gbps"] = case.min_bytes["fwd+bwd"] / med / 1e9


if __name__ == "__main__":
    sys.exit(main())
