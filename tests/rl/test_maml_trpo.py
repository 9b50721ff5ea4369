"""MAML-TRPO: the structured meta-Fisher product against per-task double backward (float64),
the analytic Gaussian Fisher, conjugate gradient, the TRPO step and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastmeta.func import task_function, task_losses
from fastmeta.func import task_hvp
from fastmeta.rl import curvature
from fastmeta.rl.curvature import categorical_fisher, gaussian_fisher, pg_hvp
from fastmeta.rl.categorical import CategoricalMLPPolicy
from fastmeta.rl.maml_trpo import MAMLTRPO
from fastmeta.rl.meta_fvp import MetaFisher, adapt
from fastmeta.rl.policy import GaussianMLPPolicy, gaussian_log_prob, pg_loss
from fastmeta.rl.trpo import conjugate_gradient, flatten, line_search, trust_region_step

D64 = torch.float64
HAS_FUSED = curvature._cpp_op(torch.zeros(1)) is not None
# the Gaussian curvature products: the fused C++ op (csrc/cpu/meta_fvp.cpp) and the bmm path
PATHS = [pytest.param(True, marks=pytest.mark.skipif(not HAS_FUSED, reason="no fused op")), False]


@pytest.fixture(params=PATHS, ids=["fused", "bmm"])
def fused(request, monkeypatch):
    monkeypatch.setattr(curvature, "USE_CPP", request.param)
    return request.param


def rollout(T=3, E=2, H=5, obs_dim=3, act_dim=2, seed=0, dtype=torch.float32, discrete=False):
    """Synthetic padded rollouts shaped as fastmeta.rl.Rollout (one early episode end)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(T, E, H, dtype=dtype)
    mask[0, 1, H - 2:] = 0
    if discrete:
        actions = torch.randint(0, act_dim, (T, E, H), generator=g) * mask.long()
    else:
        actions = torch.randn(T, E, H, act_dim, generator=g, dtype=dtype) * mask.unsqueeze(-1)
    return SimpleNamespace(
        obs=torch.randn(T, E, H, obs_dim, generator=g, dtype=dtype) * mask.unsqueeze(-1),
        actions=actions, rewards=torch.randn(T, E, H, generator=g, dtype=dtype) * mask, mask=mask,
    )


def make(obs_dim=3, act_dim=2, hidden=(8, 8), seed=0, discrete=False):
    torch.manual_seed(seed)
    if discrete:
        return CategoricalMLPPolicy(obs_dim, act_dim, hidden=hidden).to(D64)
    pol = GaussianMLPPolicy(obs_dim, act_dim, hidden=hidden, init_std=0.7).to(D64)
    with torch.no_grad():
        pol.log_std.add_(0.1 * torch.randn(act_dim, dtype=D64))
    return pol


def task_params(fn, T, g):
    """Per-task float64 parameters ``{name: [T, *shape]}``: the policy's, perturbed per task."""
    return {k: p.detach() + 0.1 * torch.randn((T, *p.shape), generator=g, dtype=D64) for k, p in fn.params().items()}


def fisher_data(pol, N, seed, T=3):
    """``(fn, generator, params, x [T, N, 3], w [T, N])`` for the Fisher tests: per-task
    parameters, states and KL weights summing to 1 per task."""
    fn = task_function(pol)
    g = torch.Generator().manual_seed(seed)
    params = task_params(fn, T, g)
    x = torch.randn(T, N, 3, generator=g, dtype=D64)
    w = torch.rand(T, N, generator=g, dtype=D64)
    return fn, g, params, x, w / w.sum(1, keepdim=True)


def per_task_fvp(policy, agent, train, valid, v, steps):
    """The peers' recipe: per task, the KL through a create_graph inner loop, double backward.
    ``train``: one rollout for every step, or a list of one per step."""
    fn = task_function(policy)
    trains = train if isinstance(train, list) else [train] * steps
    data = [agent._inner(*agent.batch(r)) for r in trains]
    xv, _, _, wv = agent.batch(valid)
    theta = {k: t.detach() for k, t in fn.params().items()}
    total = {k: torch.zeros_like(t) for k, t in theta.items()}
    T = xv.shape[0]
    for t in range(T):
        th = {k: p.clone().requires_grad_() for k, p in theta.items()}
        phi = {k: p.unsqueeze(0) for k, p in th.items()}
        for x, y in data:
            loss = task_losses(policy.loss, fn(phi, x[t:t + 1]), y[t:t + 1]).sum()
            g = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - agent.fast_lr * gk for (k, p), gk in zip(phi.items(), g)}
        out = fn(phi, xv[t:t + 1])
        kl = (policy.kl(out, out.detach()) * wv[t:t + 1]).sum()
        gk = torch.autograd.grad(kl, list(th.values()), create_graph=True)
        hv = torch.autograd.grad(sum((a * v[k]).sum() for a, k in zip(gk, th)), list(th.values()))
        for k, h in zip(th, hv):
            total[k] += h / T
    return total


@pytest.mark.parametrize("discrete,N,act_dim", [(False, 7, 2), (False, 600, 2), (False, 300, 10), (True, 7, 4)])
def test_fisher_equals_kl_hessian(discrete, N, act_dim, fused):
    # N = 600: the fused op's row blocks (256) with a partial last block; act_dim 10: the
    # output layer through BLAS (narrower ones take the op's dot-product loop)
    pol = make(discrete=discrete, act_dim=act_dim)
    fn, _, params, x, w = fisher_data(pol, N, seed=1)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    fast = (categorical_fisher if discrete else gaussian_fisher)(params, x, w)(v)
    p = {k: t.clone().requires_grad_() for k, t in params.items()}
    kl = (pol.kl(fn(p, x), fn(params, x).detach()) * w).sum()
    gk = torch.autograd.grad(kl, list(p.values()), create_graph=True)
    ref = torch.autograd.grad(sum((a * v[k]).sum() for a, k in zip(gk, p)), list(p.values()))
    for k, r in zip(p, ref):
        torch.testing.assert_close(fast[k], r, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("hidden,obs_dim,N,act_dim", [((8, 7, 6), 3, 11, 2), ((20, 24), 17, 600, 2),
                                                      ((20, 24), 5, 300, 10)])
def test_pg_hvp_and_grad_equal_autograd(hidden, obs_dim, N, act_dim, fused):
    pol = make(obs_dim=obs_dim, hidden=hidden, act_dim=act_dim)
    fn = task_function(pol)
    T = 3
    g = torch.Generator().manual_seed(2)
    params = task_params(fn, T, g)
    x = torch.randn(T, N, obs_dim, generator=g, dtype=D64)
    y = torch.randn(T, N, act_dim + 1, generator=g, dtype=D64)  # actions and signed weights
    v = {k: torch.randn_like(p) for k, p in params.items()}
    op = pg_hvp(params, x, y)
    losses, grads, ref = task_hvp(fn, params, x, y, v, loss_fn=pg_loss, backend="reference", return_grad=True)
    fast = op(v)
    for k in params:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
        torch.testing.assert_close(op.grad[k], grads[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("hvp,discrete,use_cpp", [
    ("analytic", False, True), ("analytic", False, False), ("task_hvp", False, True),
    ("analytic", True, True)])
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_fvp_equals_per_task_double_backward(steps, hvp, discrete, use_cpp, monkeypatch):
    monkeypatch.setattr(curvature, "USE_CPP", use_cpp)  # the Gaussian products: fused op / bmm
    A = 4 if discrete else 2
    pol = make(discrete=discrete, act_dim=A)
    agent = MAMLTRPO(pol, fast_lr=0.3, inner_steps=steps, cg_damping=0.0)
    train, valid = rollout(seed=1, discrete=discrete, act_dim=A), rollout(seed=2, discrete=discrete, act_dim=A)
    fn = task_function(pol)
    obs, actions, adv, w = agent.batch(train)
    x, y = agent._inner(obs, actions, adv, w)
    xv, _, _, wv = agent.batch(valid)
    theta = {k: t.detach() for k, t in fn.params().items()}
    iters = adapt(pol, fn.expand(x.shape[0], theta), x, y, agent.fast_lr, steps)
    mf = MetaFisher(pol, iters, x, y, agent.fast_lr, xv, wv, hvp=hvp)
    g = torch.Generator().manual_seed(3)
    v = {k: torch.randn(t.shape, generator=g, dtype=D64) for k, t in theta.items()}
    fast = mf.fvp(flatten(v))
    ref = flatten(per_task_fvp(pol, agent, train, valid, v, steps))
    err = (fast - ref).norm() / ref.norm()
    assert err < 1e-10, f"relative error {err:.3e}"


@pytest.mark.parametrize("hvp,discrete", [("analytic", False), ("task_hvp", False), ("analytic", True)])
def test_meta_fvp_with_a_train_batch_per_inner_step(hvp, discrete):
    # k = 2 inner steps, step i on its own train batch (resampled with the i-step iterate)
    A = 4 if discrete else 2
    pol = make(discrete=discrete, act_dim=A)
    agent = MAMLTRPO(pol, fast_lr=0.3, inner_steps=2, cg_damping=0.0)
    trains = [rollout(seed=s, discrete=discrete, act_dim=A) for s in (1, 6)]
    valid = rollout(seed=2, discrete=discrete, act_dim=A)
    fn = task_function(pol)
    xs, ys = agent._train_data(trains, 2)
    assert not torch.equal(xs[0], xs[1])
    xv, _, _, wv = agent.batch(valid)
    theta = {k: t.detach() for k, t in fn.params().items()}
    iters = adapt(pol, fn.expand(xv.shape[0], theta), xs, ys, agent.fast_lr, 2)
    mf = MetaFisher(pol, iters, xs, ys, agent.fast_lr, xv, wv, hvp=hvp)
    g = torch.Generator().manual_seed(3)
    v = {k: torch.randn(t.shape, generator=g, dtype=D64) for k, t in theta.items()}
    fast = mf.fvp(flatten(v))
    ref = flatten(per_task_fvp(pol, agent, trains, valid, v, 2))
    err = (fast - ref).norm() / ref.norm()
    assert err < 1e-10, f"relative error {err:.3e}"
    # and it is not the product of reusing the first batch for both steps
    same = flatten(per_task_fvp(pol, agent, trains[0], valid, v, 2))
    assert (same - ref).norm() / ref.norm() > 1e-3


def test_adapt_takes_one_step_per_train_batch():
    pol = make()
    agent = MAMLTRPO(pol, fast_lr=0.3, inner_steps=2)
    a, b = rollout(seed=1), rollout(seed=6)
    fn = task_function(pol)
    one = agent.adapt([a])  # one step: the iterate the second batch is sampled with
    xa, ya = agent._inner(*agent.batch(a))
    ref = adapt(pol, fn.expand(3), xa, ya, 0.3, 1)[-1]
    for k in ref:  # the agent adapts by the analytic gradient: autograd's up to rounding
        torch.testing.assert_close(one[k], ref[k], rtol=1e-12, atol=1e-14)
    xb, yb = agent._inner(*agent.batch(b))
    two = agent.adapt([a, b])
    ref2 = adapt(pol, fn.expand(3), [xa, xb], [ya, yb], 0.3, 2)[-1]
    step2 = adapt(pol, ref, xb, yb, 0.3, 1)[-1]  # the same as one more step from phi_1 on b
    for k in ref:
        torch.testing.assert_close(two[k], ref2[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(two[k], step2[k], rtol=1e-12, atol=1e-12)
    reuse = agent.adapt(a)  # a single rollout serves both steps
    ref3 = adapt(pol, fn.expand(3), xa, ya, 0.3, 2)[-1]
    for k in ref:
        torch.testing.assert_close(reuse[k], ref3[k], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="train has 1 rollouts for 2 inner steps"):
        agent.step([a], rollout(seed=2))
    with pytest.raises(ValueError, match="x has 3 per-step tensors for 2 inner steps"):
        adapt(pol, fn.expand(3), [xa] * 3, [ya] * 3, 0.3, 2)


def test_meta_gradient_equals_autograd():
    pol = make()
    agent = MAMLTRPO(pol, fast_lr=0.3, inner_steps=2)
    train, valid = rollout(seed=4), rollout(seed=5)
    fn = task_function(pol)
    obs, actions, adv, w = agent.batch(train)
    x, y = agent._inner(obs, actions, adv, w)
    xv, av, advv, wv = agent.batch(valid)
    theta = {k: t.detach().requires_grad_() for k, t in fn.params().items()}
    T = x.shape[0]
    phi = adapt(pol, fn.expand(T, theta), x, y, agent.fast_lr, 2, create_graph=True)[-1]
    # at theta_old the surrogate -mean(ratio * adv) has the gradient of -mean(log pi * adv)
    loss = -(gaussian_log_prob(fn(phi, xv), av) * advv * wv).sum(1).mean()
    ref = torch.autograd.grad(loss, list(theta.values()))
    iters = adapt(pol, fn.expand(T, {k: t.detach() for k, t in theta.items()}), x, y, agent.fast_lr, 2)
    p = {k: t.clone().requires_grad_() for k, t in iters[-1].items()}
    l2 = -(gaussian_log_prob(fn(p, xv), av) * advv * wv).sum(1).mean()
    g_phi = dict(zip(p, torch.autograd.grad(l2, list(p.values()))))
    mf = MetaFisher(pol, iters, x, y, agent.fast_lr, xv, wv)
    fast = {k: t.sum(0) for k, t in mf.vjp(g_phi).items()}
    for k, r in zip(theta, ref):
        torch.testing.assert_close(fast[k], r, rtol=1e-10, atol=1e-12, msg=k)


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=D64)
    A = M @ M.T + 12 * torch.eye(12, dtype=D64)
    b = torch.randn(12, generator=g, dtype=D64)
    x = conjugate_gradient(lambda v: A @ v, b, iters=12, residual_tol=1e-30)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="positive definite"):
        conjugate_gradient(lambda v: -v, b)
    with pytest.raises(ValueError, match="1-D"):
        conjugate_gradient(lambda v: v, b.view(3, 4))


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_conjugate_gradient_product_equals_a_explicit_product(iters):
    # A x from CG's residual, also before convergence (ill-conditioned A, few iterations), is
    # the product trust_region_step would otherwise make, and gives the same step
    g = torch.Generator().manual_seed(1)
    M = torch.randn(40, 40, generator=g, dtype=D64)
    A = M @ M.T + 1e-3 * torch.eye(40, dtype=D64)
    b = torch.randn(40, generator=g, dtype=D64)
    calls = []

    def fvp(v):
        calls.append(1)
        return A @ v

    x, ax = conjugate_gradient(fvp, b, iters=iters, residual_tol=1e-30, return_product=True)
    assert len(calls) == iters
    torch.testing.assert_close(ax, A @ x, rtol=1e-10, atol=1e-10 * float(b.norm()))
    step, fd = trust_region_step(x, fvp, 0.01, product=ax)
    assert len(calls) == iters and fd is ax
    torch.testing.assert_close(step, trust_region_step(x, lambda v: A @ v, 0.01)[0], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="shape"):
        trust_region_step(x, fvp, 0.01, product=ax[:3])


def test_trust_region_and_line_search():
    A = torch.diag(torch.tensor([1.0, 4.0], dtype=D64))
    step, _ = trust_region_step(torch.tensor([1.0, 1.0], dtype=D64), lambda v: A @ v, 0.01)
    assert abs(0.5 * step @ A @ step - 0.01) < 1e-12
    size, tries, loss, kl = line_search(lambda s: (1.0 - s + s * s, s * s), 1.0, 0.3, steps=15, backtrack=0.5)
    assert (size, tries) == (0.5, 2) and loss < 1.0 and kl < 0.3
    assert line_search(lambda s: (2.0, 0.0), 1.0, 0.1, steps=3)[0] == 0.0


@pytest.mark.parametrize("steps,discrete", [(1, False), (2, False), (1, True)])
def test_trpo_step_improves_surrogate_within_kl(steps, discrete):
    A = 3 if discrete else 2
    pol = make(hidden=(16, 16), discrete=discrete, act_dim=A)
    agent = MAMLTRPO(pol, fast_lr=0.1, inner_steps=steps, max_kl=1e-3)
    train = rollout(T=4, E=3, H=10, seed=6, discrete=discrete, act_dim=A)
    valid = rollout(T=4, E=3, H=10, seed=7, discrete=discrete, act_dim=A)
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    m = agent.step(train, valid)
    assert m["step_size"] > 0 and m["loss_after"] < m["loss_before"]
    assert 0 < m["kl"] < 1e-3
    assert any(not torch.equal(before[k], v) for k, v in pol.state_dict().items())
    # the reported KL is the measured one: recompute it from the new parameters
    fn = task_function(pol)
    xv, _, _, wv = agent.batch(valid)
    obs, actions, adv, w = agent.batch(train)
    x, y = agent._inner(obs, actions, adv, w)
    new = adapt(pol, fn.expand(4), x, y, 0.1, steps)[-1]
    old = adapt(pol, fn.expand(4, {k: before[k] for k in fn.names}), x, y, 0.1, steps)[-1]
    kl = (pol.kl(fn(new, xv), fn(old, xv)) * wv).sum(1).mean().item()
    assert abs(kl - m["kl"]) < 1e-12
    assert m["pre_return"] == pytest.approx(float((train.rewards * train.mask).sum(-1).mean()))


def test_trpo_step_with_a_train_batch_per_inner_step():
    pol = make(hidden=(16, 16))
    agent = MAMLTRPO(pol, fast_lr=0.1, inner_steps=2, max_kl=1e-3)
    trains = [rollout(T=4, E=3, H=10, seed=s) for s in (6, 8)]
    valid = rollout(T=4, E=3, H=10, seed=7)
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    m = agent.step(trains, valid)
    assert m["step_size"] > 0 and m["loss_after"] < m["loss_before"] and 0 < m["kl"] < 1e-3
    fn = task_function(pol)
    xs, ys = agent._train_data(trains, 2)
    xv, _, _, wv = agent.batch(valid)
    new = adapt(pol, fn.expand(4), xs, ys, 0.1, 2)[-1]
    old = adapt(pol, fn.expand(4, {k: before[k] for k in fn.names}), xs, ys, 0.1, 2)[-1]
    assert abs((pol.kl(fn(new, xv), fn(old, xv)) * wv).sum(1).mean().item() - m["kl"]) < 1e-12
    pre = trains[0]  # sampled with theta
    assert m["pre_return"] == pytest.approx(float((pre.rewards * pre.mask).sum(-1).mean()))


def test_zero_advantages_keep_theta():
    pol = make()
    agent = MAMLTRPO(pol)
    train, valid = rollout(seed=8), rollout(seed=9)
    valid.rewards.zero_()  # every validation advantage is 0: no meta-gradient
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    m = agent.step(train, valid)
    assert m["step_size"] == 0 and m["grad_norm"] == 0
    assert all(torch.equal(before[k], v) for k, v in pol.state_dict().items())


def test_bad_input_is_named():
    agent = MAMLTRPO(make())
    good = rollout()
    bad = rollout()
    bad.rewards[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"train.rewards has a non-finite value .* task 1, episode 0, step 2"):
        agent.step(bad, good)
    bad = rollout(obs_dim=4)
    with pytest.raises(ValueError, match=r"valid.obs must have shape \[T, E, H, 3\]"):
        agent.step(good, bad)
    with pytest.raises(ValueError, match="T=3 tasks but valid has T=2"):
        agent.step(good, rollout(T=2))
    with pytest.raises(TypeError, match="Rollout"):
        agent.step(good, object())
    disc = MAMLTRPO(make(discrete=True, act_dim=3))
    bad = rollout(discrete=True, act_dim=3)
    bad.actions[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"train.actions must be integer indices in \[0, 3\)"):
        disc.step(bad, rollout(discrete=True, act_dim=3))
    with pytest.raises(ValueError, match=r"valid.actions must have shape \[T, E, H\]"):
        disc.step(rollout(discrete=True, act_dim=3), rollout(act_dim=3))
    with pytest.raises(ValueError, match="fast_lr"):
        MAMLTRPO(make(), fast_lr=-1.0)
    with pytest.raises(ValueError, match="obs_dim"):
        GaussianMLPPolicy(0, 2)


def test_categorical_actor_samples_per_task():
    pol = make(discrete=True, act_dim=3)
    fn = task_function(pol)
    params = {k: v.detach().clone() for k, v in fn.expand(2).items()}
    last = max((k for k in params if k.endswith(".bias")), key=lambda k: int(k.split(".")[1]))
    params[last][1] = torch.tensor([0.0, 50.0, 0.0], dtype=D64)  # task 1 always picks action 1
    a = pol.actor(params, torch.Generator().manual_seed(0))(torch.zeros(2, 6, 3, dtype=D64))
    assert a.shape == (2, 6) and a.dtype == torch.int64 and (a[1] == 1).all()


def test_actor_samples_from_the_per_task_policy():
    pol = make()
    fn = task_function(pol)
    params = {k: v.detach().clone() for k, v in fn.expand(2).items()}
    params["log_std"][1] = -20.0  # task 1: deterministic mean action
    obs = torch.randn(2, 5, 3, dtype=D64)
    a = pol.actor(params, torch.Generator().manual_seed(0))(obs)
    b = pol.actor(params, torch.Generator().manual_seed(0))(obs)
    assert a.shape == (2, 5, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    mu = fn(params, obs)[..., :2]
    torch.testing.assert_close(a[1], mu[1].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_FUSED, reason="no fused op")
def test_fused_products_float32_match_float64(monkeypatch):
    # the float32 kernel (sgemm) against the float64 bmm path, at 64-64 widths and 2 row blocks
    pol = make(obs_dim=5, hidden=(64, 64))
    fn = task_function(pol)
    T, N = 2, 300
    g = torch.Generator().manual_seed(4)
    params = {k: (p.detach() + 0.1 * torch.randn((T, *p.shape), generator=g, dtype=D64))
              for k, p in fn.params().items()}
    x = torch.randn(T, N, 5, generator=g, dtype=D64)
    y = torch.randn(T, N, 3, generator=g, dtype=D64)
    w = torch.rand(T, N, generator=g, dtype=D64)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    f32 = {k: t.float() for k, t in params.items()}
    fast = [pg_hvp(f32, x.float(), y.float())({k: t.float() for k, t in v.items()}),
            gaussian_fisher(f32, x.float(), w.float())({k: t.float() for k, t in v.items()})]
    monkeypatch.setattr(curvature, "USE_CPP", False)
    ref = [pg_hvp(params, x, y)(v), gaussian_fisher(params, x, w)(v)]
    for a, b in zip(fast, ref):
        for k in b:
            assert a[k].dtype == torch.float32
            assert ((a[k].double() - b[k]).norm() / b[k].norm()).item() < 1e-5, k


def test_adapt_analytic_equals_adapt(fused):
    # the step's iterates from the analytic operators' gradients == autograd's adapt (2 steps)
    from fastmeta.rl.meta_fvp import adapt_analytic
    pol = make()
    agent = MAMLTRPO(pol, fast_lr=0.3, inner_steps=2)
    xs, ys = agent._train_data([rollout(seed=1), rollout(seed=6)], 2)
    fn = task_function(pol)
    start = fn.expand(xs[0].shape[0], {k: t.detach() for k, t in fn.params().items()})
    ref = adapt(pol, start, xs, ys, agent.fast_lr, 2)
    got, ops = adapt_analytic(pol, start, xs, ys, agent.fast_lr, 2)
    assert len(ops) == 2
    for a, b in zip(got, ref):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=k)


def test_step_reuses_the_adaptation_of_the_same_train():
    # adapt(train) keeps its inner-Hessian operators for step(train, valid): the step is the one
    # a fresh agent makes, and any change to theta or the rollouts, or another train, drops them
    def agents():
        pol = make(hidden=(16, 16))
        return pol, MAMLTRPO(pol, fast_lr=0.1, max_kl=1e-3)

    train, valid = rollout(T=4, E=3, H=10, seed=6), rollout(T=4, E=3, H=10, seed=7)
    pol, agent = agents()
    ref_pol, ref_agent = agents()
    agent.adapt(train)
    assert agent._cached_adaptation(train, 1) is not None  # used once
    assert agent._cached_adaptation(train, 1) is None
    agent.adapt(train)
    m, ref = agent.step(train, valid), ref_agent.step(train, valid)
    assert m == ref
    for k, v in ref_pol.state_dict().items():
        assert torch.equal(pol.state_dict()[k], v), k
    agent.adapt(train)
    with torch.no_grad():
        next(pol.parameters()).add_(1e-3)  # theta changed since adapt
    assert agent._cached_adaptation(train, 1) is None
    agent.adapt(train)
    train.rewards.mul_(2.0)  # the rollouts changed in place
    assert agent._cached_adaptation(train, 1) is None
    agent.adapt(train)
    assert agent._cached_adaptation([train], 1) is None  # another train (a list)
    agent.adapt(train)
    assert agent._cached_adaptation(rollout(T=4, E=3, H=10, seed=6), 1) is None


@pytest.mark.parametrize("N", [7, 600])
def test_fisher_build_gives_the_outer_gradient(N, fused):
    # gaussian_fisher(..., target).grad is the per-task gradient of pg_loss from the Fisher's
    # own forward (.mu), as autograd gives it
    pol = make(obs_dim=3, hidden=(8, 8))
    fn, g, params, x, w = fisher_data(pol, N, seed=4)
    y = torch.randn(3, N, 3, generator=g, dtype=D64)
    op = gaussian_fisher(params, x, w, y)
    p = {k: t.clone().requires_grad_() for k, t in params.items()}
    out = fn(p, x)
    ref = torch.autograd.grad(task_losses(pg_loss, out, y).sum(), list(p.values()))
    torch.testing.assert_close(op.mu, out[..., :2].detach(), rtol=1e-12, atol=1e-12)
    for k, r in zip(p, ref):
        torch.testing.assert_close(op.grad[k], r, rtol=1e-10, atol=1e-12, msg=k)


def test_step_outer_gradient_analytic_equals_autograd():
    # MAMLTRPO.step's analytic outer gradient (from the Fisher's build) and the autograd one
    # (hvp="task_hvp" takes it) give the same step in float64
    train, valid = rollout(T=4, E=3, H=10, seed=6), rollout(T=4, E=3, H=10, seed=7)
    pols = [make(hidden=(16, 16)) for _ in range(2)]
    before = {k: v.clone() for k, v in pols[0].state_dict().items()}
    ms = [MAMLTRPO(p, fast_lr=0.1, max_kl=1e-3, hvp=h).step(train, valid) for p, h in zip(pols, ("analytic", "task_hvp"))]
    assert ms[0]["step_size"] > 0 and ms[0]["ls_tries"] == ms[1]["ls_tries"]
    for k in ("loss_before", "loss_after", "kl", "grad_norm"):
        assert abs(ms[0][k] - ms[1][k]) <= 1e-8 * max(1e-3, abs(ms[1][k])), k
    for (k, a), b in zip(pols[0].state_dict().items(), pols[1].state_dict().values()):
        # the updates agree to ~1e-10 of their size (CG amplifies the last bits)
        assert (a - b).norm() <= 1e-8 * (b - before[k]).norm(), k
