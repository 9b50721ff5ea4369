"""fastmeta.nn.ProtoLoss / MatchingLoss: the modules equal the functional ops (float64, values and
gradients, every reduction), a learned scale gets the functional form's gradient, and bad
settings raise naming the argument."""

import pytest
import torch
from helpers import DEVICE, assert_close64

import fastmeta
from fastmeta import ops
from fastmeta.nn import MatchingLoss, ProtoLoss

D64 = torch.float64


def episode(b=2, n=3, k=2, q=4, d=5):
    support = torch.randn(b, n * k, d, dtype=D64, device=DEVICE)
    support_y = torch.arange(n, device=DEVICE).repeat_interleave(k).expand(b, -1).contiguous()
    query = torch.randn(b, q, d, dtype=D64, device=DEVICE)
    query_y = torch.randint(0, n, (b, q), device=DEVICE)
    return support, support_y, query, query_y, n


def grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss, acc = fn(*leaves)
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=D64, device=DEVICE).view_as(loss)
    return (loss.detach(), acc, *torch.autograd.grad((loss * w).sum(), leaves))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_proto_loss_module_equals_the_op(metric, reduction):
    support, support_y, query, query_y, n = episode()
    protos = ops.prototypes(support, support_y, n)
    module = ProtoLoss(metric=metric, scale=0.7, reduction=reduction)
    got = grads(lambda q, p: module(q, p, query_y), query, protos)
    want = grads(lambda q, p: ops.proto_loss_ref(q, p, query_y, metric, 0.7, reduction), query, protos)
    for g, w in zip(got, want):
        assert_close64(g, w.to(g.dtype), name=f"{metric}/{reduction}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matching_loss_module_equals_the_op(reduction):
    support, support_y, query, query_y, n = episode()
    module = MatchingLoss(scale=5.0, reduction=reduction)
    got = grads(lambda q, s: module(q, s, support_y, n, query_y), query, support)
    want = grads(lambda q, s: ops.matching_loss_ref(q, s, support_y, n, query_y, 5.0, reduction=reduction),
                 query, support)
    for g, w in zip(got, want):
        assert_close64(g, w.to(g.dtype), name=reduction)


def test_learned_scale_is_a_parameter_with_the_functional_gradient():
    support, support_y, query, query_y, n = episode()
    protos = ops.prototypes(support, support_y, n)
    for module, call in [
        (ProtoLoss(metric="cosine", scale=3.0, learn_scale=True),
         lambda m, s: m(query, protos, query_y) if m is not None
         else ops.proto_loss_ref(query, protos, query_y, "cosine", s)),
        (MatchingLoss(scale=3.0, learn_scale=True),
         lambda m, s: m(query, support, support_y, n, query_y) if m is not None
         else ops.matching_loss_ref(query, support, support_y, n, query_y, s)),
    ]:
        module = module.to(D64)
        assert [name for name, _ in module.named_parameters()] == ["scale"]
        (g_mod,) = torch.autograd.grad(call(module, None)[0], [module.scale])
        s = torch.tensor(3.0, dtype=D64, requires_grad=True)
        (g_ref,) = torch.autograd.grad(call(None, s)[0], [s])
        assert g_ref.abs() > 0
        assert_close64(g_mod, g_ref)


def test_fixed_scale_has_no_parameters_and_forced_backend_is_used():
    module = ProtoLoss(backend="reference")
    assert list(module.parameters()) == [] and module.state_dict() == {}
    assert "backend='reference'" in repr(module) and "metric='sqeuclidean'" in repr(module)
    assert "(learned)" in repr(MatchingLoss(learn_scale=True))
    support, support_y, query, query_y, n = episode()
    protos = ops.prototypes(support, support_y, n)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(query, protos, query_y)
    names = {e.name for e in prof.events()}
    assert any(x.startswith("aten::") for x in names)
    assert not any(x.startswith("fastmeta") for x in names), sorted(names)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: ProtoLoss(metric="l1"), ValueError, "metric must be one of"),
    (lambda: ProtoLoss(scale=0.0), ValueError, "scale must be a finite float > 0, got 0.0"),
    (lambda: ProtoLoss(scale=float("nan")), ValueError, "scale must be a finite float > 0"),
    (lambda: ProtoLoss(scale="1"), TypeError, "scale must be a float, got str"),
    (lambda: MatchingLoss(scale=-1.0), ValueError, "scale must be a finite float > 0, got -1.0"),
    (lambda: MatchingLoss(reduction="avg"), ValueError, "reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    (lambda: MatchingLoss(backend=1), TypeError, "backend must be a str or None, got int"),
])
def test_bad_settings_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_inputs_are_the_ops_errors():
    support, support_y, query, query_y, n = episode()
    protos = ops.prototypes(support, support_y, n)
    with pytest.raises(ValueError, match="query_labels"):
        ProtoLoss()(query, protos, query_y + n)
    with pytest.raises(ValueError, match="n_way"):
        MatchingLoss()(query, support, support_y, n, query_y + n)


def test_exposed_under_fastmeta_nn():
    assert fastmeta.nn.ProtoLoss is ProtoLoss and fastmeta.nn.MatchingLoss is MatchingLoss
    assert {"ProtoLoss", "MatchingLoss"} <= set(fastmeta.nn.__all__)
