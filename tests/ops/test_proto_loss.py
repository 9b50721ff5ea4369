"""proto_logits / proto_loss: every backend against a float64 oracle, autograd, opcheck,
torch.compile, edge shapes and bad inputs."""

import pytest
import torch
from helpers import ALL_BACKENDS, DEVICE, FAST_BACKENDS, ON_CPU, assert_close64, assert_close_measured, assert_matches_oracle, case_id

from fastmeta import _ext
import fastmeta.ops._proto_loss as proto_loss_mod
from fastmeta.ops import BackendError, proto_logits, proto_logits_ref, proto_loss, proto_loss_ref


METRICS = ["sqeuclidean", "cosine"]
# composite: plain ATen arranged for speed (chosen automatically where it beats the kernels)
BACKENDS = [*ALL_BACKENDS, "composite"]
FAST = [*FAST_BACKENDS, "composite"]
# (B, Q, N, D): singletons, block boundaries (15, 16, 17, 33), one odd everything.
SMALL = [(1, 1, 1, 1), (2, 5, 3, 7), (1, 17, 16, 33), (2, 16, 17, 15)]
LARGER = [(3, 33, 5, 65), (2, 70, 40, 130)]


def shapes_for(backend):
    # The Triton interpreter is ~1000x slower than PyTorch: keep its grids tiny on the CPU.
    return SMALL if (backend == "triton" and ON_CPU) else SMALL + LARGER


def make(b, q, n, d, dtype, magnitude=1.0, device=DEVICE):
    query = (torch.randn(b, q, d, dtype=torch.float64) * magnitude).to(device, dtype)
    protos = (torch.randn(b, n, d, dtype=torch.float64) * magnitude).to(device, dtype)
    labels = torch.randint(0, n, (b, q), device=device)
    return query, protos, labels


def loss_and_grads(fn, query, protos, labels, weights, **kw):
    q = query.detach().clone().requires_grad_()
    p = protos.detach().clone().requires_grad_()
    loss, acc = fn(q, p, labels, reduction="none", **kw)
    gq, gp = torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), (q, p))
    return loss.detach(), acc, gq, gp


def logits_and_grads(fn, query, protos, weights, **kw):
    q = query.detach().clone().requires_grad_()
    p = protos.detach().clone().requires_grad_()
    out = fn(q, p, **kw)
    gq, gp = torch.autograd.grad((out * weights.to(out.dtype)).sum(), (q, p))
    return out.detach(), gq, gp


def _cases(backends):
    return [
        (bk, metric, dtype, shape)
        for bk in backends
        for metric in METRICS
        for dtype in (torch.float32, torch.float64)
        for shape in shapes_for(bk)
    ]


@pytest.mark.parametrize("backend,metric,dtype,shape", _cases(BACKENDS), ids=case_id)
def test_loss_matches_float64_oracle(backend, metric, dtype, shape):
    query, protos, labels = make(*shape, dtype)
    weights = torch.rand(shape[0], shape[1], device=DEVICE, dtype=torch.float64)
    scale = 0.7
    fast = loss_and_grads(proto_loss, query, protos, labels, weights, metric=metric, scale=scale, backend=backend)
    oracle = loss_and_grads(proto_loss_ref, query.double(), protos.double(), labels, weights, metric=metric, scale=scale)
    same = loss_and_grads(proto_loss_ref, query, protos, labels, weights, metric=metric, scale=scale)
    assert_matches_oracle(fast, same, oracle, [(0, "loss"), (2, "grad query"), (3, "grad protos")],
                          dtype, atol=1e-5)
    # accuracy: the argmax may differ from the oracle only at (near-)ties; all shapes are random
    torch.testing.assert_close(fast[1].double(), oracle[1], atol=0, rtol=0)


@pytest.mark.parametrize("backend,metric,dtype,shape", _cases(BACKENDS), ids=case_id)
def test_logits_match_float64_oracle(backend, metric, dtype, shape):
    query, protos, _ = make(*shape, dtype)
    weights = torch.randn(shape[0], shape[1], shape[2], device=DEVICE, dtype=torch.float64)
    kw = dict(metric=metric, scale=1.3)
    fast = logits_and_grads(proto_logits, query, protos, weights, backend=backend, **kw)
    oracle = logits_and_grads(proto_logits_ref, query.double(), protos.double(), weights, **kw)
    same = logits_and_grads(proto_logits_ref, query, protos, weights, **kw)
    assert_matches_oracle(fast, same, oracle, [(0, "logits"), (1, "grad query"), (2, "grad protos")],
                          dtype, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_agree(backend, reduction):
    query, protos, labels = make(2, 9, 4, 6, torch.float64)
    rows, correct = proto_loss(query, protos, labels, reduction="none", backend=backend)
    loss, acc = proto_loss(query, protos, labels, reduction=reduction, backend=backend)
    expect = {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]
    assert_close64(loss, expect)
    assert not acc.requires_grad
    if reduction != "none":
        assert_close64(acc, correct.mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_magnitudes_stay_finite_and_accurate(backend, metric, dtype):
    # distances around 1e8: logits far beyond exp's range; a naive softmax overflows.
    query, protos, labels = make(2, 17, 5, 9, dtype, magnitude=1e3)
    weights = torch.ones(2, 17, device=DEVICE, dtype=torch.float64)
    fast = loss_and_grads(proto_loss, query, protos, labels, weights, metric=metric, backend=backend)
    oracle = loss_and_grads(proto_loss_ref, query.double(), protos.double(), labels, weights, metric=metric)
    same = loss_and_grads(proto_loss_ref, query, protos, labels, weights, metric=metric)
    for i in (0, 2, 3):
        assert torch.isfinite(fast[i]).all()
        if dtype == torch.float64:
            assert_close64(fast[i], oracle[i], rtol=1e-9, atol=1e-6)
        else:
            assert_close_measured(fast[i], same[i], oracle[i], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_class_gives_zero_loss_and_gradient(backend):
    query, protos, labels = make(2, 5, 1, 4, torch.float64)
    weights = torch.ones(2, 5, device=DEVICE, dtype=torch.float64)
    loss, acc, gq, gp = loss_and_grads(proto_loss, query, protos, labels, weights, backend=backend)
    assert (loss == 0).all() and (acc == 1).all()
    assert gq.abs().max() < 1e-12 and gp.abs().max() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base_q = torch.randn(7, 2, 2 * 5, device=DEVICE, dtype=torch.float64)
    query = base_q.transpose(0, 1)[..., ::2]  # [2,7,5], strided in every dim
    protos = torch.randn(2, 5, 3, device=DEVICE, dtype=torch.float64).transpose(1, 2)  # [2,3,5]
    labels = torch.randint(0, 3, (7, 2), device=DEVICE).t()
    assert not query.is_contiguous() and not protos.is_contiguous() and not labels.is_contiguous()
    weights = torch.rand(2, 7, device=DEVICE, dtype=torch.float64)
    fast = loss_and_grads(proto_loss, query, protos, labels, weights, backend=backend)
    oracle = loss_and_grads(proto_loss_ref, query.contiguous(), protos.contiguous(), labels.contiguous(), weights)
    for i in (0, 2, 3):
        assert_close64(fast[i], oracle[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vector_cosine_is_zero_similarity(backend):
    query = torch.zeros(1, 2, 3, dtype=torch.float64, device=DEVICE)
    protos = torch.randn(1, 4, 3, dtype=torch.float64, device=DEVICE)
    assert (proto_logits(query, protos, "cosine", backend=backend) == 0).all()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck(backend, metric):
    query, protos, labels = make(2, 3, 2, 3, torch.float64)
    q, p = query.requires_grad_(), protos.requires_grad_()
    torch.autograd.gradcheck(
        lambda a, b: proto_loss(a, b, labels, metric, 0.9, "none", backend=backend)[0], (q, p)
    )
    torch.autograd.gradcheck(lambda a, b: proto_logits(a, b, metric, 0.9, backend=backend), (q, p))


@pytest.mark.parametrize("backend", ["reference", "composite"])
@pytest.mark.parametrize("metric", METRICS)
def test_reference_gradgradcheck(metric, backend):
    # Proto-MAML differentiates through the head twice: the plain-ATen paths support it.
    query, protos, labels = make(1, 3, 2, 3, torch.float64)
    q, p = query.requires_grad_(), protos.requires_grad_()
    torch.autograd.gradgradcheck(
        lambda a, b: proto_loss(a, b, labels, metric, reduction="none", backend=backend)[0], (q, p)
    )


def test_learnable_scale_gets_gradient():
    query, protos, labels = make(2, 6, 3, 4, torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss, _ = proto_loss(query, protos, labels, "cosine", scale)
    (g,) = torch.autograd.grad(loss, scale)
    s64 = scale.detach().clone().requires_grad_()
    ref, _ = proto_loss_ref(query, protos, labels, "cosine", s64)
    (g_ref,) = torch.autograd.grad(ref, s64)
    assert_close64(g, g_ref)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck_registered_ops(backend):
    query, protos, labels = make(2, 5, 3, 4, torch.float64)
    query.requires_grad_()
    protos.requires_grad_()
    for metric in (0, 1):
        torch.library.opcheck(proto_loss_mod._loss_fwd, (query, protos, labels, metric, 0.5, 1e-8, backend))
        torch.library.opcheck(proto_loss_mod._logits_fwd, (query, protos, metric, 0.5, 1e-8, backend))
        lse = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
        g = torch.rand(2, 5, dtype=torch.float64, device=DEVICE)
        torch.library.opcheck(
            proto_loss_mod._loss_bwd,
            (g, query.detach(), protos.detach(), labels, lse, metric, 0.5, 1e-8, backend),
        )
        g3 = torch.randn(2, 5, 3, dtype=torch.float64, device=DEVICE)
        torch.library.opcheck(
            proto_loss_mod._logits_bwd, (g3, query.detach(), protos.detach(), metric, 0.5, 1e-8, backend)
        )


# aot_eager traces the custom ops' fake and autograd registrations; inductor (torch.compile's
# default) also generates and compiles code around them, as a user's torch.compile does
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", [b for b in FAST if b != "triton" or not ON_CPU])
def test_torch_compile_fullgraph(backend, compiler):
    query, protos, labels = make(2, 6, 3, 8, torch.float32)
    q = query.requires_grad_()

    @torch.compile(fullgraph=True, backend=compiler)
    def step(q, p, y):
        loss, acc = proto_loss(q * 2.0, p, y, backend=backend)
        return loss, acc

    loss, acc = step(q, protos, labels)
    loss.backward()
    ref_q = query.detach().clone().requires_grad_()
    ref, ref_acc = proto_loss_ref(ref_q * 2.0, protos, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(q.grad, ref_q.grad)
    torch.testing.assert_close(acc, ref_acc)


def _ops_run(fn):
    """Names of the operators ``fn()`` dispatched (torch's profiler records every op call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_backend_env_override_unknown_name(monkeypatch):
    query, protos, labels = make(1, 2, 2, 2, torch.float32)
    monkeypatch.setenv("FASTMETA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTMETA_BACKEND"):
        proto_loss(query, protos, labels)


@pytest.mark.skipif(not ON_CPU, reason="the cpp/reference split is the CPU's")
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_env_override_runs_that_backend(monkeypatch, backend):
    """FASTMETA_BACKEND=<name> makes that backend run: the fused op (``fastmeta::proto_loss_fwd``)
    and, for cpp, the compiled kernel (``fastmeta_cpp::proto_loss_fwd``) appear among the ops
    dispatched; for reference neither does."""
    query, protos, labels = make(1, 3, 2, 4, torch.float32)
    monkeypatch.setenv("FASTMETA_BACKEND", backend)
    out = {}
    ran = _ops_run(lambda: out.setdefault("r", proto_loss(query, protos, labels)))
    fused = "fastmeta::proto_loss_fwd" in ran
    compiled = "fastmeta_cpp::proto_loss_fwd" in ran
    assert (fused, compiled) == {"reference": (False, False), "composite": (False, False), "cpp": (True, True),
                                 "triton": (True, False)}[backend], sorted(n for n in ran if "fastmeta" in n)
    # the profiler saw the call's ops (else the check above would pass vacuously for reference)
    assert any(n.startswith("aten::") for n in ran), sorted(ran)
    ref, ref_acc = proto_loss_ref(query.double(), protos.double(), labels)
    torch.testing.assert_close(out["r"][0].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["r"][1].double(), ref_acc.double())


# ---- bad inputs ------------------------------------------------------------------------


def _good():
    q, p, y = make(2, 4, 3, 5, torch.float32)
    return dict(query=q, protos=p, query_labels=y)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(query_labels=a["query_labels"] - 1 - a["query_labels"]), ValueError, "query_labels.*-1"),
        (lambda a: a.update(query_labels=a["query_labels"] * 0 + 3), ValueError, r"query_labels must lie in \[0, 2\]"),
        (lambda a: a.update(query_labels=a["query_labels"].float()), TypeError, "query_labels must be an integer"),
        (lambda a: a.update(query_labels=a["query_labels"][:, :2]), ValueError, "query_labels must have shape"),
        (lambda a: a.update(protos=a["protos"][:1]), ValueError, "episode count B.*query_B=2, protos_B=1"),
        (lambda a: a.update(protos=a["protos"][..., :4]), ValueError, "feature size D.*query_D=5, protos_D=4"),
        (lambda a: a.update(query=a["query"].double()), TypeError, "protos has dtype"),
        (lambda a: a.update(query=a["query"].long()), TypeError, "query must be a floating tensor"),
        (lambda a: a.update(query=a["query"][0]), ValueError, r"query must have shape \[B, Q, D\]"),
        (lambda a: a.update(query=a["query"][:, :0], query_labels=a["query_labels"][:, :0]), ValueError,
         "empty input: Q is 0"),
        (lambda a: a.update(protos=a["protos"].to("meta")), ValueError, "protos is on meta"),
        (lambda a: a.update(query=[[1.0]]), TypeError, "query must be a torch.Tensor"),
        (lambda a: a.update(metric="manhattan"), ValueError, "metric must be one of"),
        (lambda a: a.update(reduction="avg"), ValueError, "reduction must be"),
        (lambda a: a.update(scale=float("nan")), ValueError, "scale must be finite"),
        (lambda a: a.update(backend="cuda-magic"), ValueError, "not a backend of proto_loss"),
    ],
)
def test_bad_inputs_raise_clearly(change, exc, match):
    args = _good()
    change(args)
    with pytest.raises(exc, match=match):
        proto_loss(**args)


@pytest.mark.parametrize("backend", ["cpp"])
def test_forced_backend_that_cannot_run_lists_reasons(backend):
    q, p, y = make(1, 2, 2, 2, torch.float16, device="cpu")
    with pytest.raises(BackendError, match="backend 'cpp' cannot run this call: dtype float16 not supported"):
        proto_loss(q, p, y, backend=backend)


# ---- the one-call C++ entry point (automatic selection, eager, CPU) -------------------------

needs_fused = pytest.mark.skipif(
    not ON_CPU or _ext.entry("proto_loss_fused") is None,
    reason="the one-call entry point serves CPU tensors of a built fastmeta._C",
)
# one episode (5-way 15 queries, 20-way 5 queries), many episodes with N <= 8, odd sizes
FUSED_SHAPES = [(1, 75, 5, 64), (1, 100, 20, 64), (9, 7, 3, 130), (2, 5, 3, 7)]


def _is_fused(loss):
    return loss.grad_fn is not None and "ProtoLoss" in loss.grad_fn.name()


@needs_fused
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=case_id)
def test_one_call_path_matches_float64_oracle(metric, dtype, shape):
    query, protos, labels = make(*shape, dtype)
    weights = torch.rand(shape[0], shape[1], device=DEVICE, dtype=torch.float64)
    q = query.detach().clone().requires_grad_()
    assert _is_fused(proto_loss(q, protos, labels, metric, 0.7)[0])  # automatic selection
    fast = loss_and_grads(proto_loss, query, protos, labels, weights, metric=metric, scale=0.7)
    oracle = loss_and_grads(proto_loss_ref, query.double(), protos.double(), labels, weights, metric=metric, scale=0.7)
    same = loss_and_grads(proto_loss_ref, query, protos, labels, weights, metric=metric, scale=0.7)
    assert_matches_oracle(fast, same, oracle, [(0, "loss"), (2, "grad query"), (3, "grad protos")],
                          dtype, atol=1e-5)
    torch.testing.assert_close(fast[1].double(), oracle[1], atol=0, rtol=0)
    for reduction in ("mean", "sum"):  # reduced loss and accuracy, and their gradients
        kw = dict(metric=metric, scale=0.7, reduction=reduction)
        fast = reduced_and_grads(proto_loss, query, protos, labels, **kw)
        assert _is_fused(fast[0]) and not fast[1].requires_grad
        assert fast[0].shape == fast[1].shape == () and fast[1].dtype == dtype
        oracle = reduced_and_grads(proto_loss_ref, query.double(), protos.double(), labels, **kw)
        same = reduced_and_grads(proto_loss_ref, query, protos, labels, **kw)
        assert_matches_oracle(fast, same, oracle, [(0, reduction), (2, "grad query"), (3, "grad protos")],
                              dtype, atol=1e-5)
        torch.testing.assert_close(fast[1], oracle[1].to(dtype), atol=0, rtol=0)


def reduced_and_grads(fn, query, protos, labels, **kw):
    q = query.detach().clone().requires_grad_()
    p = protos.detach().clone().requires_grad_()
    loss, acc = fn(q, p, labels, **kw)
    return (loss, acc, *torch.autograd.grad(loss, (q, p)))


@needs_fused
@pytest.mark.parametrize("metric", METRICS)
def test_one_call_path_twice_differentiable(metric):
    # create_graph=True (Proto-MAML) recomputes with differentiable ATen in the C++ backward
    query, protos, labels = make(1, 4, 3, 5, torch.float64)
    q, p = query.requires_grad_(), protos.requires_grad_()
    assert _is_fused(proto_loss(q, p, labels, metric)[0])
    for reduction in ("mean", "none"):
        torch.autograd.gradgradcheck(lambda a, b: proto_loss(a, b, labels, metric, 1.3, reduction)[0], (q, p))
    only_p = lambda b: proto_loss(query.detach(), b, labels, metric)[0]  # noqa: E731
    torch.autograd.gradgradcheck(only_p, (p,))


@needs_fused
def test_one_call_path_inputs_without_grad_and_inference_mode():
    query, protos, labels = make(1, 25, 5, 64, torch.float64)
    ref = proto_loss_ref(query, protos, labels)
    p = protos.clone().requires_grad_()
    loss, acc = proto_loss(query, p, labels)
    (gp,) = torch.autograd.grad(loss, p)
    (gp_ref,) = torch.autograd.grad(proto_loss_ref(query, p, labels)[0], p)
    assert_close64(gp, gp_ref)
    with torch.inference_mode():
        loss, acc = proto_loss(query, protos, labels)
    assert_close64(loss, ref[0])
    assert_close64(acc, ref[1])


@needs_fused
@pytest.mark.parametrize("bad,match", [(5, r"query_labels must lie in \[0, 4\].*found label 5"),
                                       (-1, "query_labels.*found label -1"),
                                       (-100, "query_labels.*found label -100")])
def test_one_call_path_bad_labels_raise_clearly(bad, match):
    # the C++ side rejects the call; the full Python checks then say what is wrong (-100 is
    # cross_entropy's ignore_index: never silently ignored)
    query, protos, labels = make(1, 25, 5, 64, torch.float32)
    labels[0, 3] = bad
    with pytest.raises(ValueError, match=match):
        proto_loss(query, protos, labels)
