"""The traced task-batched path (fastmeta/func/_fx.py): learn2learn's vision models, with their
own forwards, run as task-batched layers; meta-gradients equal a naive per-task loop (float64,
1e-10 relative); refusals fall back with a reason."""

import copy
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta.func import explain, task_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _dropin_models import MiniImagenetCNN, OmniglotCNN, OmniglotFC, clone_adapt_loss, mini_embedding

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
pytestmark = pytest.mark.usefixtures("one_thread")


def small(name):
    torch.manual_seed(0)
    if name == "fc":
        return OmniglotFC(input_size=16, output_size=3, sizes=(8, 6)).to(DT), (1, 4, 4)
    if name == "cnn":
        return OmniglotCNN(output_size=3, hidden_size=4, layers=2, size=8, tied=False).to(DT), (1, 8, 8)
    return MiniImagenetCNN(output_size=3, hidden_size=4, layers=4, channels=3,
                           embedding_size=mini_embedding(4, 16)).to(DT), (3, 16, 16)


def batch(shape, T=3, n=3, Q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n, *shape, generator=g, dtype=DT)
    qx = torch.randn(T, n * Q, *shape, generator=g, dtype=DT)
    sy = torch.arange(n).repeat(T, 1)
    qy = torch.arange(n).repeat_interleave(Q).repeat(T, 1)
    return sx, sy, qx, qy


def buffers(model):
    return [b.detach().clone() for b in model.buffers()]


def naive_meta_loss(model, data, steps, lr, first_order):
    """Per task: unrolled inner steps on functional_call of the model's own forward."""
    sx, sy, qx, qy = data
    runner = copy.deepcopy(model)  # its train-mode forwards update ITS running statistics
    total = 0
    for t in range(sx.shape[0]):
        p = dict(model.named_parameters())
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(runner, p, (sx[t],)), sy[t])
            g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
            p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
        total = total + F.cross_entropy(functional_call(runner, p, (qx[t],)), qy[t])
    return total / sx.shape[0]


@pytest.mark.parametrize("name", ["fc", "cnn", "mini"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_loss_equals_naive_loop(name, first_order, steps):
    model, shape = small(name)
    before = list(model.parameters())
    running = buffers(model)
    maml = fastmeta.MAML(model, lr=0.3, first_order=first_order)
    data = batch(shape, seed=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = maml.meta_loss(*data, steps=steps)
    assert maml.task_function().path == "traced", maml.task_function().reason
    g_fast = torch.autograd.grad(res.loss, before)
    ref = naive_meta_loss(model, data, steps, 0.3, first_order)
    torch.testing.assert_close(res.loss, ref, **TOL)
    for n, a, b in zip(dict(model.named_parameters()), g_fast, torch.autograd.grad(ref, before)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=n: f"{n}: {m}")
    # semantics: running statistics are left as they were (never the tasks' average)
    for b, b0 in zip(model.buffers(), running):
        assert torch.equal(b, b0)
    assert all(a is b for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["cnn", "mini"])
def test_eval_mode_uses_running_statistics(name):
    model, shape = small(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    fn = task_function(model)
    assert fn.path == "traced"
    x = batch(shape)[0]
    params = {n: p.expand(3, *p.shape) + 0.01 * torch.randn(3, *p.shape, dtype=DT)
              for n, p in model.named_parameters()}
    ref = torch.stack([functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(3)])
    torch.testing.assert_close(fn(params, x), ref, **TOL)
    model.train()  # the fingerprint sees the flags: re-planned, batch statistics again
    ref = torch.stack([functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(3)])
    torch.testing.assert_close(fn(params, x), ref, **TOL)
    torch.testing.assert_close(fn(None, x)[1], model(x[1]), **TOL)


def test_training_step_updates_every_parameter():
    model, shape = small("mini")
    named = list(model.named_parameters())
    opt = torch.optim.SGD([p for _, p in named], lr=0.1)
    maml = fastmeta.MAML(model, lr=0.3)
    for step in range(2):
        values = [p.detach().clone() for _, p in named]
        opt.zero_grad()
        maml.meta_loss(*batch(shape, seed=step), steps=1).loss.backward()
        opt.step()
        for (n, p), v in zip(named, values):
            assert isinstance(p, nn.Parameter) and p.is_leaf and p.grad is not None, n
            if "conv.bias" not in n:  # a bias before BatchNorm cancels out
                assert not torch.equal(p.detach(), v), f"step {step}: {n} did not change"


def test_tied_body_is_traced_and_is_right():
    """learn2learn's OmniglotCNN as it is (its body registered twice): traced, each tied
    parameter one key, the same meta-gradient as clone/adapt."""
    torch.manual_seed(0)
    model = OmniglotCNN(output_size=3, hidden_size=4, layers=2, size=8, tied=True).to(DT)
    fn = task_function(model)
    assert fn.path == "traced", fn.reason
    assert len(fn.names) == len(list(model.parameters())) == 10
    before = list(model.parameters())
    maml = fastmeta.MAML(model, lr=0.3)
    data = batch((1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loop fallback's warning (running statistics)
        g_fast = torch.autograd.grad(maml.meta_loss(*data, steps=1).loss, before)
    g_ref = torch.autograd.grad(clone_adapt_loss(maml, data, 1), before)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **TOL)


def test_explain_prints_the_mapping():
    model, _ = small("mini")
    text = explain(model)
    assert "path='traced'" in text
    assert "features.0.conv: Conv2d -> TaskConv2d" in text
    assert "features.3.normalize: BatchNorm2d -> TaskBatchNorm2d" in text
    assert "features.0.max_pool: MaxPool2d -> TaskMaxPool2d" in text
    assert "reshape: call_method reshape (kept; batch)" in text
    assert "classifier: Linear -> TaskLinear" in text


class Residual(nn.Module):
    """Residual connection, functional activation, indexing and a module called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 5)

    def forward(self, x):
        h = x + F.tanh(self.a(x))
        h = h + 0.5 * self.a(h)
        return self.b(h)[:, :3] * 2


def test_residual_and_reused_module_match_naive():
    torch.manual_seed(0)
    model = Residual().to(DT)
    assert task_function(model).path == "traced"
    data = (torch.randn(3, 4, 4, dtype=DT), torch.randint(0, 3, (3, 4)), torch.randn(3, 5, 4, dtype=DT),
            torch.randint(0, 3, (3, 5)))
    before = list(model.parameters())
    res = fastmeta.MAML(model, lr=0.2).meta_loss(*data, steps=2)
    ref = naive_meta_loss(model, data, 2, 0.2, False)
    for a, b in zip(torch.autograd.grad(res.loss, before), torch.autograd.grad(ref, before)):
        torch.testing.assert_close(a, b, **TOL)


class MixesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x - x.mean())  # the mean of ALL examples: not per task when batched


class OwnWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ self.w.t()  # (F.linear(x, self.w) is a functional layer: traced)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: torch.fx cannot trace it
            return self.lin(x)
        return -self.lin(x)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.PReLU(4)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(self.norm(x))


@pytest.mark.parametrize("make, why", [
    (MixesBatch, r"call_method mean without a dim"),
    (OwnWeight, r"reads w directly"),
    (Normed, r"norm: PReLU has no task-batched version"),
])
def test_refusals_fall_back_with_reason(make, why):
    model = make().to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn = task_function(model)
    assert fn.path == "vmap"
    assert re.search(why, fn.reason), fn.reason
    x = torch.randn(3, 5, 4, dtype=DT)
    params = fn.expand(3)
    ref = torch.stack([functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(3)])
    torch.testing.assert_close(fn(params, x), ref, **TOL)


def test_trace_failure_warns_once_with_path_and_reason():
    model = Branchy().to(DT)
    with pytest.warns(UserWarning, match=r"Branchy .*torch.fx could not trace it.*using torch.func.vmap"):
        fn = task_function(model)
    assert fn.path == "vmap"


def test_traced_path_bad_params():
    model, shape = small("fc")
    fn = task_function(model)
    x = torch.randn(3, 2, *shape, dtype=DT)
    params = fn.expand(3)
    with pytest.raises(ValueError, match=r"params is missing 'classifier.bias'"):
        fn({k: v for k, v in params.items() if k != "classifier.bias"}, x)
    with pytest.raises(ValueError, match=r"params\['classifier.weight'\] has shape"):
        fn({**params, "classifier.weight": params["classifier.weight"][:2]}, x)


@pytest.mark.parametrize("steps", [1, 2])
def test_resnet12_residual_blocks_match_naive(steps):
    """fastmeta's own ResNet12 (residual adds of two conv/BN branches, LeakyReLU, x.mean((2, 3)))."""
    from fastmeta.nn.backbones import ResNet12

    torch.manual_seed(0)
    body = ResNet12(1, widths=(2, 3, 3, 4))
    model = nn.Sequential(body, nn.Linear(4, 3)).to(DT)  # Sequential with a custom child: traced
    fn = task_function(model)
    assert fn.path == "traced", fn.reason
    assert "0.blocks.0.shortcut.0: Conv2d -> TaskConv2d" in explain(model)
    data = batch((1, 16, 16), T=2, seed=steps)
    before = list(model.parameters())
    res = fastmeta.MAML(model, lr=0.3).meta_loss(*data, steps=steps)
    ref = naive_meta_loss(model, data, steps, 0.3, False)
    torch.testing.assert_close(res.loss, ref, **TOL)
    for a, b in zip(torch.autograd.grad(res.loss, before), torch.autograd.grad(ref, before)):
        torch.testing.assert_close(a, b, **TOL)


def test_func_hvp_backend_on_traced_path():
    """task_hvp's torch.func backend (forward-over-reverse) runs the traced model too."""
    from fastmeta.func import inner_loop

    model, shape = small("cnn")
    fn = task_function(model)
    assert fn.path == "traced"
    sx, sy, qx, qy = batch(shape, seed=5)
    out = {}
    for backend in ("reference", "func"):
        fast = inner_loop(fn, fn.expand(sx.shape[0]), sx, sy, steps=2, lr=0.3, hvp_backend=backend)
        loss = F.cross_entropy(fn(fast, qx).flatten(0, 1), qy.flatten())
        out[backend] = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(out["func"], out["reference"]):
        torch.testing.assert_close(a, b, **TOL)


def test_traced_plan_does_not_keep_the_module_alive():
    """The cache is weak: no torch.fx object (whose tracer holds the root) outlives planning."""
    import gc
    import weakref

    model, shape = small("mini")
    fn = task_function(model)
    assert fn.path == "traced"
    fn(fn.expand(2), torch.randn(2, 3, *shape, dtype=DT))
    ref = weakref.ref(model)
    del model, fn
    gc.collect()
    assert ref() is None


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h * F.softmax(h.sum(dim=1), dim=-1).unsqueeze(1)  # dim -1 of [N]: over the examples


def test_last_dim_of_a_1d_value_falls_back_instead_of_mixing_tasks():
    model = Softmaxed().to(DT)
    fn = task_function(model)
    assert fn.path == "traced"
    params, x = fn.expand(3), torch.randn(3, 5, 4, dtype=DT)
    with pytest.warns(UserWarning, match="dim=-1 on a 1-D tensor would work across the examples.*vmap"):
        out = fn(params, x)
    assert fn.path == "vmap"
    torch.testing.assert_close(out, torch.stack([model(x[t]) for t in range(3)]), **TOL)


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.drop(self.a(x))), 0.2, self.training))


@pytest.mark.parametrize("steps", [1, 2])
def test_dropout_masks_replayed_by_inner_loop_backward(steps):
    """inner_loop restores the RNG for its recomputations: with dropout on the traced path its
    meta-gradient equals the unrolled loop of the same task function drawing the same masks."""
    from fastmeta.func import task_losses
    from fastmeta.func import inner_loop

    torch.manual_seed(0)
    model = Dropped().to(DT)
    fn = task_function(model)
    assert fn.path == "traced"
    sx, sy = torch.randn(3, 5, 4, dtype=DT), torch.randint(0, 3, (3, 5))
    qx, qy = torch.randn(3, 4, 4, dtype=DT), torch.randint(0, 3, (3, 4))
    before = list(model.parameters())
    out = []
    for fast_path in (True, False):
        torch.manual_seed(7)
        if fast_path:
            p = inner_loop(fn, fn.expand(3), sx, sy, steps=steps, lr=0.3)
        else:
            p = fn.expand(3)
            for _ in range(steps):
                g = torch.autograd.grad(task_losses(F.cross_entropy, fn(p, sx), sy).sum(), list(p.values()),
                                        create_graph=True)
                p = {k: v - 0.3 * gk for (k, v), gk in zip(p.items(), g)}
        loss = task_losses(F.cross_entropy, fn(p, qx), qy).mean()
        out.append((loss, torch.autograd.grad(loss, before)))
    torch.testing.assert_close(out[0][0], out[1][0], **TOL)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, **TOL)


class LayerNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.gelu(self.norm(self.a(x))))


@pytest.mark.parametrize("make, path", [
    (LayerNormed, "traced"),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), "batched"),
])
def test_layer_norm_matches_naive(make, path):
    torch.manual_seed(0)
    model = make().to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    assert task_function(model).path == path
    data = (torch.randn(3, 4, 4, dtype=DT), torch.randint(0, 3, (3, 4)), torch.randn(3, 5, 4, dtype=DT),
            torch.randint(0, 3, (3, 5)))
    before = list(model.parameters())
    res = fastmeta.MAML(model, lr=0.2).meta_loss(*data, steps=2)
    ref = naive_meta_loss(model, data, 2, 0.2, False)
    torch.testing.assert_close(res.loss, ref, **TOL)
    for a, b in zip(torch.autograd.grad(res.loss, before), torch.autograd.grad(ref, before)):
        torch.testing.assert_close(a, b, **TOL)


def test_task_layer_norm_direct():
    from fastmeta.nn import TaskLayerNorm

    torch.manual_seed(0)
    ln = TaskLayerNorm((2, 3), eps=1e-3, dtype=DT)
    x = torch.randn(3, 4, 5, 2, 3, dtype=DT)
    w, b = torch.randn(3, 2, 3, dtype=DT), torch.randn(3, 2, 3, dtype=DT)
    ref = torch.stack([F.layer_norm(x[t], (2, 3), w[t], b[t], 1e-3) for t in range(3)])
    torch.testing.assert_close(ln(x, {"weight": w, "bias": b}), ref, **TOL)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (2, 3), ln.weight, ln.bias, 1e-3), **TOL)
    with pytest.raises(ValueError, match=r"must have shape \[T, N, \*, \*\(2, 3\)\]"):
        ln(torch.randn(3, 4, 3, 2, dtype=DT))


class GroupNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(F.relu(self.norm(self.conv(x))).mean(dim=[2, 3]))


def test_group_norm_matches_naive():
    torch.manual_seed(0)
    model = GroupNormed().to(DT)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    assert task_function(model).path == "traced"
    assert "norm: GroupNorm -> TaskGroupNorm" in explain(model)
    data = batch((1, 5, 5), seed=3)
    before = list(model.parameters())
    res = fastmeta.MAML(model, lr=0.2).meta_loss(*data, steps=2)
    ref = naive_meta_loss(model, data, 2, 0.2, False)
    torch.testing.assert_close(res.loss, ref, **TOL)
    for a, b in zip(torch.autograd.grad(res.loss, before), torch.autograd.grad(ref, before)):
        torch.testing.assert_close(a, b, **TOL)
