"""inner_loop(recompute=...): keeping each step's double-backward graph (recompute=False, the
CPU default) and recomputing it (recompute=True, the memory-light path) give the naive
per-task loop's meta-gradients in float64; the choice follows the device; the kept graphs are
freed by the backward; a second backward (retain_graph) recomputes; dropout and BatchNorm
buffers behave as in the recompute path."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close64
from test_inner_loop import T, lr_tensors, make, make_lr, naive_adapt, per_task_forward
from torch import nn

from fastmeta.func import _inner_loop as IL
from fastmeta.func import inner_loop, task_function

pytestmark = [pytest.mark.usefixtures("one_thread")]


def _grads(module, lr_kind, steps, recompute, backend="reference", retain=False):
    torch.manual_seed(3)
    module_, xs, ys, xq, yq, loss_fn = module
    fn = task_function(module_)
    own = fn.params()
    lr = make_lr(lr_kind, own)
    wrt = list(own.values()) + lr_tensors(lr)
    fast = inner_loop(fn, fn.expand(T), xs, ys, steps, lr, loss_fn=loss_fn, hvp_backend=backend,
                      recompute=recompute)
    out = fn(fast, xq)
    q = torch.stack([loss_fn(out[t], yq[t]) for t in range(T)]).sum()
    got = torch.autograd.grad(q, wrt, retain_graph=retain)
    again = torch.autograd.grad(q, wrt) if retain else None
    adapted = naive_adapt(module_, own, xs, ys, steps, lr, False, loss_fn)
    q_ref = torch.stack([loss_fn(per_task_forward(module_, adapted[t], xq[t]), yq[t])
                         for t in range(T)])
    want = torch.autograd.grad(q_ref.sum(), wrt)
    return got, want, again


@pytest.mark.parametrize("recompute", [False, True, None])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("model_name,lr_kind", [("conv4", "per_element"), ("custom", "per_task"),
                                                ("mlp_ce", "scalar")])
def test_kept_and_recomputed_graphs_match_naive_loop(model_name, lr_kind, steps, recompute):
    torch.manual_seed(0)
    got, want, _ = _grads(make(model_name), lr_kind, steps, recompute)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close64(a, b, name=f"meta-gradient {i}")


def test_second_backward_recomputes():
    torch.manual_seed(0)
    got, want, again = _grads(make("conv4"), "per_tensor", 2, False, retain=True)
    for a, b, c in zip(got, want, again):
        assert_close64(a, b, name="first backward")
        assert_close64(c, b, name="second backward")


def _kept(recompute, device_type="cpu", grad=True, first_order=False, backend="reference"):
    module, xs, ys, *_ = make("conv4")
    fn = task_function(module)
    seen = {}
    orig = IL._Plan.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        seen["keep"] = self.keep

    IL._Plan.__init__ = spy
    try:
        with torch.set_grad_enabled(grad):
            inner_loop(fn, fn.expand(T), xs, ys, 1, 0.1, first_order=first_order,
                       recompute=recompute, hvp_backend=backend)
    finally:
        IL._Plan.__init__ = orig
    return seen["keep"]


def test_when_graphs_are_kept():
    assert _kept(None) is True  # CPU default
    assert _kept(False) is True
    assert _kept(True) is False
    assert _kept(None, grad=False) is False  # evaluation: nothing to differentiate
    assert _kept(False, first_order=True) is False
    assert _kept(False, backend="func") is False
    with pytest.raises(TypeError, match="recompute"):
        _kept("yes")


def test_graphs_freed_by_backward():
    module, xs, ys, xq, yq, loss_fn = make("conv4")
    fn = task_function(module)
    fast = inner_loop(fn, fn.expand(T), xs, ys, 2, 0.1, recompute=False)
    node = next(iter(fast.values())).grad_fn
    assert len(node.graphs) == 2 and all(g is not None for g in node.graphs)
    F.cross_entropy(fn(fast, xq).flatten(0, 1), yq.flatten()).backward()
    assert node.graphs == [None, None]


def test_dropout_with_kept_graphs():
    """The forward's own masks are in the kept graph: same meta-gradient as the unrolled loop."""
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.4), nn.Linear(8, 3)).double()
    fn = task_function(net)
    xs, xq = torch.randn(T, 5, 3, dtype=torch.float64), torch.randn(T, 4, 3, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (T, 5)), torch.randint(0, 3, (T, 4))
    own = list(fn.params().values())

    def query_loss(p):
        return F.cross_entropy(fn(p, xq).flatten(0, 1), yq.flatten())

    torch.manual_seed(1)
    fast = inner_loop(fn, fn.expand(T), xs, ys, 3, 0.3, hvp_backend="reference", recompute=False)
    got = torch.autograd.grad(query_loss(fast), own)
    torch.manual_seed(1)
    p = fn.expand(T)
    for _ in range(3):
        loss = F.cross_entropy(fn(p, xs).flatten(0, 1), ys.flatten(), reduction="none")
        loss = loss.view(T, -1).mean(1).sum()
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        p = {k: v - 0.3 * gk for (k, v), gk in zip(p.items(), g)}
    want = torch.autograd.grad(query_loss(p), own)
    for a, b in zip(got, want):
        assert_close64(a, b, name="dropout")


@pytest.mark.parametrize("budget_mb,kept", [("0", 0), ("0.8", 1), ("1000", 3)])
def test_graph_budget(monkeypatch, budget_mb, kept):
    """recompute=None keeps steps while their saved tensors fit FASTMETA_KEEP_GRAPHS_MB; the
    rest are recomputed; the meta-gradient is the naive loop's either way."""
    monkeypatch.setenv("FASTMETA_KEEP_GRAPHS_MB", budget_mb)
    module, xs, ys, xq, yq, loss_fn = make("conv4")
    fn = task_function(module)
    own = list(fn.params().values())
    fast = inner_loop(fn, fn.expand(T), xs, ys, 3, 0.2)
    node = next(iter(fast.values())).grad_fn
    assert sum(g is not None for g in node.graphs) == kept
    q = torch.stack([loss_fn(o, y) for o, y in zip(fn(fast, xq), yq)]).sum()
    got = torch.autograd.grad(q, own)
    adapted = naive_adapt(module, fn.params(), xs, ys, 3, 0.2, False, loss_fn)
    q_ref = torch.stack([loss_fn(per_task_forward(module, adapted[t], xq[t]), yq[t])
                         for t in range(T)])
    for a, b in zip(got, torch.autograd.grad(q_ref.sum(), own)):
        assert_close64(a, b, name=f"budget {budget_mb}")


def test_graph_budget_bad_env(monkeypatch):
    monkeypatch.setenv("FASTMETA_KEEP_GRAPHS_MB", "lots")
    module, xs, ys, *_ = make("conv4")
    fn = task_function(module)
    with pytest.raises(ValueError, match="FASTMETA_KEEP_GRAPHS_MB"):
        inner_loop(fn, fn.expand(T), xs, ys, 1, 0.2)
