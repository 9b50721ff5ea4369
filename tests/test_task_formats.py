"""Memory formats through the task layers' custom derivatives: BatchNorm's backward and double
backward take gradients of either format against an input of either format, and the max-pool's
channels_last double backward (a gather over the [N, H*W, C] view) gives the NCHW one's values
in channels_last; all against PyTorch's own derivatives in float64."""

import pytest
import torch
import torch.nn.functional as F
from test_task_nn import assert_same_derivatives

from fastmeta.nn.task_autograd import MaxPool2dFunction as _MaxPool2d
from fastmeta.nn.task_autograd import batch_norm_train as _batch_norm_train
from fastmeta.nn.task_autograd import like_format as _like_format

D = torch.float64
CL = torch.channels_last


@pytest.mark.parametrize("x_fmt,out_fmt",
                         [(CL, torch.contiguous_format), (torch.contiguous_format, CL), (CL, CL)],
                         ids=["x_cl-g_nchw", "x_nchw-g_cl", "cl"])
def test_batchnorm_mixed_formats(x_fmt, out_fmt):
    x = torch.randn(3, 4, 5, 5, dtype=D).contiguous(memory_format=x_fmt)
    params = {"w": torch.randn(4, dtype=D), "b": torch.randn(4, dtype=D)}
    assert_same_derivatives(
        lambda p, xx: _batch_norm_train(xx, p["w"], p["b"], 1e-5).contiguous(memory_format=out_fmt),
        lambda p, xx: F.batch_norm(xx, None, None, p["w"], p["b"], True, 0.0, 1e-5), params, x)


def test_max_pool_channels_last_double_backward_keeps_format():
    x = torch.randn(2, 3, 8, 10, dtype=D).contiguous(memory_format=CL).requires_grad_()
    g = torch.randn(2, 3, 4, 5, dtype=D).requires_grad_()
    gx = torch.autograd.grad(_MaxPool2d.apply(x, 2, 2, 0, 1, False), x, g, create_graph=True)[0]
    gx_ref = torch.autograd.grad(F.max_pool2d(x, 2), x, g, create_graph=True)[0]
    gg = torch.randn_like(x)
    dg = torch.autograd.grad(gx, g, gg)[0]
    dg_ref = torch.autograd.grad(gx_ref, g, gg)[0]
    torch.testing.assert_close(dg, dg_ref, rtol=0, atol=0)
    assert dg.is_contiguous(memory_format=CL)


def test_like_format():
    a = torch.randn(2, 3, 4, 5)
    c = a.contiguous(memory_format=CL)
    assert _like_format(a, c).is_contiguous(memory_format=CL)
    assert _like_format(c, a).is_contiguous()
    assert _like_format(a, a) is a
    t = torch.randn(2, 3)
    assert _like_format(t, t) is t
