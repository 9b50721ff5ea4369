"""matching_attention / matching_loss: every backend against a float64 oracle, autograd,
opcheck, torch.compile, edge shapes, finiteness of far classes and bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_BACKENDS, DEVICE, FAST_BACKENDS, ON_CPU, assert_close64, assert_close_measured, assert_matches_oracle, case_id

from fastmeta import _ext
import fastmeta.ops._matching as matching_mod
from fastmeta.ops import BackendError, matching_attention, matching_attention_ref, matching_loss, matching_loss_ref


# (B, Q, S, N, D): singletons, block boundaries (15, 16, 17, 33) in Q, S, N and D.
SMALL = [(1, 1, 1, 1, 1), (2, 5, 7, 3, 6), (1, 17, 16, 16, 15), (2, 16, 33, 17, 17), (1, 15, 17, 5, 33)]
LARGER = [(3, 40, 25, 5, 65), (2, 70, 100, 20, 64)]


def shapes_for(backend):
    # The Triton interpreter is ~1000x slower than PyTorch: keep its grids tiny on the CPU.
    return SMALL if (backend == "triton" and ON_CPU) else SMALL + LARGER


def make(b, q, s, n, d, dtype, device=DEVICE):
    """Episodes with every class present (a random permutation of a balanced label list)."""
    assert s >= n
    support = torch.randn(b, s, d, dtype=torch.float64).to(device, dtype)
    slabels = torch.stack([torch.randperm(s) % n for _ in range(b)]).to(device)
    query = torch.randn(b, q, d, dtype=torch.float64).to(device, dtype)
    qlabels = torch.randint(0, n, (b, q), device=device)
    return query, support, slabels, qlabels


def attn_and_grads(fn, query, support, slabels, n, weights, **kw):
    q = query.detach().clone().requires_grad_()
    s = support.detach().clone().requires_grad_()
    out = fn(q, s, slabels, n, **kw)
    gq, gs = torch.autograd.grad((out * weights.to(out.dtype)).sum(), (q, s))
    return out.detach(), gq, gs


def loss_and_grads(fn, query, support, slabels, n, qlabels, weights, **kw):
    q = query.detach().clone().requires_grad_()
    s = support.detach().clone().requires_grad_()
    loss, acc = fn(q, s, slabels, n, qlabels, reduction="none", **kw)
    gq, gs = torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), (q, s))
    return loss.detach(), acc, gq, gs


def _cases(backends):
    return [
        (bk, dtype, shape)
        for bk in backends
        for dtype in (torch.float32, torch.float64)
        for shape in shapes_for(bk)
    ]


@pytest.mark.parametrize("backend,dtype,shape", _cases(ALL_BACKENDS), ids=case_id)
def test_attention_matches_float64_oracle(backend, dtype, shape):
    b, q, s, n, d = shape
    query, support, slabels, _ = make(*shape, dtype)
    weights = torch.randn(b, q, n, device=DEVICE, dtype=torch.float64)
    kw = dict(scale=4.0)
    fast = attn_and_grads(matching_attention, query, support, slabels, n, weights, backend=backend, **kw)
    oracle = attn_and_grads(matching_attention_ref, query.double(), support.double(), slabels, n, weights, **kw)
    same = attn_and_grads(matching_attention_ref, query, support, slabels, n, weights, **kw)
    assert_matches_oracle(fast, same, oracle, [(0, "log-probs"), (1, "grad query"), (2, "grad support")],
                          dtype, atol=1e-5)


@pytest.mark.parametrize("backend,dtype,shape", _cases(ALL_BACKENDS), ids=case_id)
def test_loss_matches_float64_oracle(backend, dtype, shape):
    b, q, s, n, d = shape
    query, support, slabels, qlabels = make(*shape, dtype)
    weights = torch.rand(b, q, device=DEVICE, dtype=torch.float64)
    kw = dict(scale=4.0)
    fast = loss_and_grads(matching_loss, query, support, slabels, n, qlabels, weights, backend=backend, **kw)
    oracle = loss_and_grads(matching_loss_ref, query.double(), support.double(), slabels, n, qlabels, weights, **kw)
    same = loss_and_grads(matching_loss_ref, query, support, slabels, n, qlabels, weights, **kw)
    assert_matches_oracle(fast, same, oracle, [(0, "loss"), (2, "grad query"), (3, "grad support")],
                          dtype, atol=1e-5)
    torch.testing.assert_close(fast[1].double(), oracle[1], atol=0, rtol=0)


def test_reference_equals_the_paper_formula():
    # log(softmax(scale cos) @ onehot): the formula of the paper / public code.
    query, support, slabels, _ = make(2, 9, 12, 4, 8, torch.float64)
    attn = torch.softmax(3.0 * F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).mT, dim=-1)
    naive = torch.log(attn @ F.one_hot(slabels, 4).to(attn))
    assert_close64(matching_attention_ref(query, support, slabels, 4, 3.0), naive)
    assert_close64(matching_attention(query, support, slabels, 4, 3.0).exp().sum(-1), torch.ones(2, 9, dtype=torch.float64))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_agree(backend, reduction):
    query, support, slabels, qlabels = make(2, 9, 8, 4, 6, torch.float64)
    rows, correct = matching_loss(query, support, slabels, 4, qlabels, reduction="none", backend=backend)
    loss, acc = matching_loss(query, support, slabels, 4, qlabels, reduction=reduction, backend=backend)
    expect = {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]
    assert_close64(loss, expect)
    assert not acc.requires_grad
    if reduction != "none":
        assert_close64(acc, correct.mean())
    logp = matching_attention(query, support, slabels, 4, backend=backend)
    assert_close64(rows, -logp.gather(-1, qlabels.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_far_class_stays_finite(backend, dtype):
    # scale=100: a class whose examples point away from the query gets attention ~exp(-200),
    # 0 in float32 (and the naive log(attn @ onehot) is -inf); log P must stay finite.
    d = 4
    e0 = torch.zeros(d, dtype=torch.float64)
    e0[0] = 1.0
    support = torch.stack([e0, e0 * 0.9, -e0, -e0 * 2]).unsqueeze(0)  # classes 0, 0, 1, 1
    support = support + 1e-3 * torch.randn(1, 4, d, dtype=torch.float64)
    query = (e0 + 1e-3 * torch.randn(3, d, dtype=torch.float64)).unsqueeze(0)
    slabels = torch.tensor([[0, 0, 1, 1]])
    qlabels = torch.tensor([[1, 1, 0]])
    query, support, slabels, qlabels = (x.to(DEVICE) for x in (query, support, slabels, qlabels))
    query, support = query.to(dtype), support.to(dtype)
    weights = torch.ones(1, 3, 2, device=DEVICE, dtype=torch.float64)
    fast = attn_and_grads(matching_attention, query, support, slabels, 2, weights, scale=100.0, backend=backend)
    oracle = attn_and_grads(matching_attention_ref, query.double(), support.double(), slabels, 2, weights, scale=100.0)
    for t in fast:
        assert torch.isfinite(t).all()
    assert (fast[0][..., 1] < -150).all()
    torch.testing.assert_close(fast[0].double(), oracle[0], rtol=1e-5, atol=1e-3)
    lw = torch.ones(1, 3, device=DEVICE, dtype=torch.float64)
    loss = loss_and_grads(matching_loss, query, support, slabels, 2, qlabels, lw, scale=100.0, backend=backend)
    for t in (loss[0], loss[2], loss[3]):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(loss[0].double(), -oracle[0].gather(-1, qlabels[..., None]).squeeze(-1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_class_gives_zero_logprob_and_gradient(backend):
    query, support, slabels, qlabels = make(2, 5, 3, 1, 4, torch.float64)
    weights = torch.ones(2, 5, 1, device=DEVICE, dtype=torch.float64)
    out, gq, gs = attn_and_grads(matching_attention, query, support, slabels, 1, weights, backend=backend)
    assert out.abs().max() < 1e-12
    assert gq.abs().max() < 1e-12 and gs.abs().max() < 1e-12


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend):
    query = torch.randn(7, 2, 2 * 5, device=DEVICE, dtype=torch.float64).transpose(0, 1)[..., ::2]  # [2,7,5]
    support = torch.randn(2, 5, 6, device=DEVICE, dtype=torch.float64).transpose(1, 2)  # [2,6,5]
    slabels = torch.stack([torch.randperm(6) % 3 for _ in range(2)], dim=1).to(DEVICE).t()  # [2,6]
    qlabels = torch.randint(0, 3, (7, 2), device=DEVICE).t()
    assert not query.is_contiguous() and not support.is_contiguous()
    assert not slabels.is_contiguous() and not qlabels.is_contiguous()
    w = torch.randn(2, 7, 3, device=DEVICE, dtype=torch.float64)
    fast = attn_and_grads(matching_attention, query, support, slabels, 3, w, backend=backend)
    oracle = attn_and_grads(matching_attention_ref, query.contiguous(), support.contiguous(), slabels.contiguous(), 3, w)
    for i in range(3):
        assert_close64(fast[i], oracle[i])
    lw = torch.rand(2, 7, device=DEVICE, dtype=torch.float64)
    fast = loss_and_grads(matching_loss, query, support, slabels, 3, qlabels, lw, backend=backend)
    oracle = loss_and_grads(matching_loss_ref, query.contiguous(), support.contiguous(), slabels.contiguous(), 3,
                            qlabels.contiguous(), lw)
    for i in (0, 2, 3):
        assert_close64(fast[i], oracle[i])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_vector_has_zero_similarity(backend):
    # a zero query attends uniformly: log P[n] = log(count_n / S)
    query = torch.zeros(1, 2, 3, dtype=torch.float64, device=DEVICE)
    support = torch.randn(1, 5, 3, dtype=torch.float64, device=DEVICE)
    slabels = torch.tensor([[0, 1, 1, 2, 2]], device=DEVICE)
    out = matching_attention(query, support, slabels, 3, 5.0, backend=backend)
    expect = torch.log(torch.tensor([1 / 5, 2 / 5, 2 / 5], dtype=torch.float64, device=DEVICE)).expand(1, 2, 3)
    assert_close64(out, expect)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck(backend):
    query, support, slabels, qlabels = make(2, 3, 4, 2, 3, torch.float64)
    q, s = query.requires_grad_(), support.requires_grad_()
    torch.autograd.gradcheck(lambda a, b: matching_attention(a, b, slabels, 2, 1.7, backend=backend), (q, s))
    torch.autograd.gradcheck(
        lambda a, b: matching_loss(a, b, slabels, 2, qlabels, 1.7, "none", backend=backend)[0], (q, s)
    )


def test_reference_gradgradcheck():
    query, support, slabels, qlabels = make(1, 3, 4, 2, 3, torch.float64)
    q, s = query.requires_grad_(), support.requires_grad_()
    torch.autograd.gradgradcheck(lambda a, b: matching_attention(a, b, slabels, 2, 1.7, backend="reference"), (q, s))
    torch.autograd.gradgradcheck(
        lambda a, b: matching_loss(a, b, slabels, 2, qlabels, 1.7, "none", backend="reference")[0], (q, s)
    )


def test_learnable_scale_gets_gradient():
    query, support, slabels, qlabels = make(2, 6, 6, 3, 4, torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss, _ = matching_loss(query, support, slabels, 3, qlabels, scale)
    (g,) = torch.autograd.grad(loss, scale)
    s64 = scale.detach().clone().requires_grad_()
    attn = torch.softmax(s64 * F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).mT, dim=-1)
    ref = F.nll_loss(torch.log(attn @ F.one_hot(slabels, 3).to(attn)).flatten(0, 1), qlabels.flatten())
    (g_ref,) = torch.autograd.grad(ref, s64)
    assert_close64(g, g_ref)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck_registered_ops(backend):
    query, support, slabels, qlabels = make(2, 5, 6, 3, 4, torch.float64)
    query.requires_grad_()
    support.requires_grad_()
    m = matching_mod
    torch.library.opcheck(m._attn_fwd, (query, support, slabels, 3, 0.5, 1e-8, backend))
    torch.library.opcheck(m._loss_fwd, (query, support, slabels, qlabels, 3, 0.5, 1e-8, backend))
    q, s = query.detach(), support.detach()
    logp, lse = m._attn_fwd(q, s, slabels, 3, 0.5, 1e-8, backend)
    g3 = torch.randn(2, 5, 3, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(m._attn_bwd, (g3, q, s, slabels, logp, lse, 3, 0.5, 1e-8, backend))
    loss, lse, _ = m._loss_fwd(q, s, slabels, qlabels, 3, 0.5, 1e-8, backend)
    g = torch.rand(2, 5, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(m._loss_bwd, (g, q, s, slabels, qlabels, loss, lse, 3, 0.5, 1e-8, backend))


# aot_eager traces the custom ops' fake and autograd registrations; inductor (torch.compile's
# default) also generates and compiles code around them, as a user's torch.compile does
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton" or not ON_CPU])
def test_torch_compile_fullgraph(backend, compiler):
    query, support, slabels, qlabels = make(2, 6, 6, 3, 8, torch.float32)
    q = query.requires_grad_()

    @torch.compile(fullgraph=True, backend=compiler)
    def step(q, s, sy, y):
        loss, acc = matching_loss(q * 2.0, s, sy, 3, y, 5.0, backend=backend)
        logp = matching_attention(q, s, sy, 3, 5.0, backend=backend)
        return loss + logp.mean(), acc

    loss, acc = step(q, support, slabels, qlabels)
    loss.backward()
    ref_q = query.detach().clone().requires_grad_()
    ref, ref_acc = matching_loss_ref(ref_q * 2.0, support, slabels, 3, qlabels, 5.0)
    ref = ref + matching_attention_ref(ref_q, support, slabels, 3, 5.0).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(q.grad, ref_q.grad)
    torch.testing.assert_close(acc, ref_acc)


def test_auto_backend_on_cpu_is_cpp_when_built():
    from helpers import unavailable_reason

    from fastmeta.ops import registry

    if not ON_CPU or unavailable_reason("cpp"):
        pytest.skip("cpp backend not available")
    x = torch.zeros(1, 1, 1)
    assert registry.select("matching_attention", [x, x]) == "cpp"
    assert registry.select("matching_loss", [x, x]) == "cpp"


# ---- bad inputs ------------------------------------------------------------------------


def _good():
    q, s, sy, y = make(2, 4, 6, 3, 5, torch.float32)
    return dict(query=q, support=s, support_labels=sy, n_way=3, query_labels=y)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(support_labels=a["support_labels"] * 0 - 1), ValueError, "support_labels.*-1"),
        (lambda a: a.update(support_labels=a["support_labels"] + 1), ValueError, r"support_labels must lie in \[0, 2\]"),
        (lambda a: a.update(support_labels=a["support_labels"] % 2), ValueError, "class 2 of episode 0 has no support"),
        (lambda a: a.update(support_labels=a["support_labels"].float()), TypeError, "support_labels must be an integer"),
        (lambda a: a.update(support_labels=a["support_labels"][:, :4]), ValueError, "support_labels must have shape"),
        (lambda a: a.update(query_labels=a["query_labels"] * 0 + 3), ValueError, r"query_labels must lie in \[0, 2\]"),
        (lambda a: a.update(query_labels=a["query_labels"][:, :2]), ValueError, "query_labels must have shape"),
        (lambda a: a.update(support=a["support"][:1], support_labels=a["support_labels"][:1]), ValueError,
         "episode count B.*query_B=2, support_B=1"),
        (lambda a: a.update(support=a["support"][..., :4]), ValueError, "feature size D.*query_D=5, support_D=4"),
        (lambda a: a.update(support=a["support"][:, :0], support_labels=a["support_labels"][:, :0]), ValueError,
         "empty input: S is 0"),
        (lambda a: a.update(query=a["query"].double()), TypeError, "support has dtype"),
        (lambda a: a.update(query=a["query"].long()), TypeError, "query must be a floating tensor"),
        (lambda a: a.update(query=a["query"][0]), ValueError, r"query must have shape \[B, Q, D\]"),
        (lambda a: a.update(support=a["support"].to("meta")), ValueError, "support is on meta"),
        (lambda a: a.update(support_labels=a["support_labels"].to("meta")), ValueError, "support_labels is on meta"),
        (lambda a: a.update(query=[[1.0]]), TypeError, "query must be a torch.Tensor"),
        (lambda a: a.update(n_way=0), ValueError, "n_way must be >= 1"),
        (lambda a: a.update(n_way=2.0), TypeError, "n_way must be a positive int"),
        (lambda a: a.update(reduction="avg"), ValueError, "reduction must be"),
        (lambda a: a.update(scale=float("inf")), ValueError, "scale must be finite"),
        (lambda a: a.update(backend="cuda-magic"), ValueError, "not a backend of matching_loss"),
    ],
)
def test_bad_inputs_raise_clearly(change, exc, match):
    args = _good()
    change(args)
    with pytest.raises(exc, match=match):
        matching_loss(**args)


def test_bad_inputs_attention():
    q, s, sy, _ = make(2, 4, 6, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="support_labels must lie in"):
        matching_attention(q, s, sy + 5, 3)
    with pytest.raises(ValueError, match="n_way must be >= 1"):
        matching_attention(q, s, sy, 0)
    with pytest.raises(ValueError, match="not a backend of matching_attention"):
        matching_attention(q, s, sy, 3, backend="nope")


def test_forced_backend_that_cannot_run_lists_reasons():
    q, s, sy, y = make(1, 2, 2, 2, 2, torch.float16, device="cpu")
    with pytest.raises(BackendError, match="backend 'cpp' cannot run this call: dtype float16 not supported"):
        matching_loss(q, s, sy, 2, y, backend="cpp")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float32_error_at_episode_size_is_pytorchs(backend):
    # A realistic episode (5-way 5-shot, D=512, scale 10; smaller for the Triton interpreter)
    # with a tiny atol: the fused op's float32 error must stay within 2x that of the plain
    # PyTorch pattern (no rounding of |lse| in the results or the gradients).
    b, q, s, n, d = (2, 16, 17, 5, 48) if (backend == "triton" and ON_CPU) else (4, 30, 25, 5, 512)
    query, support, slabels, qlabels = make(b, q, s, n, d, torch.float32)
    weights = torch.rand(b, q, device=DEVICE, dtype=torch.float64)
    kw = dict(scale=10.0)
    fast = loss_and_grads(matching_loss, query, support, slabels, n, qlabels, weights, backend=backend, **kw)
    oracle = loss_and_grads(matching_loss_ref, query.double(), support.double(), slabels, n, qlabels, weights, **kw)
    same = loss_and_grads(matching_loss_ref, query, support, slabels, n, qlabels, weights, **kw)
    for i, what in [(0, "loss"), (2, "grad query"), (3, "grad support")]:
        assert_close_measured(fast[i], same[i], oracle[i], atol=1e-8, name=what)
    wa = torch.randn(b, q, n, device=DEVICE, dtype=torch.float64)
    fast = attn_and_grads(matching_attention, query, support, slabels, n, wa, backend=backend, **kw)
    oracle = attn_and_grads(matching_attention_ref, query.double(), support.double(), slabels, n, wa, **kw)
    same = attn_and_grads(matching_attention_ref, query, support, slabels, n, wa, **kw)
    for i, what in [(0, "log-probs"), (1, "grad query"), (2, "grad support")]:
        assert_close_measured(fast[i], same[i], oracle[i], atol=1e-8, name=what)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [30.0, 60.0, 500.0])
def test_large_scales_match_oracle(backend, dtype, scale):
    # the C++ kernel shifts by the row maximum while exp() cannot leave the normal range
    # (|scale| <= 40 in float32, 350 in float64) and by per-class maxima beyond: both paths
    shape = (2, 16, 17, 5, 8)
    b, q, s, n, d = shape
    query, support, slabels, _ = make(*shape, dtype)
    weights = torch.randn(b, q, n, device=DEVICE, dtype=torch.float64)
    fast = attn_and_grads(matching_attention, query, support, slabels, n, weights, backend=backend, scale=scale)
    oracle = attn_and_grads(matching_attention_ref, query.double(), support.double(), slabels, n, weights, scale=scale)
    same = attn_and_grads(matching_attention_ref, query, support, slabels, n, weights, scale=scale)
    assert all(torch.isfinite(t).all() for t in fast[:3])
    assert_matches_oracle(fast, same, oracle, [(0, "log-probs"), (1, "grad query"), (2, "grad support")],
                          dtype, atol=1e-4 * scale, rtol64=1e-9, atol64=1e-9)


# ---- the one-call C++ entry point (automatic selection, eager, CPU) -------------------------

needs_fused = pytest.mark.skipif(
    not ON_CPU or _ext.entry("matching_loss_fused") is None,
    reason="the one-call entry point serves CPU tensors of a built fastmeta._C",
)


def _is_fused(loss):
    return loss.grad_fn is not None and "MatchingLoss" in loss.grad_fn.name()


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 75, 25, 5, 64), (1, 100, 100, 20, 64), (2, 5, 7, 3, 6)], ids=case_id)
def test_one_call_path_matches_float64_oracle(dtype, shape):
    query, support, slabels, qlabels = make(*shape, dtype)
    b, q, s, n, d = shape
    qq = query.detach().clone().requires_grad_()
    assert _is_fused(matching_loss(qq, support, slabels, n, qlabels, 10.0)[0])  # automatic selection
    weights = torch.rand(b, q, device=DEVICE, dtype=torch.float64)
    kw = dict(scale=10.0)
    fast = loss_and_grads(matching_loss, query, support, slabels, n, qlabels, weights, **kw)
    oracle = loss_and_grads(matching_loss_ref, query.double(), support.double(), slabels, n, qlabels, weights, **kw)
    same = loss_and_grads(matching_loss_ref, query, support, slabels, n, qlabels, weights, **kw)
    assert_matches_oracle(fast, same, oracle, [(0, "loss"), (2, "grad query"), (3, "grad support")],
                          dtype, atol=1e-5)
    torch.testing.assert_close(fast[1].double(), oracle[1], atol=0, rtol=0)
    for reduction in ("mean", "sum"):  # reduced loss and accuracy, and their gradients
        args = (slabels, n, qlabels, 10.0, reduction)
        fast = reduced_and_grads(matching_loss, query, support, *args)
        assert _is_fused(fast[0]) and not fast[1].requires_grad
        assert fast[0].shape == fast[1].shape == () and fast[1].dtype == dtype
        oracle = reduced_and_grads(matching_loss_ref, query.double(), support.double(), *args)
        same = reduced_and_grads(matching_loss_ref, query, support, *args)
        assert_matches_oracle(fast, same, oracle, [(0, reduction), (2, "grad query"), (3, "grad support")],
                              dtype, atol=1e-5)
        torch.testing.assert_close(fast[1], oracle[1].to(dtype), atol=0, rtol=0)


def reduced_and_grads(fn, query, support, *args):
    q = query.detach().clone().requires_grad_()
    s = support.detach().clone().requires_grad_()
    loss, acc = fn(q, s, *args)
    return (loss, acc, *torch.autograd.grad(loss, (q, s)))


@needs_fused
def test_one_call_path_twice_differentiable():
    query, support, slabels, qlabels = make(1, 3, 5, 2, 4, torch.float64)
    q, s = query.requires_grad_(), support.requires_grad_()
    assert _is_fused(matching_loss(q, s, slabels, 2, qlabels)[0])
    for reduction in ("mean", "none"):
        torch.autograd.gradgradcheck(
            lambda a, b: matching_loss(a, b, slabels, 2, qlabels, 2.0, reduction)[0], (q, s))


@needs_fused
@pytest.mark.parametrize("where,bad,match", [
    ("support", 0, "class 2 of episode 0 has no support example"),
    ("support", 5, r"support_labels must lie in \[0, 4\].*found label 5"),
    ("query", -100, "query_labels.*found label -100"),
])
def test_one_call_path_bad_labels_raise_clearly(where, bad, match):
    query, support, slabels, qlabels = make(1, 25, 25, 5, 64, torch.float32)
    if where == "support":
        slabels[slabels == 2] = bad  # class 2 gone (0) or renamed out of range (5)
    else:
        qlabels[0, 0] = bad
    with pytest.raises(ValueError, match=match):
        matching_loss(query, support, slabels, 5, qlabels)
