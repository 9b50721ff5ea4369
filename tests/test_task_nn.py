"""Task-batched layers (fastmeta.nn.task): outputs, first and second derivatives equal a
per-task loop of torch.func.functional_call on the plain module, in float64; conversion
shares parameters; bad inputs raise clear errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastmeta.nn import (
    TaskBatchNorm1d,
    TaskBatchNorm2d,
    TaskConv2d,
    TaskConv4,
    TaskLinear,
    TaskMLP,
    TaskSequential,
    to_task_batched,
)
from fastmeta.nn.task import UnsupportedModuleError

D = torch.float64
T = 3


def loop_ref(module, params, x):
    """The oracle: one functional_call per task on the plain module."""
    if params is None:
        return torch.stack([module(x[t]) for t in range(x.shape[0])])
    return torch.stack([functional_call(module, {n: v[t] for n, v in params.items()}, (x[t],))
                        for t in range(x.shape[0])])


def task_params(module, T=T, scale=0.3):
    g = torch.Generator().manual_seed(1)
    return {n: p.detach() + scale * torch.randn(T, *p.shape, generator=g, dtype=p.dtype)
            for n, p in module.named_parameters() if p.requires_grad}


def derivatives(f, params, x):
    """Output, first derivatives of a non-linear scalar of the output w.r.t. (params, x), and
    the second derivatives (an HVP-like contraction of the first ones, w.r.t. params and x)."""
    names = list(params)
    ps = [params[n].detach().clone().requires_grad_() for n in names]
    xx = x.detach().clone().requires_grad_()
    out = f(dict(zip(names, ps)), xx)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    loss = (out * w).sum() + 0.1 * (out ** 2).sum() + (out.tanh() * w).sum()
    first = torch.autograd.grad(loss, ps + [xx], create_graph=True)
    vs = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in first]
    s = sum((a * v).sum() for a, v in zip(first, vs))
    second = torch.autograd.grad(s, ps + [xx], allow_unused=True)
    second = [torch.zeros_like(t) if s2 is None else s2 for s2, t in zip(second, ps + [xx])]
    return [out.detach()] + [t.detach() for t in first] + second


def assert_same_derivatives(task_fn, ref_fn, params, x, rtol=1e-10, atol=1e-12):
    got = derivatives(task_fn, params, x)
    want = derivatives(ref_fn, params, x)
    labels = ["out"] + [f"d/d{n}" for n in params] + ["d/dx"] + [f"d2/d{n}" for n in params] + ["d2/dx"]
    for a, b, lab in zip(got, want, labels):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, lab=lab: f"{lab}: {m}")


def check_module(plain, x):
    """Convert ``plain`` and compare everything against the per-task loop."""
    task = to_task_batched(plain)
    params = task_params(plain)
    assert_same_derivatives(lambda p, xx: task(xx, p), lambda p, xx: loop_ref(plain, p, xx), params, x)
    # params=None: the module's own parameters for every task
    torch.testing.assert_close(task(x), loop_ref(plain, None, x), rtol=1e-10, atol=1e-12)
    return task


# ------------------------------------------------------------------ single layers

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("extra", [(), (2,)], ids=["TNin", "TNLin"])
def test_linear(bias, extra):
    plain = nn.Linear(4, 3, bias=bias).to(D)
    check_module(plain, torch.randn(T, 5, *extra, 4, dtype=D))


@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "groups": 2, "bias": False},
        {"kernel_size": (2, 3), "dilation": 2, "padding": "same"},
    ],
    ids=["k3p1", "s2g2nobias", "dilated_same"],
)
def test_conv2d(kw):
    plain = nn.Conv2d(4, 6, **kw).to(D)
    check_module(plain, torch.randn(T, 2, 4, 7, 7, dtype=D))


@pytest.mark.parametrize(
    "kw",
    [{"kernel_size": 3, "padding": 1}, {"kernel_size": 3, "stride": 2, "groups": 2, "bias": False},
     {"kernel_size": 2, "dilation": 2, "padding": "same"}],
    ids=["k3p1", "s2g2nobias", "dilated_same"],
)
def test_conv1d(kw):
    plain = nn.Conv1d(4, 6, **kw).to(D)
    check_module(plain, torch.randn(T, 2, 4, 9, dtype=D))


def test_conv1d_stack_with_batchnorm_and_a_custom_forward():
    """Conv1d -> BatchNorm1d -> ReLU -> Conv1d in NT layout end to end, and on the traced path."""
    plain = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU(),
                          nn.Conv1d(4, 3, 3, stride=2), nn.Flatten()).to(D)
    check_module(plain, torch.randn(T, 5, 2, 8, dtype=D))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = plain

        def forward(self, x):
            return self.body(x.view(x.size(0), 2, -1)) * 0.5

    from fastmeta.func import task_function
    net = Net()
    fn = task_function(net)
    assert fn.path == "traced"
    x = torch.randn(T, 5, 16, dtype=D)
    assert_same_derivatives(fn, lambda p, xx: loop_ref(net, p, xx), task_params(net), x)


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 3)], ids=["NC", "NCL"])
def test_batchnorm1d_train(shape):
    plain = nn.BatchNorm1d(4).to(D)
    before = (plain.running_mean.clone(), plain.running_var.clone())
    task = to_task_batched(plain)
    x = torch.randn(T, *shape, dtype=D)
    params = task_params(plain)
    out = task(x, params)
    # task-batched calls never touch the running statistics
    assert torch.equal(plain.running_mean, before[0]) and torch.equal(plain.running_var, before[1])
    assert plain.num_batches_tracked.item() == 0
    assert_same_derivatives(lambda p, xx: task(xx, p), lambda p, xx: loop_ref(plain, p, xx), params, x)
    # per-task statistics: each task's normalised output has zero mean per channel
    w, b = params["weight"], params["bias"]
    if len(shape) == 2:
        z = (out.detach() - b[:, None]) / w[:, None]
        torch.testing.assert_close(z.mean(1), torch.zeros(T, 4, dtype=D), rtol=0, atol=1e-12)
    else:
        z = (out.detach() - b[:, None, :, None]) / w[:, None, :, None]
        torch.testing.assert_close(z.mean((1, 3)), torch.zeros(T, 4, dtype=D), rtol=0, atol=1e-12)


def test_batchnorm2d_train_and_eval():
    plain = nn.BatchNorm2d(3).to(D)
    x = torch.randn(T, 4, 3, 5, 5, dtype=D)
    task = check_module(plain, x)
    # eval: running statistics when tracked
    with torch.no_grad():
        plain.running_mean.copy_(torch.randn(3, dtype=D))
        plain.running_var.copy_(torch.rand(3, dtype=D) + 0.5)
    plain.eval()
    task.eval()
    params = task_params(plain)
    assert_same_derivatives(lambda p, xx: task(xx, p), lambda p, xx: loop_ref(plain, p, xx), params, x)
    # eval without running statistics: batch statistics
    nostats = nn.BatchNorm2d(3, track_running_stats=False, affine=False).to(D).eval()
    t2 = to_task_batched(nostats)
    torch.testing.assert_close(t2(x), loop_ref(nostats, None, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t2(x), F.batch_norm(x.transpose(0, 1).flatten(1, 2), None, None, training=True)
                               .unflatten(1, (T, 3)).transpose(0, 1), rtol=1e-10, atol=1e-12)


def test_frozen_param_uses_own_value():
    plain = nn.Linear(4, 3).to(D)
    plain.bias.requires_grad_(False)
    task = to_task_batched(plain)
    params = task_params(plain)
    assert list(params) == ["weight"]
    x = torch.randn(T, 5, 4, dtype=D)
    torch.testing.assert_close(task(x, params), loop_ref(plain, params, x), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ stacks

def test_sequential_stateless_layers():
    plain = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3), nn.ELU(),
        nn.MaxPool2d(2, ceil_mode=True), nn.Dropout(0.0), nn.Flatten(), nn.GELU(), nn.Linear(4, 6), nn.Sigmoid(),
        nn.Sequential(nn.BatchNorm1d(6), nn.Identity(), nn.Linear(6, 2)),
    ).to(D)
    task = check_module(plain, torch.randn(T, 4, 2, 8, 8, dtype=D))
    assert isinstance(task, TaskSequential) and isinstance(task[11], TaskSequential)


def test_flatten_partial_and_pool_after_linear_layout():
    # Flatten(2) keeps channels separate; pools on the [T, N, ...] layout
    plain = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(2), nn.Linear(9, 2)).to(D)
    check_module(plain, torch.randn(T, 2, 3, 6, 6, dtype=D))


def test_task_mlp_matches_sequential():
    tm = TaskMLP([2, 7, 5, 3], activation="tanh").to(D)
    plain = nn.Sequential(nn.Linear(2, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    plain.load_state_dict(tm.state_dict())
    assert [n for n, _ in tm.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randn(T, 6, 2, dtype=D)
    params = task_params(tm)
    assert_same_derivatives(lambda p, xx: tm(xx, p), lambda p, xx: loop_ref(plain, p, xx), params, x)


def plain_conv4(in_channels, n_way, hidden, image_size):
    blocks = [nn.Sequential(nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
                            nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2))
              for i in range(4)]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(hidden * (image_size // 16) ** 2, n_way))


def test_task_conv4_matches_plain():
    tc = TaskConv4(in_channels=2, n_way=4, hidden=3, image_size=16).to(D)
    plain = plain_conv4(2, 4, 3, 16).to(D)
    plain.load_state_dict(tc.state_dict())
    assert [n for n, _ in tc.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randn(T, 3, 2, 16, 16, dtype=D)
    params = task_params(tc)
    assert_same_derivatives(lambda p, xx: tc(xx, p), lambda p, xx: loop_ref(plain, p, xx), params, x)
    assert tc(x).shape == (T, 3, 4)
    # eval mode: still batch statistics (no running stats tracked)
    tc.eval(), plain.eval()
    torch.testing.assert_close(tc(x, params), loop_ref(plain, params, x), rtol=1e-10, atol=1e-12)


def test_backbone_conv4_subclass_converts():
    from fastmeta.nn import Conv4

    net = Conv4(1, hidden=4).to(D)  # nn.Sequential subclass with ReLU(inplace=True)
    x = torch.randn(2, 3, 1, 28, 28, dtype=D)
    task = to_task_batched(net)
    params = task_params(net, T=2)
    torch.testing.assert_close(task(x, params), loop_ref(net, params, x), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ conversion

def test_conversion_shares_parameters_and_names():
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Sequential(nn.Linear(8, 3))).to(D)
    plain[1].eval()
    task = to_task_batched(plain)
    a, b = dict(plain.named_parameters()), dict(task.named_parameters())
    assert list(a) == list(b)
    assert all(a[n] is b[n] for n in a)
    assert task[1].running_mean is plain[1].running_mean
    assert task.training and not task[1].training
    assert isinstance(task[0], TaskConv2d) and isinstance(task[1], TaskBatchNorm2d)
    assert to_task_batched(task) is task


@pytest.mark.parametrize(
    "module, match",
    [
        (nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2)), r"1: LSTM"),
        (nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.MaxPool2d(2, return_indices=True), "return_indices"),
        (nn.Flatten(0), "start_dim=0"),
    ],
    ids=["lstm", "reflect", "indices", "flatten0"],
)
def test_unsupported_modules(module, match):
    with pytest.raises(UnsupportedModuleError, match=match):
        to_task_batched(module)


def test_tied_weights_unsupported():
    lin = nn.Linear(2, 2)
    with pytest.raises(UnsupportedModuleError, match="tied"):
        to_task_batched(nn.Sequential(lin, nn.ReLU(), lin))


def test_overridden_forward_unsupported():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(UnsupportedModuleError, match="overrides"):
        to_task_batched(MyLinear(2, 2))


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs():
    net = TaskMLP([2, 3, 1]).to(D)
    x = torch.randn(T, 4, 2, dtype=D)
    params = task_params(net)
    with pytest.raises(ValueError, match=r"params\['0.weight'\] has shape \(2, 3, 2\), expected .*\(3, 3, 2\)"):
        net(x, {**params, "0.weight": params["0.weight"][:2]})
    with pytest.raises(ValueError, match=r"params\['2.bias'\] has shape \(3, 2\), expected"):
        net(x, {**params, "2.bias": torch.zeros(T, 2, dtype=D)})
    with pytest.raises(ValueError, match="missing '2.weight'"):
        net(x, {k: v for k, v in params.items() if k != "2.weight"})
    with pytest.raises(ValueError, match="unexpected key.*'0.scale'"):
        net(x, {**params, "0.scale": torch.zeros(T)})
    with pytest.raises(ValueError, match="unexpected key '7.weight'"):
        net(x, {**params, "7.weight": torch.zeros(T)})
    with pytest.raises(ValueError, match=r"\[T, N, \*, 2\], got \(3, 4, 5\)"):
        net(torch.randn(T, 4, 5, dtype=D), params)
    with pytest.raises(ValueError, match="at least 2 dims"):
        net(torch.randn(4, dtype=D))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        net([1.0], params)
    with pytest.raises(TypeError, match="params must be a dict"):
        net(x, [params["0.weight"]])
    conv = TaskConv2d(3, 2, 3)
    with pytest.raises(ValueError, match=r"\[T, N, 3, H, W\], got \(2, 1, 2, 5, 5\)"):
        conv(torch.randn(2, 1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"\[T, N, 4, H, W\]"):
        TaskBatchNorm2d(4)(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\[T, N, 4\] or \[T, N, 4, L\]"):
        TaskBatchNorm1d(4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="activation"):
        TaskMLP([2, 2], activation="softplus")


def test_constructed_layers_match_plain():
    lin = TaskLinear(3, 2).to(D)
    conv = TaskConv2d(2, 3, 3, padding=1).to(D)
    bn = TaskBatchNorm1d(3).to(D)
    x = torch.randn(T, 4, 3, dtype=D)
    ref = nn.Linear(3, 2).to(D)
    ref.load_state_dict(lin.state_dict())
    torch.testing.assert_close(lin(x), loop_ref(ref, None, x))
    xc = torch.randn(T, 2, 2, 5, 5, dtype=D)
    refc = nn.Conv2d(2, 3, 3, padding=1).to(D)
    refc.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(xc), loop_ref(refc, None, xc))
    assert set(dict(bn.named_buffers())) == {"running_mean", "running_var", "num_batches_tracked"}


def test_task_modules_pickle_and_deepcopy():
    import copy
    import io

    net = TaskConv4(1, 3, 2, 16).to(D)
    x = torch.randn(2, 3, 1, 16, 16, dtype=D)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(net)):
        torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2), (3, 3, 2, 2)], ids=["NC", "NCL", "NCHW"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batchnorm_custom_double_backward_gradgradcheck(shape, affine):
    """The closed-form double backward of training-mode BatchNorm (used by every task BN)."""
    from fastmeta.nn.task_autograd import batch_norm_train as _batch_norm_train

    x = torch.randn(*shape, dtype=D)
    params = {"w": torch.randn(3, dtype=D), "b": torch.randn(3, dtype=D)} if affine else {}

    def ours(p, xx):
        return _batch_norm_train(xx, p.get("w"), p.get("b"), 1e-5)

    def torchs(p, xx):
        return F.batch_norm(xx, None, None, p.get("w"), p.get("b"), True, 0.0, 1e-5)

    names = list(params)
    inputs = (x.requires_grad_(), *[params[n].requires_grad_() for n in names])

    def flat(xx, *ps):
        return ours(dict(zip(names, ps)), xx)

    assert torch.autograd.gradcheck(flat, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(flat, inputs, fast_mode=True)
    # and equal to PyTorch's own double backward
    assert_same_derivatives(ours, torchs, {n: v.detach() for n, v in params.items()}, x.detach())


def test_task_conv4_28px_channels_last_and_pool_ties():
    """28x28 Conv4: channels_last blocks (28, 14), NCHW blocks (7, 3), floor pooling 7 -> 3,
    and images with a constant (zero) border, so that the 2x2 max-pools see exact ties: the
    task-batched pool must pick the same element as the per-task max_pool2d (first in the
    window), for outputs, first and second derivatives."""
    tc = TaskConv4(in_channels=1, n_way=3, hidden=2, image_size=28).to(D)
    plain = plain_conv4(1, 3, 2, 28).to(D)
    plain.load_state_dict(tc.state_dict())
    x = torch.zeros(2, 3, 1, 28, 28, dtype=D)
    x[..., 6:20, 9:23] = torch.randn(2, 3, 1, 14, 14, dtype=D)
    params = task_params(tc, T=2)
    assert_same_derivatives(lambda p, xx: tc(xx, p), lambda p, xx: loop_ref(plain, p, xx), params, x)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "kw", [{"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
           {"kernel_size": 2, "dilation": 2}], ids=["k2", "k3s2p1ceil", "dilated"])
def test_max_pool_autograd_function_matches_max_pool2d(fmt, kw):
    """_MaxPool2d (no zeros tensor for the pool-backward's derivative w.r.t. its input) equals
    F.max_pool2d in value, first and second derivatives, ties (a constant region) and odd
    sizes included; gradgradcheck."""
    from fastmeta.nn.task_autograd import MaxPool2dFunction as _MaxPool2d

    x = torch.randn(2, 3, 7, 9, dtype=D)
    x[:, :, :4, :4] = 0.5  # ties
    x = x.contiguous(memory_format=getattr(torch, "contiguous_format" if fmt == "contiguous" else fmt))
    args = (kw["kernel_size"], kw.get("stride", kw["kernel_size"]), kw.get("padding", 0), kw.get("dilation", 1),
            kw.get("ceil_mode", False))

    def ours(p, xx):
        return _MaxPool2d.apply(xx * p["s"], *args)

    def ref(p, xx):
        return F.max_pool2d(xx * p["s"], *args)

    assert_same_derivatives(ours, ref, {"s": torch.tensor([1.5], dtype=D)}, x)
    # finite differences need distinct values (a tie is a kink of the max)
    xx = torch.empty_like(x).copy_(torch.randn(x.shape, dtype=D)).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: _MaxPool2d.apply(t, *args), (xx,), fast_mode=True)


def test_batchnorm_channels_last_input_nchw_gradient():
    """channels_last x with an NCHW gradient (what a sum of branches of mixed formats gives):
    same derivatives as F.batch_norm."""
    from fastmeta.nn.task_autograd import batch_norm_train as _batch_norm_train

    x = torch.randn(3, 4, 5, 5, dtype=D).contiguous(memory_format=torch.channels_last)
    params = {"w": torch.randn(4, dtype=D), "b": torch.randn(4, dtype=D)}
    assert_same_derivatives(lambda p, xx: _batch_norm_train(xx, p["w"], p["b"], 1e-5).contiguous(),
                            lambda p, xx: F.batch_norm(xx, None, None, p["w"], p["b"], True, 0.0, 1e-5),
                            params, x)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "noxgrad"])
def test_grouped_conv_double_backward(bias, x_grad):
    """_GroupedConv (grouped weight term of the double backward in one call): gradgradcheck,
    and equal to F.conv2d's own double backward."""
    from fastmeta.nn.task_autograd import GroupedConvFunction as _GroupedConv

    cfg = ([2, 1], [1, 0], [1, 2], 2)
    x = torch.randn(2, 4, 6, 7, dtype=D).contiguous(memory_format=torch.channels_last)
    p = {"w": torch.randn(6, 2, 3, 2, dtype=D)}
    if bias:
        p["b"] = torch.randn(6, dtype=D)

    def ours(pp, xx):
        out = _GroupedConv.apply(xx if x_grad else xx.detach(), pp["w"], pp.get("b"), cfg)
        return out if x_grad else out + 0 * xx.sum()  # x unused by the conv: zero derivatives

    def ref(pp, xx):
        out = F.conv2d(xx if x_grad else xx.detach(), pp["w"], pp.get("b"), *cfg)
        return out if x_grad else out + 0 * xx.sum()

    assert_same_derivatives(ours, ref, p, x)
    ins = (x.clone().requires_grad_(x_grad), *[v.clone().requires_grad_() for v in p.values()])
    assert torch.autograd.gradgradcheck(lambda xx, w, b=None: _GroupedConv.apply(xx, w, b, cfg), ins, fast_mode=True)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_task_linear_function_derivatives_and_grad_layout(bias):
    """TaskLinear's autograd Function: first, second and forward-mode derivatives in float64,
    and the weight gradient contiguous in the weight's [T, out, in] layout (autograd's bmm
    formula gave a transposed view, which made the sum over tasks ~40x slower)."""
    from fastmeta.nn.task_autograd import TaskLinearFunction as _TaskLinearFn

    x = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    w = torch.randn(3, 6, 5, dtype=D, requires_grad=True)
    b = torch.randn(3, 6, dtype=D, requires_grad=True) if bias else None
    inputs = (x, w, b)
    assert torch.autograd.gradcheck(_TaskLinearFn.apply, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(_TaskLinearFn.apply, inputs)
    out = _TaskLinearFn.apply(*inputs)
    ref = torch.einsum("tni,toi->tno", x, w) + (b.unsqueeze(1) if bias else 0)
    torch.testing.assert_close(out, ref)
    gw = torch.autograd.grad(out.square().sum(), w)[0]
    assert gw.is_contiguous()
