"""prototypes: every backend against a float64 oracle, autograd, opcheck, compile, bad inputs."""

import pytest
import torch
from helpers import ALL_BACKENDS, DEVICE, FAST_BACKENDS, ON_CPU, assert_close64, assert_matches_oracle, case_id

from fastmeta import _ext
import fastmeta.ops._prototypes as prototypes_mod
from fastmeta.ops import prototypes, prototypes_ref


# (B, S, N, D) with block-boundary sizes
SMALL = [(1, 1, 1, 1), (2, 7, 3, 5), (1, 33, 16, 17), (2, 17, 17, 33)]
LARGER = [(4, 100, 20, 64), (2, 25, 5, 1600)]


def make(b, s, n, d, dtype=torch.float64, device=DEVICE):
    support = torch.randn(b, s, d, dtype=torch.float64).to(device, dtype)
    # every class at least once, the rest random, shuffled
    base = torch.cat([torch.arange(n), torch.randint(0, n, (s - n,))]) if s >= n else None
    labels = torch.stack([base[torch.randperm(s)] for _ in range(b)]).to(device)
    return support, labels


def run(fn, support, labels, n, weights, **kw):
    x = support.detach().clone().requires_grad_()
    out = fn(x, labels, n, **kw)
    (g,) = torch.autograd.grad((out * weights.to(out.dtype)).sum(), x)
    return out.detach(), g


def _cases():
    return [
        (bk, dtype, shape)
        for bk in ALL_BACKENDS
        for dtype in (torch.float32, torch.float64)
        for shape in (SMALL if (bk == "triton" and ON_CPU) else SMALL + LARGER)
    ]


@pytest.mark.parametrize("backend,dtype,shape", _cases(), ids=case_id)
def test_matches_float64_oracle(backend, dtype, shape):
    b, s, n, d = shape
    support, labels = make(b, s, n, d, dtype)
    weights = torch.randn(b, n, d, dtype=torch.float64, device=DEVICE)
    fast = run(prototypes, support, labels, n, weights, backend=backend)
    oracle = run(prototypes_ref, support.double(), labels, n, weights)
    same = run(prototypes_ref, support, labels, n, weights)
    assert_matches_oracle(fast, same, oracle, [(0, "protos"), (1, "grad support")], dtype, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous(backend):
    support = torch.randn(6, 2, 8, dtype=torch.float64, device=DEVICE).transpose(0, 1)[..., ::2]
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 0, 0, 1]], device=DEVICE).t().contiguous().t()
    assert not support.is_contiguous() and not labels.is_contiguous()
    weights = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE)
    fast = run(prototypes, support, labels, 3, weights, backend=backend)
    oracle = run(prototypes_ref, support.contiguous(), labels.contiguous(), 3, weights)
    assert_close64(fast[0], oracle[0])
    assert_close64(fast[1], oracle[1])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck_and_opcheck(backend):
    support, labels = make(2, 5, 3, 4)
    x = support.requires_grad_()
    torch.autograd.gradcheck(lambda t: prototypes(t, labels, 3, backend=backend), (x,))
    torch.library.opcheck(prototypes_mod._prototypes_fwd, (x, labels, 3, backend))
    counts = torch.ones(2, 3, dtype=torch.long, device=DEVICE) * 2
    g = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(prototypes_mod._prototypes_bwd, (g, labels, counts, backend))


def test_reference_gradgradcheck():
    support, labels = make(1, 4, 2, 3)
    torch.autograd.gradgradcheck(lambda t: prototypes(t, labels, 2, backend="reference"),
                                 (support.requires_grad_(),))


# aot_eager traces the custom ops' fake and autograd registrations; inductor (torch.compile's
# default) also generates and compiles code around them, as a user's torch.compile does
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton" or not ON_CPU])
def test_torch_compile_fullgraph(backend, compiler):
    support, labels = make(2, 10, 5, 8, torch.float32)
    x = support.requires_grad_()

    @torch.compile(fullgraph=True, backend=compiler)
    def f(t, y):
        return prototypes(t.relu(), y, 5, backend=backend).square().sum()

    out = f(x, labels)
    out.backward()
    x2 = support.detach().clone().requires_grad_()
    ref = prototypes_ref(x2.relu(), labels, 5).square().sum()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


def _args():
    support, labels = make(2, 6, 3, 4, torch.float32)
    return dict(support=support, support_labels=labels, n_way=3)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a["support_labels"].__setitem__((0, 0), -1), ValueError, r"support_labels must lie in \[0, 2\].*-1"),
        (lambda a: a["support_labels"].__setitem__((1, 2), 3), ValueError, r"support_labels must lie in \[0, 2\].*3"),
        (lambda a: a.update(support_labels=a["support_labels"] * 0), ValueError,
         "class 1 of episode 0 has no support example"),
        (lambda a: a.update(n_way=0), ValueError, "n_way must be >= 1"),
        (lambda a: a.update(n_way=3.0), TypeError, "n_way must be a positive int"),
        (lambda a: a.update(support_labels=a["support_labels"].float()), TypeError, "support_labels must be an integer"),
        (lambda a: a.update(support_labels=a["support_labels"][:1]), ValueError, "support_labels must have shape"),
        (lambda a: a.update(support=a["support"].int()), TypeError, "support must be a floating tensor"),
        (lambda a: a.update(support=a["support"][0]), ValueError, r"support must have shape \[B, S, D\]"),
        (lambda a: a.update(support=a["support"][:, :, :0]), ValueError, "empty input: D is 0"),
        (lambda a: a.update(support_labels=a["support_labels"].to("meta")), ValueError, "support_labels is on meta"),
    ],
)
def test_bad_inputs_raise_clearly(change, exc, match):
    args = _args()
    change(args)
    with pytest.raises(exc, match=match):
        prototypes(**args)


# ---- the one-call C++ entry point (automatic selection, eager, CPU) -------------------------

needs_fused = pytest.mark.skipif(
    not ON_CPU or _ext.entry("prototypes_fused") is None,
    reason="the one-call entry point serves CPU tensors of a built fastmeta._C",
)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 25, 5, 64), (1, 100, 20, 64), (3, 7, 3, 5)], ids=case_id)
def test_one_call_path_matches_float64_oracle(dtype, shape):
    b, s, n, d = shape
    support, labels = make(b, s, n, d, dtype)
    out = prototypes(support.clone().requires_grad_(), labels, n)
    assert out.grad_fn is not None and "Prototypes" in out.grad_fn.name()  # automatic selection
    weights = torch.randn(b, n, d, dtype=torch.float64, device=DEVICE)
    fast = run(prototypes, support, labels, n, weights)
    oracle = run(prototypes_ref, support.double(), labels, n, weights)
    same = run(prototypes_ref, support, labels, n, weights)
    assert_matches_oracle(fast, same, oracle, [(0, "protos"), (1, "grad support")], dtype, atol=1e-6)


@needs_fused
def test_one_call_path_twice_differentiable():
    support, labels = make(2, 7, 3, 4)
    x = support.requires_grad_()
    assert "Prototypes" in prototypes(x, labels, 3).grad_fn.name()
    torch.autograd.gradgradcheck(lambda a: prototypes(a, labels, 3) ** 2, (x,))


@needs_fused
@pytest.mark.parametrize("bad,match", [(0, "class 2 of episode 0 has no support example"),
                                       (3, r"support_labels must lie in \[0, 2\].*found label 3")])
def test_one_call_path_bad_labels_raise_clearly(bad, match):
    support, labels = make(1, 9, 3, 4)
    labels[labels == 2] = bad
    with pytest.raises(ValueError, match=match):
        prototypes(support, labels, 3)
