"""SAC (fastmeta.rl.sac): log-probabilities, targets and losses against float64 hand
computations."""

import math

import pytest
import torch
from torch import nn

from fastmeta.rl.sac import SAC, tanh_gaussian_log_prob


def hand_mlp(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The MLP by explicit products: x W^T + b, ReLU between layers."""
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.T + lin.bias
        if i < len(linears) - 1:
            x = x.clamp_min(0)
    return x


def hand_policy(sac: SAC, x, eps):
    """(action, log pi) of the tanh-Gaussian from the Gaussian density and the tanh Jacobian."""
    out = hand_mlp(sac.actor.net, x)
    A = out.shape[-1] // 2
    mean, log_std = out[:, :A], out[:, A:].clamp(-20, 2)
    u = mean + log_std.exp() * eps
    gauss = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std
             - 0.5 * math.log(2 * math.pi)).sum(-1)
    return torch.tanh(u), gauss - torch.log(1 - torch.tanh(u) ** 2).sum(-1)


def make(seed=0):
    torch.manual_seed(seed)
    sac = SAC(5, 2, hidden=(16, 16), gamma=0.9, tau=0.1, init_alpha=0.3).double()
    for p in sac.critic_target.parameters():  # targets differ from the critics
        p.data.add_(0.05 * torch.randn_like(p))
    return sac


def test_tanh_gaussian_log_prob_matches_naive_float64():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(50, 3, generator=g, dtype=torch.float64)
    log_std = 0.3 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    u = mean + log_std.exp() * torch.randn(50, 3, generator=g, dtype=torch.float64)
    naive = (torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
             - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
    torch.testing.assert_close(tanh_gaussian_log_prob(u, mean, log_std), naive, rtol=1e-12,
                               atol=1e-12)
    # stable where the naive form overflows: |u| = 30 gives log(1 - tanh^2) = log(4) - 2|u| +
    # O(e^-2|u|)
    big = torch.tensor([[30.0, -30.0]], dtype=torch.float64)
    lp = tanh_gaussian_log_prob(big, torch.zeros_like(big), torch.zeros_like(big))
    want = (-0.5 * big ** 2 - 0.5 * math.log(2 * math.pi) - (math.log(4) - 2 * big.abs())).sum(-1)
    torch.testing.assert_close(lp, want, rtol=1e-12, atol=1e-9)


def test_q_target_critic_and_actor_losses_match_hand_computation():
    sac = make()
    g = torch.Generator().manual_seed(1)
    x, x2 = torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 5, generator=g,
                                                                              dtype=torch.float64)
    a = torch.rand(32, 2, generator=g, dtype=torch.float64) * 2 - 1
    r = torch.randn(32, generator=g, dtype=torch.float64)
    not_done = (torch.rand(32, generator=g) > 0.3).double()
    y = sac.q_target(r, x2, not_done, torch.Generator().manual_seed(7))
    eps = torch.randn(32, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a2, logp2 = hand_policy(sac, x2, eps)
    qt = [hand_mlp(q, torch.cat([x2, a2], -1))[:, 0] for q in (sac.critic_target.q1,
                                                               sac.critic_target.q2)]
    alpha = sac.alpha.item()  # exp(log 0.3) as stored
    y_hand = r + 0.9 * not_done * (torch.minimum(*qt) - alpha * logp2)
    torch.testing.assert_close(y, y_hand, rtol=1e-12, atol=1e-12)
    assert not y.requires_grad

    q = [hand_mlp(m, torch.cat([x, a], -1))[:, 0] for m in (sac.critic.q1, sac.critic.q2)]
    want = ((q[0] - y_hand) ** 2).mean() + ((q[1] - y_hand) ** 2).mean()
    torch.testing.assert_close(sac.critic_loss(x, a, y), want, rtol=1e-12, atol=1e-12)

    actor_loss, alpha_loss, logp = sac.actor_alpha_loss(x, torch.Generator().manual_seed(3))
    eps = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a1, logp1 = hand_policy(sac, x, eps)
    q = [hand_mlp(m, torch.cat([x, a1], -1))[:, 0] for m in (sac.critic.q1, sac.critic.q2)]
    torch.testing.assert_close(actor_loss, (alpha * logp1 - torch.minimum(*q)).mean(), rtol=1e-12,
                               atol=1e-12)
    want_alpha = -(sac.log_alpha.item() * (logp1 + sac.target_entropy)).mean()
    torch.testing.assert_close(alpha_loss, want_alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp, logp1.mean(), rtol=1e-12, atol=1e-12)


def test_policy_reg_adds_the_pre_tanh_penalty():
    sac = make()
    x = torch.randn(16, 5, dtype=torch.float64)
    plain = sac.actor_alpha_loss(x, torch.Generator().manual_seed(2))[0]
    sac.policy_reg = 0.01
    reg = sac.actor_alpha_loss(x, torch.Generator().manual_seed(2))[0]
    out = hand_mlp(sac.actor.net, x)
    penalty = (out[:, :2] ** 2 + out[:, 2:].clamp(-20, 2) ** 2).mean()
    torch.testing.assert_close(reg - plain, 0.01 * penalty, rtol=1e-10, atol=1e-12)


def test_alpha_gradient_direction_and_target_update():
    sac = make()
    assert sac.target_entropy == -2.0
    x = torch.randn(64, 5, dtype=torch.float64)
    _, alpha_loss, logp = sac.actor_alpha_loss(x)
    alpha_loss.backward()
    # d L / d log_alpha = -(log pi + target): entropy above target (-logp > -2) -> gradient > 0 ->
    # alpha falls
    torch.testing.assert_close(sac.log_alpha.grad, -(logp + sac.target_entropy), rtol=1e-12,
                               atol=1e-12)
    before = [p.clone() for p in sac.critic_target.parameters()]
    sac.update_target()
    for b, t, s in zip(before, sac.critic_target.parameters(), sac.critic.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=1e-12, atol=1e-14)
    assert not any(p.requires_grad for p in sac.critic_target.parameters())


def test_fixed_alpha_is_a_constant():
    sac = SAC(5, 2, hidden=(16, 16), init_alpha=0.3, fixed_alpha=0.05).double()
    assert not sac.learn_alpha and abs(sac.alpha.item() - 0.05) < 1e-8
    x = torch.randn(64, 5, dtype=torch.float64)
    actor_loss, alpha_loss, logp = sac.actor_alpha_loss(x, torch.Generator().manual_seed(3))
    assert alpha_loss.item() == 0.0 and not alpha_loss.requires_grad
    q = sac.critic(x, sac.actor(x, torch.Generator().manual_seed(3))[0])
    want = (sac.alpha * logp - torch.minimum(*q)).mean()
    torch.testing.assert_close(actor_loss, want, rtol=1e-12, atol=1e-12)


def test_act_shapes_range_and_determinism():
    sac = SAC(4, 3)
    x = torch.randn(2, 5, 4)
    a = sac.act(x, torch.Generator().manual_seed(0))
    assert a.shape == (2, 5, 3) and (a.abs() < 1).all()
    assert torch.equal(sac.act(x, deterministic=True), sac.act(x, deterministic=True))
    assert torch.equal(a, sac.act(x, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kw", [dict(in_dim=0, act_dim=2), dict(in_dim=3, act_dim=2, tau=0.0),
                                dict(in_dim=3, act_dim=2, gamma=1.5), dict(in_dim=3, act_dim=2,
                                                                           init_alpha=-1.0),
                                dict(in_dim=3, act_dim=2, policy_reg=-1.0),
                                dict(in_dim=3, act_dim=2, fixed_alpha=0.0)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        SAC(**kw)
