"""fastmeta.ops._loss.argmax_correct (the accuracy of proto_loss's composite path and
nll_accuracy): the C++ pass equals ``scores.max(-1).indices == labels`` bit for bit, with ties
(the first maximum wins), NaNs (the first NaN is the maximum), one class, long rows, non-contiguous
scores; other inputs take the ATen expression."""

import pytest
import torch

from fastmeta import _ext
from fastmeta.ops._loss import argmax_correct


def _want(x, y):
    return (x.max(-1).indices == y).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,C", [((32, 100), 20), ((1, 75), 5), ((7,), 3), ((50,), 1), ((4, 9), 130)])
def test_matches_aten_with_ties_and_nans(shape, C, dtype):
    g = torch.Generator().manual_seed(C)
    x = torch.randn(*shape, C, dtype=dtype, generator=g)
    if C > 2:  # ties: class 1 always equals class 0, class 2 sometimes
        x[..., 1] = x[..., 0]
        x[..., 2] = torch.where(torch.rand(shape, generator=g) < 0.3, x[..., 0], x[..., 2])
    if len(shape) > 1 and C > 3:
        x[0, 0, 3] = float("nan")
        x[0, 1, 0] = float("nan")
    y = torch.randint(0, C, shape, generator=g)
    y.view(-1)[:3] = torch.tensor([0, 1, 2]).clamp(max=C - 1)
    got = argmax_correct(x.requires_grad_(), y)
    assert got.dtype == dtype and not got.requires_grad
    assert torch.equal(got, _want(x.detach(), y))
    xt = x.detach().transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous
    assert torch.equal(argmax_correct(xt, y), _want(xt, y))


def test_other_inputs_take_the_aten_expression():
    x = torch.randn(3, 4, 5)
    for y in (torch.randint(0, 5, (3, 4), dtype=torch.int32), torch.randint(0, 5, (3, 4))):
        assert torch.equal(argmax_correct(x, y), _want(x, y))
    xh = x.to(torch.bfloat16)
    y = torch.randint(0, 5, (3, 4))
    assert torch.equal(argmax_correct(xh, y), _want(xh, y))


@pytest.mark.skipif(_ext.entry("argmax_correct") is None, reason="fastmeta._C not built")
def test_cpp_entry_rejects_bad_shapes():
    fn = _ext.entry("argmax_correct")
    with pytest.raises(RuntimeError, match="labels' shape"):
        fn(torch.randn(3, 4, 5), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="int64"):
        fn(torch.randn(3, 5), torch.zeros(3, dtype=torch.int32))
