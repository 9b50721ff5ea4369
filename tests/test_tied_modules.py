"""Tied / shared submodules and parameters on every path of MAML, MetaSGD and ANIL.

The model is learn2learn's ``OmniglotCNN`` as learn2learn defines it (bench/_dropin_models.py,
the benchmark's definition, run small): ConvBlocks with their own forward, BatchNorm, the body
registered twice (``self.base`` and inside ``self.features``). Its meta-gradients must equal a
naive per-task loop written with plain functional ops (float64, 1e-10 relative), and a training
step must leave the module's Parameters in place and update every one of them."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.func import task_function
from fastmeta.func._call import call_with, param_slots
from fastmeta.func import inner_loop

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
pytestmark = pytest.mark.usefixtures("one_thread")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _dropin_models import OmniglotCNN, clone_adapt_loss  # noqa: E402

SMALL = dict(output_size=3, hidden_size=4, layers=2, size=8)


class UntraceableOmniglotCNN(OmniglotCNN):
    """The same model with a parameter used outside its module: the traced path refuses it
    (vmap or loop path)."""

    def forward(self, x):
        return self.features(x) @ self.classifier.weight.t() + self.classifier.bias


# the three paths a tied OmniglotCNN can take: traced (running statistics never updated),
# vmap (untraceable, no running statistics), loop (untraceable, running statistics: vmap fails)
PATHS = {"traced": (OmniglotCNN, True), "vmap": (UntraceableOmniglotCNN, False),
         "loop": (UntraceableOmniglotCNN, True)}


def omniglot(path):
    cls, track = PATHS[path]
    return cls(**SMALL, track_running_stats=track).to(DT)


def omniglot_reference(p, x, layers=2, size=8):
    """The same network as plain functional ops on a dict of its (canonical) parameters."""
    h = x.view(-1, 1, size, size)
    for i in range(layers):
        h = F.conv2d(h, p[f"base.{i}.conv.weight"], p[f"base.{i}.conv.bias"], stride=2, padding=1)
        h = F.batch_norm(h, None, None, p[f"base.{i}.normalize.weight"], p[f"base.{i}.normalize.bias"],
                         training=True)
        h = F.relu(h)
    return F.linear(h.mean(dim=[2, 3]), p["classifier.weight"], p["classifier.bias"])


def batch(T=3, n=3, size=8, Q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n, 1, size, size, generator=g, dtype=DT)
    qx = torch.randn(T, n * Q, 1, size, size, generator=g, dtype=DT)
    sy = torch.arange(n).repeat(T, 1)
    qy = torch.arange(n).repeat_interleave(Q).repeat(T, 1)
    return sx, sy, qx, qy


def naive_meta_loss(forward, params, data, steps, lr, first_order, lrs=None):
    """Per-task loop, create_graph unrolled: the textbook MAML / Meta-SGD meta-loss."""
    sx, sy, qx, qy = data
    total = 0
    for t in range(sx.shape[0]):
        p = dict(params)
        for _ in range(steps):
            g = torch.autograd.grad(F.cross_entropy(forward(p, sx[t]), sy[t]), list(p.values()),
                                    create_graph=not first_order)
            p = {k: v - (lr if lrs is None else lrs[k]) * gk for (k, v), gk in zip(p.items(), g)}
        total = total + F.cross_entropy(forward(p, qx[t]), qy[t])
    return total / sx.shape[0]


def grads(loss, params):
    return torch.autograd.grad(loss, params)


def assert_intact(model, params_before):
    after = list(model.parameters())
    assert len(after) == len(params_before)
    for a, b in zip(after, params_before):
        assert a is b and isinstance(a, nn.Parameter) and a.is_leaf


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_omniglot_cnn_meta_gradient(path, first_order, steps):
    model = omniglot(path)
    before = list(model.parameters())
    assert len(before) == 10  # the tied body counted once
    maml = fastmeta.MAML(model, lr=0.3, first_order=first_order)
    data = batch()
    with pytest.warns(UserWarning, match="vmap failed") if path == "loop" else _no_warning():
        res = maml.meta_loss(*data, steps=steps)
    assert maml.task_function().path == path
    g_fast = grads(res.loss, before)
    assert_intact(model, before)
    ref = naive_meta_loss(omniglot_reference, dict(model.named_parameters()), data, steps, 0.3, first_order)
    torch.testing.assert_close(res.loss, ref, **TOL)
    g_ref = grads(ref, before)
    g_l2l = grads(clone_adapt_loss(maml, data, steps), before)
    for n, a, b, c in zip(dict(model.named_parameters()), g_fast, g_ref, g_l2l):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"meta_loss vs naive, {n}: {m}")
        torch.testing.assert_close(c, b, **TOL, msg=lambda m: f"clone/adapt vs naive, {n}: {m}")
    assert_intact(model, before)


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.filterwarnings("error", message="fastmeta")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("learner", ["MAML", "MetaSGD"])
def test_training_steps_update_every_parameter(path, learner):
    torch.manual_seed(1)
    model = omniglot(path)
    before = list(model.parameters())
    meta = fastmeta.MAML(model, lr=0.3) if learner == "MAML" else fastmeta.MetaSGD(model, lr=0.3)
    named = list(meta.named_parameters())
    opt = torch.optim.SGD([p for _, p in named], lr=0.1)
    assert len(named) == 10 + (10 if learner == "MetaSGD" else 0)
    for step in range(2):  # the second step runs on what the first left in the module
        values = [p.detach().clone() for _, p in named]
        opt.zero_grad()
        with pytest.warns(UserWarning) if (path == "loop" and step == 0) else _no_warning():
            meta.meta_loss(*batch(seed=step), steps=1).loss.backward()
        opt.step()
        for (n, p), v in zip(named, values):
            assert p.grad is not None, f"step {step}: {n} got no gradient"
            torch.testing.assert_close(p.detach(), v - 0.1 * p.grad, rtol=1e-14, atol=1e-15)
            if "conv.bias" in n or "conv-bias" in n:
                # a bias right before BatchNorm cancels out: its gradient is zero up to rounding
                assert p.grad.abs().max() < 1e-12, f"step {step}: {n}"
            else:
                assert p.grad.abs().max() > 1e-6, f"step {step}: {n} got a zero gradient"
                assert not torch.equal(p.detach(), v), f"step {step}: {n} did not change"
        assert_intact(model, before)


def test_metasgd_tied_matches_naive():
    model = omniglot("vmap")
    msgd = fastmeta.MetaSGD(model, lr=0.2)
    with torch.no_grad():
        for v in msgd.lrs.values():
            v.uniform_(0.1, 0.4)
    data = batch(seed=3)
    wrt = list(model.parameters()) + list(msgd.lrs.values())
    g_fast = grads(msgd.meta_loss(*data, steps=2).loss, wrt)
    lrs = {n: msgd.lrs[msgd.lr_key(n)] for n, _ in model.named_parameters()}
    ref = naive_meta_loss(omniglot_reference, dict(model.named_parameters()), data, 2, None, False, lrs=lrs)
    g_l2l = grads(clone_adapt_loss(msgd, data, 2), wrt)
    for a, b, c in zip(g_fast, grads(ref, wrt), g_l2l):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(c, b, **TOL)


class SharedHead(nn.Module):
    """A head whose Linear is registered twice (as ``proj`` and inside ``body``)."""

    def __init__(self, d, n):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.body = nn.Sequential(self.proj, nn.Tanh())
        self.out = nn.Linear(d, n)

    def forward(self, z):
        return self.out(self.body(z) + self.proj(z))


def test_anil_shared_head_matches_naive():
    # the features hold the tied body; eval-mode BatchNorm so that each example's features do
    # not depend on the batch (ANIL embeds all tasks at once, the loops below one task at a time)
    features = OmniglotCNN(**SMALL).features.to(DT).eval()
    head = SharedHead(4, 3).to(DT)
    anil = fastmeta.ANIL(features, head, lr=0.3)
    data = batch(seed=4)
    before_h = list(head.parameters())
    wrt = list(features.parameters()) + before_h
    g_fast = grads(anil.meta_loss(*data, steps=2).loss, wrt)
    assert anil.head_function().path == "traced"  # the shared head module, traced
    assert_intact(head, before_h)

    def head_ref(p, z):
        proj = F.linear(z, p["proj.weight"], p["proj.bias"])
        return F.linear(torch.tanh(proj) + proj, p["out.weight"], p["out.bias"])

    sx, sy, qx, qy = data
    total = 0
    for t in range(sx.shape[0]):
        p = dict(head.named_parameters())
        zs, zq = features(sx[t]), features(qx[t])
        for _ in range(2):
            g = torch.autograd.grad(F.cross_entropy(head_ref(p, zs), sy[t]), list(p.values()), create_graph=True)
            p = {k: v - 0.3 * gk for (k, v), gk in zip(p.items(), g)}
        total = total + F.cross_entropy(head_ref(p, zq), qy[t])
    g_ref = grads(total / sx.shape[0], wrt)
    g_l2l = grads(clone_adapt_loss(anil, data, 2), wrt)
    for a, b, c in zip(g_fast, g_ref, g_l2l):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(c, b, **TOL)


def tied_parameter_net():
    """Two different Linear modules holding the SAME weight Parameter."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(4, 3)).to(DT)


def same_module_twice_net():
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3)).to(DT)


@pytest.mark.parametrize("make", [tied_parameter_net, same_module_twice_net])
def test_tied_sequential_is_traced_and_matches_naive(make):
    net = make()
    before = list(net.parameters())
    fn = task_function(net)
    # the Sequential conversion refuses tied weights; the traced path serves them
    assert fn.path == "traced", fn.reason
    slots = param_slots(net)

    def ref(p, x):
        return call_with(net, slots, p, x)

    def plain(p, x):  # the network written out by hand
        w = [p[k] for k in ("0.weight", "0.bias")]
        h = torch.tanh(F.linear(x, *w))
        b2 = p["2.bias"] if "2.bias" in p else p["0.bias"]
        h = torch.tanh(F.linear(h, p["0.weight"], b2))
        return F.linear(h, p["4.weight"], p["4.bias"])

    data = batch(size=2)
    data = (data[0].flatten(2), data[1], data[2].flatten(2), data[3])
    res = fastmeta.MAML(net, lr=0.3).meta_loss(*data, steps=2)
    g_fast = grads(res.loss, before)
    assert_intact(net, before)
    g_plain = grads(naive_meta_loss(plain, dict(net.named_parameters()), data, 2, 0.3, False), before)
    g_call = grads(naive_meta_loss(ref, dict(net.named_parameters()), data, 2, 0.3, False), before)
    for a, b, c in zip(g_fast, g_plain, g_call):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(c, b, **TOL)


def test_inner_loop_func_hvp_on_shared_body():
    """The torch.func (forward-over-reverse) HVP backend runs the module through the same call:
    its adapted parameters' gradients equal the double-backward backend's."""
    model = omniglot("vmap")
    fn = task_function(model)
    sx, sy, qx, qy = batch(seed=5)
    out = {}
    for backend in ("reference", "func"):
        fast = inner_loop(fn, fn.expand(sx.shape[0]), sx, sy, steps=2, lr=0.3, hvp_backend=backend)
        loss = F.cross_entropy(fn(fast, qx).flatten(0, 1), qy.flatten())
        out[backend] = grads(loss, list(model.parameters()))
        assert_intact(model, list(model.parameters()))
    for a, b in zip(out["func"], out["reference"]):
        torch.testing.assert_close(a, b, **TOL)


def test_call_with_restores_on_error():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.alias = self.lin

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    m = Boom()
    before = list(m.parameters())
    slots = param_slots(m)
    assert list(slots) == ["lin.weight", "lin.bias"] and all(len(v) == 1 for v in slots.values())
    with pytest.raises(RuntimeError, match="boom"):
        call_with(m, slots, {"lin.weight": torch.zeros(2, 2)}, torch.randn(1, 2))
    assert_intact(m, before)
    assert m.alias.weight is before[0]


@pytest.mark.parametrize("path", list(PATHS))
def test_task_chunks_on_tied_model_match_one_chunk(path):
    """task_chunk computes each chunk's gradients inside its forward: same as one chunk."""
    model = omniglot(path)
    before = list(model.parameters())
    maml = fastmeta.MAML(model, lr=0.3)
    data = batch(T=3, seed=6)
    with pytest.warns(UserWarning) if path == "loop" else _no_warning():
        g_one = grads(maml.meta_loss(*data, steps=1).loss, before)
    g_chunked = grads(maml.meta_loss(*data, steps=1, task_chunk=2).loss, before)
    assert_intact(model, before)
    ref = naive_meta_loss(omniglot_reference, dict(model.named_parameters()), data, 1, 0.3, False)
    for a, b, c in zip(g_chunked, g_one, grads(ref, before)):
        torch.testing.assert_close(a, c, **TOL)
        torch.testing.assert_close(b, c, **TOL)
