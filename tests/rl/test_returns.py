"""Returns, GAE, the linear feature baseline and normalisation against plain per-step / per-task
references (float64)."""

from __future__ import annotations

import pytest
import torch

from fastmeta.rl.returns import (
    baseline_features,
    discounted_returns,
    fit_linear_baseline,
    gae,
    linear_baseline,
    normalize,
)

D64 = torch.float64


def data(T=3, E=4, H=9, D=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(T, E, H, dtype=D64)
    lengths = torch.randint(3, H + 1, (T, E), generator=g)
    for t in range(T):
        for e in range(E):
            mask[t, e, lengths[t, e]:] = 0
    obs = torch.randn(T, E, H, D, generator=g, dtype=D64) * mask.unsqueeze(-1)
    rewards = torch.randn(T, E, H, generator=g, dtype=D64) * mask
    values = torch.randn(T, E, H, generator=g, dtype=D64)
    return obs, rewards, values, mask


def loop_gae(rewards, values, mask, gamma, lam):
    T, E, H = rewards.shape
    out = torch.zeros_like(rewards)
    for t in range(T):
        for e in range(E):
            n = int(mask[t, e].sum())
            adv = 0.0
            for h in reversed(range(n)):
                v_next = values[t, e, h + 1].item() if h + 1 < n else 0.0
                delta = rewards[t, e, h].item() + gamma * v_next - values[t, e, h].item()
                adv = delta + gamma * lam * adv
                out[t, e, h] = adv
    return out


@pytest.mark.parametrize("gamma,lam", [(0.99, 1.0), (0.9, 0.95), (1.0, 0.0)])
def test_gae_equals_per_step_loop(gamma, lam):
    _, rewards, values, mask = data()
    torch.testing.assert_close(gae(rewards, values, mask, gamma, lam), loop_gae(rewards, values, mask, gamma, lam),
                               rtol=1e-12, atol=1e-12)


def test_discounted_returns_and_gae_lambda_one():
    _, rewards, values, mask = data(seed=1)
    R = discounted_returns(rewards, mask, 0.9)
    ref = loop_gae(rewards, torch.zeros_like(values), mask, 0.9, 1.0)
    torch.testing.assert_close(R, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gae(rewards, values, mask, 0.9, 1.0), (R - values) * mask, rtol=1e-12, atol=1e-12)


def test_discounted_sum_matmul_and_loop_agree(monkeypatch):
    # prefix masks (episodes ending early) take the [H, H] matmul; a mask with a hole (or a
    # horizon over MATMUL_MAX_H) takes the per-step recursion, which restarts after the hole
    from fastmeta.rl import returns as ret

    _, rewards, values, mask = data(H=30, seed=5)
    fast_r, fast_g = discounted_returns(rewards, mask, 0.97), gae(rewards, values, mask, 0.97, 0.9)
    monkeypatch.setattr(ret, "MATMUL_MAX_H", 0)
    torch.testing.assert_close(fast_r, discounted_returns(rewards, mask, 0.97), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_g, gae(rewards, values, mask, 0.97, 0.9), rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    holed = mask.clone()
    holed[0, 0, 1] = 0.0
    R = discounted_returns(rewards, holed, 0.9)
    ref, run = torch.zeros_like(rewards[0, 0]), 0.0
    for h in reversed(range(rewards.shape[-1])):
        run = (rewards[0, 0, h].item() + 0.9 * run) * holed[0, 0, h].item()
        ref[h] = run
    torch.testing.assert_close(R[0, 0], ref, rtol=1e-12, atol=1e-12)
    assert R[0, 0, 1] == 0 and R[0, 0, 0] == rewards[0, 0, 0]


@pytest.mark.parametrize("reg", [0.0, 1e-3])
def test_linear_baseline_equals_least_squares(reg):
    obs, rewards, _, mask = data(E=6, H=12, seed=2)
    R = discounted_returns(rewards, mask, 0.99)
    feats = baseline_features(obs, mask)
    w = fit_linear_baseline(feats, R, mask, reg)
    F = feats.shape[-1]
    assert F == 2 * obs.shape[-1] + 4
    for t in range(obs.shape[0]):
        keep = mask[t].reshape(-1) > 0
        X = feats[t].reshape(-1, F)[keep]
        y = R[t].reshape(-1)[keep]
        if reg > 0:  # ridge == least squares on the system augmented with sqrt(reg) I
            X = torch.cat([X, reg ** 0.5 * torch.eye(F, dtype=D64)])
            y = torch.cat([y, torch.zeros(F, dtype=D64)])
        ref = torch.linalg.lstsq(X, y.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        torch.testing.assert_close(w[t], ref, rtol=1e-7, atol=1e-8)
    values = linear_baseline(obs, R, mask, reg)
    torch.testing.assert_close(values, torch.einsum("tehf,tf->teh", feats, w) * mask)


def test_baseline_features_formula():
    obs, _, _, mask = data(seed=3)
    f = baseline_features(obs, mask)
    t, e, h = 1, 2, 2
    s = h / 100.0 * mask[t, e, h]
    o = obs[t, e, h]
    expect = torch.cat([o, o * o, torch.tensor([s, s * s, s ** 3, mask[t, e, h]], dtype=D64)])
    torch.testing.assert_close(f[t, e, h], expect)


def test_normalize_per_task():
    _, rewards, _, mask = data(seed=4)
    z = normalize(rewards * 3 + 1, mask)
    for t in range(z.shape[0]):
        vals = z[t][mask[t] > 0]
        assert abs(vals.mean().item()) < 1e-12
        assert abs(vals.std(unbiased=False).item() - 1) < 1e-6
    assert (z[mask == 0] == 0).all()


def test_bad_input():
    obs, rewards, values, mask = data()
    bad = rewards.clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rewards has a non-finite value \(nan\) at task 2, episode 1, step 0"):
        discounted_returns(bad, mask, 0.99)
    with pytest.raises(ValueError, match=r"rewards must have shape \[T, E, H\]"):
        discounted_returns(rewards[0], mask[0], 0.99)
    with pytest.raises(ValueError, match="but mask has"):
        gae(rewards, values, mask[:, :2], 0.99, 1.0)
    with pytest.raises(ValueError, match="values must be a tensor of shape"):
        gae(rewards, values[:, :2], mask, 0.99, 1.0)
    with pytest.raises(ValueError, match="gamma must be a float in"):
        discounted_returns(rewards, mask, 1.5)
    with pytest.raises(TypeError, match="floating"):
        discounted_returns(rewards.long(), mask, 0.9)
    with pytest.raises(ValueError, match=r"obs must have shape \[T, E, H, obs_dim\]"):
        linear_baseline(obs[:, :2], rewards, mask)
