"""The cases of ``tools/aot_check.py``: every Triton launcher of ``fastmeta.kernels`` called at
the benchmark shapes (``bench/bench_*.py``) and the test shapes (``tests/ops/test_*.py``,
``SMALL``/``LARGER``), imported from those files so they cannot drift, in every dtype and
precision mode the launcher serves. Each case is one launcher pair (forward + backward) for
one dtype path and shape, so one compile failure does not hide the others.

Tensors are CPU tensors of zeros: the stand-in driver compiles and launches nothing, so only
shapes, dtypes, strides and the launcher's block choices matter.

``SPILL_BUDGET`` is the most register-spill traffic (ptxas -v spill store + load bytes, per
variant) a kernel may have before the check fails; 0 unless a reason is given.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent

# Spill store + load bytes (ptxas -v) a variant may have: kernel -> {text in the variant's
# description: bytes}; the largest matching entry applies, anything unlisted has 0. Measured
# with the full set on sm_80 and sm_90 (bench/results/triton_aot.md); each entry says why it is
# tolerated instead of fixed.
SPILL_BUDGET: dict[str, dict[str, int]] = {
    # fp64 at the backend's limit (BN = BW = 64): up to 816 B at 8 warps (16 warps are worse:
    # ptxas caps registers at 64 and spills 40 KB). fp64 is the verification dtype, and the
    # spilled values are accumulator tiles re-read from L1. fp32 spills nothing at any shape.
    "_mlp_hvp_kernel": {"DT=fp64": 1024},
    # The proto tile kernels and the centring kernel spill 8-72 B in some fp64, tf32 and
    # sm_80 variants at 32-128 registers per thread: not register-file pressure (255 are
    # allowed), most likely the register saves around the division slow paths ptxas emits as
    # called subroutines (CALLs seen in the SASS of _proto_center_kernel variants; not
    # proven for each spilling variant). Full set, sm_80 + sm_90: max 72 B (logits
    # fwd), 64 B (loss bwd), 16 B (loss fwd), 48 B (centre). Untimed until a GPU is lent.
    "_proto_logits_fwd_kernel": {"": 96},
    "_proto_loss_fwd_kernel": {"": 32},
    "_proto_loss_bwd_kernel": {"": 96},
    "_proto_center_kernel": {"": 64},
}


# Dot paths of the float kernels: name -> (dtype, TF32 allowed)
PATHS = {"fp32": (torch.float32, False), "tf32": (torch.float32, True),
         "fp16": (torch.float16, False), "bf16": (torch.bfloat16, False),
         "fp64": (torch.float64, False)}
_STATE = {"tf32": False}


@dataclass
class Case:
    label: str
    run: Callable[[], None]
    cost: float = 1.0  # relative compile time, for scheduling (largest first)


def stand_in_gpu(sms: Callable[[], int]) -> None:
    """Make the launchers see a GPU while their tensors are on the CPU: the SM count of the
    arch being compiled (``sms()``) and the TF32 switch of the case."""
    from fastmeta.kernels import _common

    def input_precision(dtype, device):
        return "tf32" if dtype == torch.float32 and _STATE["tf32"] else "ieee"

    _common.input_precision = input_precision
    _common.sm_count = lambda device: sms()


def _module(folder: str, name: str):
    # test files import their helpers from tests/
    for path in {str(ROOT / folder), str(ROOT / "tests")}:
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module(name)


def _shapes(bench: dict, keys, test_module) -> list[tuple]:
    """Benchmark shapes (as tuples of ``keys``) then the test file's SMALL and LARGER."""
    tests = _module("tests/ops", test_module) if (ROOT / "tests").is_dir() else None
    out = [tuple(p[k] for k in keys) for p in bench.values()]
    if tests is not None:
        out += list(tests.SMALL) + list(tests.LARGER)
    return list(dict.fromkeys(out))


def _zeros(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _path_case(label, path, fn, cost=1.0) -> Case:
    dtype, tf32 = PATHS[path]

    def run():
        _STATE["tf32"] = tf32
        try:
            fn(dtype)
        finally:
            _STATE["tf32"] = False

    return Case(f"{label} {path}", run, cost)


# ---------------------------------------------------------------------------------------------
# per op
# ---------------------------------------------------------------------------------------------


def _prototypes_cases(quick):
    from fastmeta.kernels import prototypes as kp

    bench = _module("bench", "bench_proto").SHAPES
    # a ProtoNet episode's support set: 5 shots of each of its N classes
    sup = {k: dict(B=p["B"], S=5 * p["N"], N=p["N"], D=p["D"]) for k, p in bench.items()}
    shapes = _shapes(sup, "BSND", "test_prototypes")
    # test shapes are (B, S, N, D) too
    if quick:
        shapes = shapes[:1] + [s for s in shapes if s[0] * s[1] * s[2] * s[3] == 1]
    out = []
    for B, S, N, D in shapes:
        for path in ("fp32", "fp16", "bf16", "fp64"):
            def fn(dtype, B=B, S=S, N=N, D=D):
                labels = (torch.arange(S) % N).expand(B, S).contiguous()
                protos, counts = kp.prototypes_fwd(_zeros(B, S, D, dtype=dtype), labels, N)
                kp.prototypes_bwd(torch.zeros_like(protos), labels, counts)

            out.append(_path_case(f"prototypes B{B} S{S} N{N} D{D}", path, fn, 0.5))
    return out


def _proto_loss_cases(quick, autotune):
    from fastmeta.kernels import proto_loss as kl

    bench = _module("bench", "bench_proto").SHAPES
    shapes = _shapes(bench, "BQND", "test_proto_loss")
    if quick:  # the episode, the many-way tiles, the all-ones specialisation
        shapes = [s for s in shapes if s in {(32, 75, 5, 1600), (1, 2048, 1000, 512), (1, 1, 1, 1)}]
    out = []
    for B, Q, N, D in shapes:
        for path in PATHS:
            for metric in (0, 1):
                def loss(dtype, B=B, Q=Q, N=N, D=D, metric=metric):
                    q, p = _zeros(B, Q, D, dtype=dtype), _zeros(B, N, D, dtype=dtype)
                    labels = torch.zeros(B, Q, dtype=torch.int64)
                    _, lse, _ = kl.proto_loss_fwd(q, p, labels, metric, 1.0, 1e-8)
                    kl.proto_loss_bwd(torch.ones_like(lse), q, p, labels, lse, metric, 1.0, 1e-8)

                def logits(dtype, B=B, Q=Q, N=N, D=D, metric=metric):
                    q, p = _zeros(B, Q, D, dtype=dtype), _zeros(B, N, D, dtype=dtype)
                    out_ = kl.proto_logits_fwd(q, p, metric, 1.0, 1e-8)
                    kl.proto_logits_bwd(torch.zeros_like(out_), q, p, metric, 1.0, 1e-8)

                shape = f"B{B} Q{Q} N{N} D{D} metric{metric}"
                out.append(_path_case(f"proto_loss {shape}", path, loss, 2.0))
                out.append(_path_case(f"proto_logits {shape}", path, logits, 1.5))
    if autotune:
        out += _proto_autotune_cases(kl)
    return out


def _proto_autotune_cases(kl):
    """FASTMETA_TRITON_AUTOTUNE=1: the real autotuner compiles every config of the call's dot
    path (the stand-in driver's benchmarker launches each once); a shape every tile fits."""
    B, Q, N, D = 4, 64, 64, 256
    out = []
    for path in ("fp32", "tf32", "bf16", "fp64"):
        for metric in (0, 1):
            def fn(dtype, metric=metric):
                kl._AUTOTUNE, kl._TUNED = True, {}
                try:
                    q, p = _zeros(B, Q, D, dtype=dtype), _zeros(B, N, D, dtype=dtype)
                    labels = torch.zeros(B, Q, dtype=torch.int64)
                    _, lse, _ = kl.proto_loss_fwd(q, p, labels, metric, 1.0, 1e-8)
                    kl.proto_loss_bwd(torch.ones_like(lse), q, p, labels, lse, metric, 1.0, 1e-8)
                    kl.proto_logits_fwd(q, p, metric, 1.0, 1e-8)
                finally:
                    kl._AUTOTUNE, kl._TUNED = False, {}

            out.append(_path_case(f"proto autotune B{B} Q{Q} N{N} D{D} metric{metric}", path,
                                  fn, 20.0))
    return out


def _matching_cases(quick):
    from fastmeta.kernels import matching as km

    bench = _module("bench", "bench_matching").SHAPES
    shapes = _shapes(bench, "BQSND", "test_matching")
    if quick:
        shapes = [s for s in shapes if s in {(32, 75, 25, 5, 1600), (1, 4096, 4096, 1000, 256),
                                             (1, 1, 1, 1, 1)}]
    out = []
    for B, Q, S, N, D in shapes:
        def attention(dtype, B=B, Q=Q, S=S, N=N, D=D):
            q, s = _zeros(B, Q, D, dtype=dtype), _zeros(B, S, D, dtype=dtype)
            labels = (torch.arange(S) % N).expand(B, S).contiguous()
            logp, lse = km.matching_fwd(q, s, labels, N, 10.0, 1e-8)
            km.matching_bwd(torch.zeros_like(logp), q, s, labels, logp, lse, N, 10.0, 1e-8)

        def loss(dtype, B=B, Q=Q, S=S, N=N, D=D):
            q, s = _zeros(B, Q, D, dtype=dtype), _zeros(B, S, D, dtype=dtype)
            labels = (torch.arange(S) % N).expand(B, S).contiguous()
            ql = torch.zeros(B, Q, dtype=torch.int64)
            l_, lse, _ = km.matching_loss_fwd(q, s, labels, ql, N, 10.0, 1e-8)
            km.matching_loss_bwd(torch.ones_like(l_), q, s, labels, ql, l_, lse, N, 10.0, 1e-8)

        # fp16/bf16 inputs are normalised to fp32 copies first: the fp32 kernels serve them
        for path in ("fp32", "tf32", "fp64") if quick else PATHS:
            shape = f"B{B} Q{Q} S{S} N{N} D{D}"
            out.append(_path_case(f"matching {shape}", path, attention, 1.5))
            out.append(_path_case(f"matching_loss {shape}", path, loss, 1.5))
    return out


def _mlp_hvp_cases(quick):
    from fastmeta.kernels import mlp_hvp as kh
    from fastmeta.ops._mlp_hvp import TRITON_MAX_N, TRITON_MAX_WIDTH

    acts = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3}
    losses = {"mse": 0, "cross_entropy": 1}
    bench = _module("bench", "bench_mlp_hvp").CASES
    # (T, N, sizes, bias): the benchmark MLPs the Triton backend serves, the test shapes, and
    # the backend's limit (widest layer and most rows it accepts)
    nets = [(p["T"], p["N"], tuple(p["sizes"]), True) for p in bench.values()
            if max(p["sizes"]) <= TRITON_MAX_WIDTH and p["N"] <= TRITON_MAX_N]
    nets += list(_module("tests/ops", "test_mlp_hvp").SMALL) if (ROOT / "tests").is_dir() else []
    nets.append((2, TRITON_MAX_N, (TRITON_MAX_WIDTH,) * 3, True))
    nets = list(dict.fromkeys(nets))
    pairs = [(a, lo) for a in acts for lo in losses]
    jobs = []  # (net, act, loss, path, hvp)
    for k, (act, loss) in enumerate(pairs):
        for j, net in enumerate(nets):
            # every (activation, loss) x net with the HVP (the superset of the code); the
            # grad-only variant and fp64 rotate through the nets; quick: 2 nets per pair
            if quick and (k + j) % len(nets) not in (0, 1):
                continue
            jobs.append((net, act, loss, "fp32", True))
            if (k + j) % 2 == 0:
                jobs.append((net, act, loss, "fp32", False))
            if (k + j) % len(nets) == 0:
                jobs.append((net, act, loss, "fp64", True))
    jobs += [(nets[0], "tanh", "mse", "bf16", True), (nets[-1], "relu", "mse", "fp16", True)]
    out = []
    for (T, N, sizes, bias), act, loss, path, hvp in jobs:
        def fn(dtype, T=T, N=N, sizes=sizes, bias=bias, act=acts[act], loss=losses[loss], hvp=hvp):
            pairs_ = list(zip(sizes[:-1], sizes[1:]))
            ws = [_zeros(T, o, i, dtype=dtype) for i, o in pairs_]
            bs = [_zeros(T, o, dtype=dtype) for _, o in pairs_] if bias else []
            x = _zeros(T, N, sizes[0], dtype=dtype)
            y = _zeros(T, N, sizes[-1], dtype=dtype) if loss == 0 else \
                torch.zeros(T, N, dtype=torch.int64)
            if hvp:
                kh.mlp_grad_hvp_fwd(ws, bs, x, y, [torch.zeros_like(w) for w in ws],
                                    [torch.zeros_like(b) for b in bs], act, loss)
            else:
                kh.mlp_grad_fwd(ws, bs, x, y, act, loss)

        cost = 1.0 + max(sizes) / 8 * (len(sizes) - 1)
        out.append(_path_case(f"mlp_{'grad_hvp' if hvp else 'grad'} T{T} N{N} "
                              f"{'-'.join(map(str, sizes))} bias{int(bias)} {act} {loss}",
                              path, fn, cost))
    return out


def _gaussian_product_cases(quick):
    from fastmeta.kernels import gaussian_product as kg

    shapes = _shapes(_module("bench", "bench_gaussian_product").SHAPES, "BCD",
                     "test_gaussian_product")
    if quick:
        shapes = [s for s in shapes if s in {(16, 100, 5), (128, 512, 64), (1, 1, 1)}]
    out = []
    for B, C, D in shapes:
        def fn(dtype, B=B, C=C, D=D):
            mu, var = _zeros(B, C, D, dtype=dtype), _zeros(B, C, D, dtype=dtype)
            w = _zeros(B, C, dtype=dtype)
            m_out, v_out = kg.gaussian_product_fwd(mu, var, w, 1e-7)
            kg.gaussian_product_bwd(m_out, v_out, mu, var, w, m_out, v_out, 1e-7)

        for path in ("fp32", "fp16", "bf16", "fp64"):
            out.append(_path_case(f"gaussian_product B{B} C{C} D{D}", path, fn, 0.5))
    return out


def cases(quick: bool, autotune: bool) -> list[Case]:
    """Every case, in a fixed order (workers find a case by its label)."""
    out = (_prototypes_cases(quick) + _proto_loss_cases(quick, autotune) + _matching_cases(quick)
           + _mlp_hvp_cases(quick) + _gaussian_product_cases(quick))
    labels = [c.label for c in out]
    assert len(labels) == len(set(labels)), "duplicate AOT case labels"
    return out
