"""fastmeta.func: TaskFunction paths (batched / vmap / loop) against a per-task
functional_call loop in float64 (outputs, first and second derivatives), MLPSpec detection,
expand, the per-module cache, and task_losses."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_task_nn import D, T, assert_same_derivatives, loop_ref, plain_conv4, task_params
from torch import nn

from fastmeta.func import MLPSpec, TaskFunction, task_function, task_losses
from fastmeta.nn import TaskConv4, TaskMLP

# ------------------------------------------------------------------ batched path + MLPSpec

def test_batched_sequential_mlp():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(D)
    fn = task_function(net)
    assert isinstance(fn, TaskFunction) and fn.module is net
    assert (fn.path, fn.reason) == ("batched", "")
    assert fn.names == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    assert fn.mlp == MLPSpec(("0.weight", "2.weight", "4.weight"), ("0.bias", "2.bias", "4.bias"), "relu")
    assert task_function(net) is fn
    params = task_params(net)
    x = torch.randn(T, 5, 3, dtype=D)
    assert_same_derivatives(fn, lambda p, xx: loop_ref(net, p, xx), params, x)


def test_batched_conv4_with_bn():
    net = plain_conv4(1, 3, 3, 16).to(D)
    fn = task_function(net)
    assert fn.path == "batched" and fn.mlp is None
    params = task_params(net)
    x = torch.randn(T, 3, 1, 16, 16, dtype=D)
    assert_same_derivatives(fn, lambda p, xx: loop_ref(net, p, xx), params, x)


@pytest.mark.parametrize(
    "make, spec",
    [
        (lambda: TaskMLP([1, 40, 40, 1], "tanh"),
         MLPSpec(("0.weight", "2.weight", "4.weight"), ("0.bias", "2.bias", "4.bias"), "tanh")),
        (lambda: TaskMLP([2, 3], bias=False), MLPSpec(("0.weight",), (None,), "identity")),
        (lambda: nn.Linear(2, 3), MLPSpec(("weight",), ("bias",), "identity")),
        (lambda: nn.Sequential(nn.Linear(2, 3, bias=False), nn.Sigmoid(), nn.Linear(3, 1)),
         MLPSpec(("0.weight", "2.weight"), (None, "2.bias"), "sigmoid")),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.Identity(), nn.Linear(3, 1)),
         MLPSpec(("0.weight", "2.weight"), ("0.bias", "2.bias"), "identity")),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)), None),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), None),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.ReLU()), None),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1)), None),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.Dropout(), nn.Linear(3, 1)), None),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 1))), None),
        (lambda: TaskConv4(1, 5, 4, 16), None),
    ],
    ids=["taskmlp", "single_nobias", "linear", "sigmoid", "identity", "mixed_acts", "no_act", "trailing_act",
         "gelu", "dropout", "nested", "conv4"],
)
def test_mlp_spec(make, spec):
    assert task_function(make()).mlp == spec


def test_mlp_spec_none_when_a_linear_param_is_frozen():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    net[2].bias.requires_grad_(False)
    fn = task_function(net)
    assert fn.mlp is None and fn.names == ("0.weight", "0.bias", "2.weight")


def test_expand_and_params():
    net = TaskMLP([2, 3, 1]).to(D)
    fn = task_function(net)
    own = fn.params()
    assert list(own) == list(fn.names) and all(own[n] is p for n, p in net.named_parameters())
    ex = fn.expand(4)
    assert {n: tuple(v.shape) for n, v in ex.items()} == {n: (4, *p.shape) for n, p in own.items()}
    out = fn(ex, torch.randn(4, 5, 2, dtype=D))
    out.sum().backward()
    # gradients of the expanded views sum over tasks into the module's own parameters
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="T must be a positive int"):
        fn.expand(0)
    sub = fn.expand(2, {"0.weight": own["0.weight"]})
    assert list(sub) == ["0.weight"]


def test_params_none_and_task_module_input():
    net = TaskMLP([2, 3, 1]).to(D)
    fn = task_function(net)
    assert fn.path == "batched"
    x = torch.randn(T, 4, 2, dtype=D)
    torch.testing.assert_close(fn(None, x), fn(fn.expand(T), x), rtol=1e-12, atol=1e-12)


def test_cache_follows_train_eval_and_requires_grad():
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(D)
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
    fn = task_function(net)
    x = torch.randn(T, 6, 2, dtype=D)
    params = task_params(net)
    train_out = fn(params, x)
    net.eval()
    eval_out = fn(params, x)
    torch.testing.assert_close(eval_out, loop_ref(net, params, x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(train_out, eval_out)
    net[0].weight.requires_grad_(False)
    fn(None, x)
    assert "0.weight" not in fn.names and task_function(net) is fn


def test_cache_replans_after_to_dtype():
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).eval()
    fn = task_function(net)
    x = torch.randn(T, 6, 2, dtype=D)
    fn(None, x.float())
    net.to(D)  # replaces the BatchNorm buffers: the converted layers must follow
    with torch.no_grad():
        net[1].running_mean.fill_(1.5)
    params = task_params(net)
    torch.testing.assert_close(fn(params, x), loop_ref(net, params, x), rtol=1e-10, atol=1e-12)


def test_cache_is_weak():
    import gc
    import weakref

    net = nn.Linear(2, 2)
    task_function(net)
    r = weakref.ref(net)
    del net
    gc.collect()
    assert r() is None


# ------------------------------------------------------------------ vmap / loop paths

class Residual(nn.Module):
    """Calls F.linear on its own parameters with a residual: not convertible, vmap-able."""

    def __init__(self, d):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(d))
        self.head = nn.Linear(d, 2)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        h = x + self.scale * torch.tanh(F.linear(x, self.w1, self.b1))
        return self.head(h)


def test_vmap_path_custom_module():
    net = Residual(4).to(D)
    fn = task_function(net)
    assert fn.path == "vmap" and "Residual" in fn.reason and fn.mlp is None
    assert fn.names == ("w1", "b1", "head.weight", "head.bias")
    params = task_params(net)
    x = torch.randn(T, 5, 4, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_derivatives(fn, lambda p, xx: loop_ref(net, p, xx), params, x)
    assert fn.path == "vmap"
    torch.testing.assert_close(fn(None, x), loop_ref(net, None, x), rtol=1e-10, atol=1e-12)


class DataDependent(nn.Module):
    """Calls .item() on the data: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        shift = x.abs().max().item()
        return self.lin(x) * shift


def test_loop_path_with_one_warning():
    net = DataDependent().to(D)
    fn = task_function(net)
    assert fn.path == "vmap"
    params = task_params(net)
    x = torch.randn(T, 4, 3, dtype=D)
    with pytest.warns(UserWarning, match=r"vmap failed on DataDependent .*item"):
        out = fn(params, x)
    assert fn.path == "loop" and "item" in fn.reason
    torch.testing.assert_close(out, loop_ref(net, params, x), rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert_same_derivatives(fn, lambda p, xx: loop_ref(net, p, xx), params, x)


def test_vmap_path_bad_inputs_do_not_switch_to_loop():
    net = Residual(4).to(D)
    fn = task_function(net)
    params = task_params(net)
    x = torch.randn(T, 5, 4, dtype=D)
    with pytest.raises(ValueError, match=r"params\['w1'\] has shape \(2, 4, 4\), expected .*\(3, 4, 4\)"):
        fn({**params, "w1": params["w1"][:2]}, x)
    with pytest.raises(ValueError, match="missing 'head.bias'"):
        fn({k: v for k, v in params.items() if k != "head.bias"}, x)
    with pytest.raises(ValueError, match="unexpected key 'nope'"):
        fn({**params, "nope": params["w1"]}, x)
    with pytest.raises(RuntimeError):
        fn(params, torch.randn(T, 5, 3, dtype=D))  # the module's own error (vmap and loop both fail)
    assert fn.path == "vmap"


def test_task_function_type_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        task_function(lambda x: x)
    fn = task_function(nn.Linear(2, 2))
    assert task_function(fn) is fn


# ------------------------------------------------------------------ task_losses

def _loop_losses(loss_fn, out, y):
    return torch.stack([loss_fn(out[t], y[t]) for t in range(out.shape[0])])


@pytest.mark.parametrize(
    "loss_fn, kind",
    [
        (F.cross_entropy, "cls"),
        (F.mse_loss, "reg"),
        (F.l1_loss, "reg"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "cls"),
        (nn.MSELoss(), "reg"),
        (functools.partial(F.cross_entropy, label_smoothing=0.2), "cls"),
        (nn.CrossEntropyLoss(weight=torch.rand(4, dtype=D)), "cls"),  # loop path (class weights)
        (lambda o, y: ((o - y) ** 4).mean(), "reg"),  # loop path
    ],
    ids=["ce", "mse", "l1", "ce_module", "mse_module", "ce_partial", "ce_weighted", "custom"],
)
def test_task_losses_match_loop(loss_fn, kind):
    out = torch.randn(T, 6, 4, dtype=D, requires_grad=True)
    y = torch.randint(0, 4, (T, 6)) if kind == "cls" else torch.randn(T, 6, 4, dtype=D)
    got = task_losses(loss_fn, out, y)
    want = _loop_losses(loss_fn, out, y)
    assert got.shape == (T,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    g1 = torch.autograd.grad(got.sum(), out)[0]
    g2 = torch.autograd.grad(want.sum(), out)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_task_losses_multidim_and_ignore_index():
    out = torch.randn(T, 5, 3, 2, dtype=D)
    y = torch.randn(T, 5, 3, 2, dtype=D)
    torch.testing.assert_close(task_losses(F.mse_loss, out, y), _loop_losses(F.mse_loss, out, y), rtol=1e-12, atol=0)
    logits = torch.randn(T, 5, 4, 3, dtype=D)  # [T, N, C, d] with targets [T, N, d]
    labels = torch.randint(0, 4, (T, 5, 3))
    labels[0, :2] = -100
    for fn in (F.cross_entropy, nn.CrossEntropyLoss()):
        torch.testing.assert_close(task_losses(fn, logits, labels), _loop_losses(fn, logits, labels),
                                   rtol=1e-12, atol=0)


def test_task_losses_bad_inputs():
    with pytest.raises(ValueError, match="same number of tasks"):
        task_losses(F.cross_entropy, torch.randn(3, 4, 2), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="tensors"):
        task_losses(F.cross_entropy, [1.0], torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[T, N, \*out\]"):
        task_losses(F.mse_loss, torch.randn(3), torch.randn(3))


# ------------------------------------------------------------------ torch.func transforms

@pytest.mark.parametrize("which", ["conv4", "residual"])
def test_forward_over_reverse_hvp(which):
    """task_hvp's "func" backend runs jvp(grad(...)) through TaskFunction: both paths support it."""
    from torch.func import grad, jvp

    if which == "conv4":
        net = plain_conv4(1, 3, 2, 16).to(D)
        x, y = torch.randn(T, 3, 1, 16, 16, dtype=D), torch.randint(0, 3, (T, 3))
    else:
        net = Residual(3).to(D)
        x, y = torch.randn(T, 4, 3, dtype=D), torch.randint(0, 2, (T, 4))
    fn = task_function(net)
    params = task_params(net)
    v = {n: torch.randn_like(t) for n, t in params.items()}

    def loss(p):
        return task_losses(F.cross_entropy, fn(p, x), y).sum()

    _, hvp = jvp(grad(loss), (params,), (v,))
    ps = {n: t.clone().requires_grad_() for n, t in params.items()}
    g = torch.autograd.grad(loss(ps), list(ps.values()), create_graph=True)
    want = torch.autograd.grad(sum((a * v[n]).sum() for a, n in zip(g, ps)), list(ps.values()))
    for n, w in zip(ps, want):
        torch.testing.assert_close(hvp[n], w, rtol=1e-10, atol=1e-12)


class NoisyResidual(Residual):
    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, self.training)


def test_vmap_path_dropout_differs_per_task():
    net = NoisyResidual(3).to(D)
    fn = task_function(net)
    x = torch.randn(1, 200, 3, dtype=D).expand(2, 200, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(None, x)
    assert fn.path == "vmap"
    assert not torch.equal(out[0] == 0, out[1] == 0)  # independent masks per task
