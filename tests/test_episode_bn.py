"""Per-episode BatchNorm (fastmeta.nn.episode) and the episodic learners that use it: an
episode's embeddings, loss and gradient do not depend on the other episodes of its batch; the
running statistics of B episodes equal the mean of the per-episode updates (so 2 ranks x B/2
with averaged buffers hold those of 1 process x B); B == 1 is the plain forward, bit for bit.

Everything in float64, where the per-episode path and a plain forward on each episode alone
agree to rounding (measured: bit-identical for Conv4 and ResNet12 on this CPU; the bounds
below leave room for other convolution algorithms)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastmeta.learners import MANN, SNAIL, MatchingNet, ProtoNet
from fastmeta.nn import Conv4, ResNet12, episode_forward, supports_episode_forward
from fastmeta.nn.episode import embed_episodes, run_episodes

F64 = torch.float64
ATOL = 1e-12
pytestmark = pytest.mark.usefixtures("one_thread")


def _episodes(b=4, m=7, c=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, c, size, size, generator=g, dtype=F64)


def _sequence_embedding():
    """The CLI's MANN/SNAIL embedding: Conv4's blocks, a global average pool."""
    return nn.Sequential(*list(Conv4(1, hidden=8))[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _nets():
    torch.manual_seed(0)
    conv = Conv4(1, hidden=8)
    seq = _sequence_embedding()
    res = ResNet12(1, widths=(4, 6, 8, 8))
    return {"conv4": conv.double(), "sequential": seq.double(), "resnet12": res.double()}


def _bn_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items()
            if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("name", ["conv4", "sequential", "resnet12"])
def test_episode_forward_is_each_episode_alone(name):
    net = _nets()[name]
    x = _episodes()
    z = episode_forward(net, x)
    assert z.shape[:2] == (4, 7)
    for b in range(4):
        alone = copy.deepcopy(net)(x[b])
        torch.testing.assert_close(z[b], alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_move_by_the_mean_of_the_episodes(momentum):
    net = _nets()["conv4"]
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            m.running_mean.uniform_(-1, 1)  # not the init: the update's (1 - m) r term counts
    x = _episodes()
    singles = []
    for b in range(4):  # each episode alone, from the same state
        alone = copy.deepcopy(net)
        alone(x[b])
        singles.append(_bn_buffers(alone))
    before = _bn_buffers(net)
    episode_forward(net, x)
    after = _bn_buffers(net)
    for k in after:
        if "num_batches" in k:
            assert after[k].item() == before[k].item() + 1
        else:
            want = torch.stack([s[k] for s in singles]).mean(0)
            torch.testing.assert_close(after[k], want, rtol=0, atol=ATOL)
            assert not torch.equal(after[k], before[k])


def test_two_halves_with_averaged_buffers_equal_the_whole_batch():
    """What torchrun does with 2 ranks: each runs its half, then buffers are averaged."""
    net = _nets()["conv4"]
    x = _episodes(b=6)
    halves = [copy.deepcopy(net) for _ in range(2)]
    for r, h in enumerate(halves):
        episode_forward(h, x[r::2])
    episode_forward(net, x)
    for k, v in _bn_buffers(net).items():
        if v.is_floating_point():
            mean = (_bn_buffers(halves[0])[k] + _bn_buffers(halves[1])[k]) / 2
            torch.testing.assert_close(mean, v, rtol=0, atol=ATOL)


def test_one_episode_is_the_plain_forward_bit_for_bit():
    net = Conv4(1, hidden=8)
    twin = copy.deepcopy(net)
    x = torch.randn(1, 9, 1, 28, 28)
    z = episode_forward(net, x)
    assert torch.equal(z[0], twin(x[0]))
    for k, v in _bn_buffers(net).items():
        assert torch.equal(v, _bn_buffers(twin)[k]), k


def test_eval_mode_uses_the_running_statistics():
    net = _nets()["resnet12"]
    episode_forward(net, _episodes())  # move the running statistics off their init
    net.eval()
    x = _episodes(seed=1)
    state = _bn_buffers(net)
    want = net(x.flatten(0, 1)).view(4, 7, -1)
    torch.testing.assert_close(episode_forward(net, x), want, rtol=0, atol=ATOL)
    assert all(torch.equal(v, state[k]) for k, v in _bn_buffers(net).items())


def test_gradients_flow_to_the_shared_affine_parameters():
    """The BatchNorm weight is repeated per episode: its gradient sums over the episodes."""
    net = _nets()["conv4"]
    twin = copy.deepcopy(net)
    x = _episodes()
    episode_forward(net, x).square().sum().backward()
    for b in range(4):
        twin(x[b]).square().sum().backward()
    for (k, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=ATOL, msg=k)


class _OwnForward(nn.Module):
    """A user's backbone with BatchNorm inside its own forward (no forward_episodes)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean((2, 3))


def test_supported_modules_and_a_user_module_with_its_own_forward():
    nets = _nets()
    assert all(supports_episode_forward(n) for n in nets.values())
    assert supports_episode_forward(nn.Linear(3, 4))  # no BatchNorm: called as it is
    own = _OwnForward()
    assert not supports_episode_forward(own)
    with pytest.raises(TypeError, match="_OwnForward has BatchNorm layers inside its own forward"):
        episode_forward(own, torch.randn(2, 3, 1, 8, 8))
    with pytest.raises(TypeError, match="episode_bn=True: the backbone _OwnForward"):
        ProtoNet(own, episode_bn=True)
    with pytest.raises(TypeError, match="episode_bn must be None"):
        ProtoNet(Conv4(1), episode_bn="yes")
    with pytest.raises(ValueError, match=r"\[B, M, \*example\]"):
        episode_forward(Conv4(1), torch.randn(5, 28))
    # automatic: the user's module keeps whole-batch statistics (one plain call)
    sx, qx = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 4, 1, 8, 8)
    zs, zq = embed_episodes(own, sx, qx)
    z = own(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)]))
    assert torch.equal(zs, z[:6].view(2, 3, 4)) and torch.equal(zq, z[6:].view(2, 4, 4))


def _learners():
    torch.manual_seed(0)
    return {
        "protonet": ProtoNet(Conv4(1, hidden=8)),
        "protonet-resnet12": ProtoNet(ResNet12(1, widths=(4, 6, 8, 8))),
        "matching": MatchingNet(Conv4(1, hidden=8)),
        "matching-fce": MatchingNet(Conv4(1, hidden=8), fce=True, embed_dim=8, fce_steps=2),
        "mann": MANN(_sequence_embedding(), 8, n_way=3, hidden=8, slots=16, width=4, heads=2),
        "snail": SNAIL(_sequence_embedding(), 8, n_way=3, seq_len=7, filters=4,
                       attention=((4, 4), (4, 4), (4, 4))),
    }


def _batch(b, seed):
    g = torch.Generator().manual_seed(seed)
    n, k, q = 3, 2, 2
    sy = torch.arange(n).repeat_interleave(k).expand(b, -1).contiguous()
    qy = torch.arange(n).repeat_interleave(q).expand(b, -1).contiguous()
    return (torch.randn(b, n * k, 1, 28, 28, generator=g, dtype=F64), sy,
            torch.randn(b, n * q, 1, 28, 28, generator=g, dtype=F64), qy)


@pytest.mark.parametrize("name", list(_learners()))
def test_an_episodes_loss_does_not_depend_on_its_batch_mates(name):
    learner = _learners()[name].double()
    assert learner.episode_bn is None
    sx, sy, qx, qy = _batch(4, seed=0)
    ox, _, oqx, _ = _batch(4, seed=1)  # other batch-mates for episode 2
    losses = {}
    mixed = (torch.cat([ox[:2], sx[2:3], ox[3:]]), sy, torch.cat([oqx[:2], qx[2:3], oqx[3:]]), qy)
    for label, batch in (("batch", (sx, sy, qx, qy)), ("others", mixed),
                         ("alone", (sx[2:3], sy[2:3], qx[2:3], qy[2:3]))):
        loss, _ = copy.deepcopy(learner)(*batch, reduction="none")
        losses[label] = loss[2] if label != "alone" else loss[0]
    torch.testing.assert_close(losses["batch"], losses["alone"], rtol=0, atol=1e-10)
    torch.testing.assert_close(losses["others"], losses["alone"], rtol=0, atol=1e-10)
    # and the mean loss's gradient is the mean of the one-episode gradients
    batch_model = copy.deepcopy(learner)
    batch_model(sx, sy, qx, qy)[0].backward()
    singles = [copy.deepcopy(learner) for _ in range(4)]
    for b, m in enumerate(singles):
        (m(sx[b:b + 1], sy[b:b + 1], qx[b:b + 1], qy[b:b + 1])[0] / 4).backward()
    for (k, p), *qs in zip(batch_model.named_parameters(), *(m.parameters() for m in singles)):
        want = sum(q.grad for q in qs if q.grad is not None)
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-9 * scale, msg=k)


def test_whole_batch_statistics_on_request():
    """``episode_bn=False``: the pre-per-episode semantics (one plain call over all episodes):
    an episode's loss then moves with its batch-mates."""
    learner = ProtoNet(Conv4(1, hidden=8), episode_bn=False).double()
    sx, sy, qx, qy = _batch(4, seed=0)
    batch = learner(sx, sy, qx, qy, reduction="none")[0][2]
    alone = learner(sx[2:3], sy[2:3], qx[2:3], qy[2:3], reduction="none")[0][0]
    assert (batch - alone).abs().max().item() > 1e-3


def test_run_episodes_checks_the_row_count():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="7 rows are not 2 episodes"):
        run_episodes(bn, torch.randn(7, 3, 4, 4), 2)


@pytest.mark.parametrize("episode_bn", [None, False])
def test_anil_task_loss_does_not_depend_on_its_meta_batch_mates(episode_bn):
    """ANIL's shared features run once per meta-batch: with per-task BatchNorm (the default for
    a Conv4 body) the meta-gradient of 4 tasks is the mean of two 2-task meta-gradients, as in
    MAML's task layers; with whole-batch statistics (episode_bn=False) it is not."""
    from fastmeta.learners import ANIL

    torch.manual_seed(0)
    features = Conv4(1, hidden=8).double()
    anil = ANIL(features, nn.Linear(8, 3).double(), lr=0.3, episode_bn=episode_bn)
    g = torch.Generator().manual_seed(3)
    sx, qx = (torch.randn(4, n, 1, 28, 28, generator=g, dtype=F64) for n in (6, 9))
    sy, qy = torch.arange(3).repeat(2).expand(4, 6), torch.arange(3).repeat(3).expand(4, 9)
    params = list(anil.parameters())

    def grads(sl):
        loss = anil.meta_loss(sx[sl], sy[sl], qx[sl], qy[sl], steps=2).loss
        return torch.autograd.grad(loss, params)

    whole = grads(slice(0, 4))
    halves = [(a + b) / 2 for a, b in zip(grads(slice(0, 2)), grads(slice(2, 4)))]
    # relative to the largest gradient entry: Conv4's conv biases sit in front of a BatchNorm,
    # their exact gradient is 0 and each side holds only rounding there
    scale = max(w.abs().max().item() for w in whole)
    err = max((w - h).abs().max().item() for w, h in zip(whole, halves)) / scale
    if episode_bn is None:
        assert err < 1e-10
    else:
        assert err > 1e-6  # whole-batch statistics couple the tasks


def test_anil_episode_bn_true_refuses_an_unsupported_body():
    from fastmeta.learners import ANIL

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x)

    with pytest.raises(TypeError, match="episode_bn=True"):
        ANIL(Own(), nn.Linear(4, 2), lr=0.1, episode_bn=True)
