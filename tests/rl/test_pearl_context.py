"""PEARL's context encoder (fastmeta.rl.context): permutation invariance, the posterior as the
product of the per-transition factors (variable context via the mask), KL, bad inputs."""

import pytest
import torch

from fastmeta.rl.context import ContextEncoder, kl_to_prior, transition_features

OBS, ACT, D = 2, 2, 3
F = 2 * OBS + ACT + 1


def encoder():
    torch.manual_seed(0)
    return ContextEncoder(OBS, ACT, latent_dim=D, hidden=(16,)).double()


def context(B=4, C=9, seed=0):
    return torch.randn(B, C, F, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_transition_features_layout():
    o, a = torch.ones(3, 5, OBS), 2 * torch.ones(3, 5, ACT)
    r, o2 = 3 * torch.ones(3, 5), 4 * torch.ones(3, 5, OBS)
    f = transition_features(o, a, r, o2)
    assert f.shape == (3, 5, F)
    assert f[0, 0].tolist() == [1, 1, 2, 2, 3, 4, 4]


def test_posterior_is_the_product_of_the_factors_float64():
    enc, ctx = encoder(), context()
    mu_c, var_c = enc.factors(ctx)
    mu, var = enc.posterior(ctx)
    var_hand = 1.0 / (1.0 / var_c).sum(1)
    torch.testing.assert_close(var, var_hand, rtol=1e-12, atol=0)
    torch.testing.assert_close(mu, var_hand * (mu_c / var_c).sum(1), rtol=1e-12, atol=1e-14)
    assert mu.shape == var.shape == (4, D)


def test_permutation_invariance():
    enc, ctx = encoder(), context(C=13)
    mu, var = enc.posterior(ctx)
    for seed in range(3):
        perm = torch.randperm(13, generator=torch.Generator().manual_seed(seed))
        mu_p, var_p = enc.posterior(ctx[:, perm])
        torch.testing.assert_close(mu_p, mu, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(var_p, var, rtol=1e-12, atol=1e-14)


def test_variable_context_through_the_mask():
    enc, ctx = encoder(), context(B=3, C=8)
    lengths = [1, 5, 8]
    mask = torch.arange(8)[None] < torch.tensor(lengths)[:, None]
    padded = torch.where(mask[..., None], ctx, torch.nan)  # padding may hold anything, even NaN
    padded.requires_grad_(True)
    mu, var = enc.posterior(padded, mask)
    for b, n in enumerate(lengths):
        mu_b, var_b = enc.posterior(ctx[b:b + 1, :n])
        torch.testing.assert_close(mu[b], mu_b[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(var[b], var_b[0], rtol=1e-12, atol=1e-14)
    (mu.sum() + var.sum()).backward()
    assert torch.isfinite(padded.grad).all() and (padded.grad[~mask] == 0).all()


def test_kl_to_unit_gaussian_matches_torch_distributions():
    mu, var = torch.randn(5, D, dtype=torch.float64), torch.rand(5, D, dtype=torch.float64) + 0.1
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mu, var.sqrt()),
                                             torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_to_prior(mu, var), want, rtol=1e-12, atol=1e-14)
    assert kl_to_prior(torch.zeros(1, D), torch.ones(1, D)).item() == 0.0


def test_sample_is_reparameterised_and_reaches_the_encoder():
    enc, ctx = encoder(), context()
    mu, var = enc.posterior(ctx)
    z = ContextEncoder.sample(mu, var, torch.Generator().manual_seed(0))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0), dtype=mu.dtype)
    torch.testing.assert_close(z, mu + var.sqrt() * eps, rtol=1e-12, atol=1e-14)
    (z.square().sum() + kl_to_prior(mu, var).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_bad_inputs_name_the_problem():
    enc = encoder()
    ctx = context()
    nan_reward = ctx.clone()
    nan_reward[2, 4, 2 * OBS] = float("nan")  # r is column obs_dim + act_dim
    with pytest.raises(ValueError, match="NaN or inf in transition 4 of task 2"):
        enc.posterior(nan_reward)
    with pytest.raises(ValueError, match="empty"):
        enc.posterior(ctx[:, :0])
    with pytest.raises(ValueError, match="no valid factor"):
        enc.posterior(ctx, torch.tensor([[1] * 9, [0] * 9, [1] * 9, [1] * 9]))
    with pytest.raises(ValueError, match=r"shape \[B, C, 7\]"):
        enc.posterior(ctx[..., :-1])
    with pytest.raises(ValueError, match="mask must have shape"):
        enc.posterior(ctx, torch.ones(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        enc.posterior(ctx.long())
    with pytest.raises(ValueError, match="latent_dim"):
        ContextEncoder(2, 2, latent_dim=0)
