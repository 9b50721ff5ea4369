"""The fused C++ double backward of training-mode batch norm (csrc/cpu/task_bn.cpp,
``fastmeta._C.bn_train_double_backward``) against the composite ATen formulation
(``bn_train_double_backward_reference``) and against PyTorch's own double backward, in float64:
every layout it takes (NC, NCL, NCHW, channels_last, NCDHW), with and without affine weight,
each upstream gradient present or absent, each output wanted or not."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastmeta import _ext
from fastmeta.nn import task_autograd as TA

D = torch.float64

pytestmark = pytest.mark.skipif(
    _ext.load() is None or not hasattr(_ext.load(), "bn_train_double_backward"),
    reason="fastmeta._C (with bn_train_double_backward) not built")



@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    """The kernel is opt-in (FASTMETA_BN_KERNEL=1, see task_autograd._kernel_entry)."""
    monkeypatch.setenv("FASTMETA_BN_KERNEL", "1")
    monkeypatch.setattr(TA, "_BN_KERNEL", {})


SHAPES = {"NC": (7, 3), "NCL": (4, 3, 5), "NCHW": (3, 3, 4, 5), "NHWC": (3, 3, 4, 5),
          "NCDHW": (2, 3, 2, 3, 2)}


def _inputs(name, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[name]
    fmt = torch.channels_last if name == "NHWC" else torch.contiguous_format

    def t(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g, dtype=D) + 0.3).to(dtype)

    x = t(*shape, scale=2.0).contiguous(memory_format=fmt)
    gout = t(*shape).contiguous(memory_format=fmt)
    ggx = t(*shape).contiguous(memory_format=fmt)
    C = shape[1]
    dims = [0, *range(2, len(shape))]
    mean = x.mean(dims)
    invstd = 1.0 / (x.var(dims, unbiased=False) + 1e-5).sqrt()
    return x, gout, ggx, mean, invstd, t(C), t(C), t(C)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_kernel_equals_composite(name, affine):
    x, g, ggx, mean, r, w, ggw, ggb = _inputs(name)
    kernel = TA._bn_kernel(g, x, ggx)
    assert kernel is not None
    w = w if affine else None
    for q, gw_, gb_, need in itertools.product(
            (ggx, None), (ggw, None), (ggb, None), [(True, True, True), (True, False, False),
                                                    (False, True, False), (False, False, True)]):
        if not affine and (gw_ is not None or gb_ is not None):
            continue
        got = kernel(g, x, q, mean, r, w, gw_, gb_, *need[:2], need[2] and w is not None)
        ref = TA.bn_train_double_backward_reference(g, x, w, mean, r, q, gw_, gb_, need)[:3]
        for a, b, what in zip(got, ref, ("dg", "dx", "dw")):
            assert (a is None) == (b is None), (what, q is None, gw_ is None, gb_ is None, need)
            if a is None:
                continue
            assert a.shape == b.shape, what
            if what != "dw":
                assert a.stride() == x.stride(), what  # x's layout
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=what)


@pytest.mark.parametrize("name", ["NCHW", "NHWC"])
def test_kernel_float32(name):
    x, g, ggx, mean, r, w, ggw, ggb = _inputs(name)
    got = TA._bn_kernel(g.float(), x.float(), ggx.float())(
        g.float(), x.float(), ggx.float(), mean.float(), r.float(), w.float(), ggw.float(),
        ggb.float(), True, True, True)
    ref = TA.bn_train_double_backward_reference(g, x, w, mean, r, ggx, ggw, ggb,
                                                (True, True, True))
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["NC", "NCHW", "NHWC"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "composite"])
def test_batch_norm_train_through_kernel_matches_pytorch(name, affine, kernel, monkeypatch):
    """batch_norm_train (forward, backward, double backward through the kernel, or through the
    composite formulation as without the extension) vs F.batch_norm's own double backward;
    gradgradcheck; the kernel was really called (or not)."""
    calls = []
    if not kernel:
        monkeypatch.setattr(TA, "_BN_KERNEL", {"bn_train_double_backward": None})
    real = TA._bn_kernel

    def spy(*a):
        fn = real(*a)
        calls.append(fn is not None)
        return fn

    monkeypatch.setattr(TA, "_bn_kernel", spy)
    x = _inputs(name)[0].detach().requires_grad_()
    C = x.shape[1]
    w = (torch.rand(C, dtype=D) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=D).requires_grad_() if affine else None
    wt = torch.randn(x.shape, dtype=D)

    def second(fn):
        out = fn(x, w, b)
        loss = (out * wt).sum() + (out.tanh() ** 2).sum()
        ins = [t for t in (x, w, b) if t is not None]
        first = torch.autograd.grad(loss, ins, create_graph=True)
        s = sum((f * torch.cos(3 * i)).sum() for f, i in zip(first, ins))
        return [f.detach() for f in first] + list(torch.autograd.grad(s, ins))

    got = second(lambda xx, ww, bb: TA.batch_norm_train(xx, ww, bb, 1e-5))
    ref = second(lambda xx, ww, bb: F.batch_norm(xx, None, None, ww, bb, True, 0.0, 1e-5))
    for a, r_ in zip(got, ref):
        torch.testing.assert_close(a, r_, rtol=1e-10, atol=1e-12)
    assert calls and all(c == kernel for c in calls)
    ins = tuple(t for t in (x, w, b) if t is not None)

    def flat(*ts):
        xx, rest = ts[0], ts[1:]
        w_, b_ = (rest[0], rest[1]) if affine else (None, None)
        return TA.batch_norm_train(xx, w_, b_, 1e-5)

    assert torch.autograd.gradgradcheck(flat, ins, fast_mode=True)


def test_kernel_refuses_mixed_layouts_and_env_opt_out(monkeypatch):
    x, g, ggx, *_ = _inputs("NHWC")
    assert TA._bn_kernel(g.contiguous(), x, ggx) is None  # g NCHW, x channels_last
    assert TA._bn_kernel(g, x, ggx.float()) is None
    assert TA._bn_kernel(g[:, :, ::2], x[:, :, ::2], None) is None  # not dense
    monkeypatch.setenv("FASTMETA_BN_KERNEL", "0")
    monkeypatch.setattr(TA, "_BN_KERNEL", {})
    assert TA._bn_kernel(g, x, ggx) is None

