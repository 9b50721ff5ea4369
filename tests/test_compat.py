"""fastmeta.compat matches the helpers of public ProtoNet code, written out here in plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close64

from fastmeta.compat import euclidean_dist, prototypical_loss


def naive_euclidean_dist(x, y):
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(2)


def naive_prototypical_loss(inp, target, n_support):
    # the loop-based original (classes sorted, first n_support of each class are support)
    classes = torch.unique(target)
    support_idx = [target.eq(c).nonzero()[:n_support].squeeze(1) for c in classes]
    protos = torch.stack([inp[i].mean(0) for i in support_idx])
    query_idx = torch.stack([target.eq(c).nonzero()[n_support:] for c in classes]).view(-1)
    n_query = len(query_idx) // len(classes)
    log_p = F.log_softmax(-naive_euclidean_dist(inp[query_idx], protos), dim=1).view(len(classes), n_query, -1)
    tgt = torch.arange(len(classes), device=inp.device).view(-1, 1, 1).expand(len(classes), n_query, 1)
    loss = -log_p.gather(2, tgt).squeeze().view(-1).mean()
    acc = log_p.max(2)[1].eq(tgt.squeeze(2)).double().mean()
    return loss, acc


def test_euclidean_dist_matches_broadcast():
    x = torch.randn(13, 7, dtype=torch.float64, device=DEVICE)
    y = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    assert_close64(euclidean_dist(x, y), naive_euclidean_dist(x, y))


def test_prototypical_loss_matches_original():
    n_way, n_support, n_query = 5, 3, 4
    target = torch.tensor([7, 3, 11, 42, 9]).repeat_interleave(n_support + n_query)
    target = target[torch.randperm(len(target))].to(DEVICE)
    inp = torch.randn(len(target), 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss, acc = prototypical_loss(inp, target, n_support)
    (g,) = torch.autograd.grad(loss, inp)
    inp2 = inp.detach().clone().requires_grad_()
    ref_loss, ref_acc = naive_prototypical_loss(inp2, target, n_support)
    (g_ref,) = torch.autograd.grad(ref_loss, inp2)
    assert_close64(loss, ref_loss)
    assert_close64(acc.double(), ref_acc)
    assert_close64(g, g_ref)
    assert n_way == len(torch.unique(target))


def test_prototypical_loss_bad_inputs():
    inp = torch.randn(10, 4)
    with pytest.raises(ValueError, match="same number of examples"):
        prototypical_loss(inp, torch.tensor([0] * 6 + [1] * 4), 2)
    with pytest.raises(ValueError, match="n_support must be an int in"):
        prototypical_loss(inp, torch.tensor([0] * 5 + [1] * 5), 5)
    with pytest.raises(ValueError, match="target must be"):
        prototypical_loss(inp, torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="feature sizes differ"):
        euclidean_dist(torch.randn(3, 4), torch.randn(3, 5))
