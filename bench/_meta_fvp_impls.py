"""The baselines of bench/bench_meta_fvp.py: the meta-objective's Fisher-vector product by
double backward, per task (pytorch-maml-rl's recipe), on one batched graph, and by torch.func;
and a whole per-task-loop TRPO meta-step. Each ``*_builder(d)`` returns ``fvp(v_flat)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta.func import task_losses
from fastmeta.rl.policy import gaussian_kl, gaussian_log_prob, pg_loss
from fastmeta.rl.trpo import conjugate_gradient, line_search, trust_region_step, unflatten


def plain_policy(params: dict, obs: torch.Tensor) -> torch.Tensor:
    """The unbatched functional policy (pytorch-maml-rl's ``policy(obs, params=...)``):
    ``cat(mu, log_std)`` for ``obs [N, obs_dim]`` and one task's parameters."""
    ws = sorted((k for k in params if k.startswith("mean.") and k.endswith(".weight")),
                key=lambda k: int(k.split(".")[1]))
    h = obs
    for i, w in enumerate(ws):
        h = F.linear(h, params[w], params[w[:-6] + "bias"])
        if i < len(ws) - 1:
            h = torch.tanh(h)
    return torch.cat([h, params["log_std"].expand_as(h)], dim=-1)


def _flat_fvp(theta: dict, kl: torch.Tensor, damping: float = 0.0):
    leaves = list(theta.values())
    gk = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, leaves, create_graph=True)])

    def fvp(v):
        hv = torch.autograd.grad(torch.dot(gk, v), leaves, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    return fvp


def _per_task(d, theta, t, create_graph):
    lr = d.agent.fast_lr
    loss = pg_loss(plain_policy(theta, d.x[t]), d.y[t])
    g = torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph)
    phi = {k: p - lr * gk for (k, p), gk in zip(theta.items(), g)}
    return plain_policy(phi, d.xv[t])


def fvp_loop_builder(d):
    """A: KL built task by task (create_graph inner step), double backward per product."""
    theta = {k: p.detach().requires_grad_() for k, p in d.agent.fn.params().items()}
    kls = []
    for t in range(d.x.shape[0]):
        out = _per_task(d, theta, t, True)
        kls.append((gaussian_kl(out, out.detach()) * d.wv[t]).sum())
    return _flat_fvp(theta, torch.stack(kls).mean())


def fvp_batched_builder(d):
    """B: the same double backward on one task-batched graph."""
    fn, lr = d.agent.fn, d.agent.fast_lr
    theta = {k: p.detach().requires_grad_() for k, p in fn.params().items()}
    pT = fn.expand(d.x.shape[0], theta)
    loss = task_losses(pg_loss, fn(pT, d.x), d.y).sum()
    g = torch.autograd.grad(loss, list(pT.values()), create_graph=True)
    phi = {k: p - lr * gk for (k, p), gk in zip(pT.items(), g)}
    out = fn(phi, d.xv)
    return _flat_fvp(theta, (gaussian_kl(out, out.detach()) * d.wv).sum(1).mean())


def fvp_func_builder(d):
    """D: torch.func forward-over-reverse of the batched KL (recomputed per product)."""
    fn, lr, T = d.agent.fn, d.agent.fast_lr, d.x.shape[0]
    theta = {k: p.detach() for k, p in fn.params().items()}

    def adapted(th):
        pT = {k: v.expand(T, *v.shape) for k, v in th.items()}
        g = torch.func.grad(lambda p: task_losses(pg_loss, fn(p, d.x), d.y).sum())(pT)
        return fn({k: pT[k] - lr * g[k] for k in pT}, d.xv)

    with torch.no_grad():
        out_old = adapted(theta)

    def kl(th):
        return (gaussian_kl(adapted(th), out_old) * d.wv).sum(1).mean()

    def fvp(v):
        _, hv = torch.func.jvp(torch.func.grad(kl), (theta,), (unflatten(v, theta),))
        return torch.cat([hv[k].reshape(-1) for k in theta])

    return fvp


def step_loop(d):
    """One whole TRPO meta-step the per-task way (pytorch-maml-rl): surrogate and KL built task
    by task, gradient, CG with double-backward products, line search re-adapting task by task."""
    a = d.agent
    a.batch(d.train), a.batch(d.valid)  # advantages (baseline fit + GAE), as MAMLTRPO.step does
    theta = {k: p.detach().requires_grad_() for k, p in a.fn.params().items()}
    T = d.x.shape[0]
    olds, losses, kls = [], [], []
    for t in range(T):
        out = _per_task(d, theta, t, True)
        old = out.detach()
        olds.append((old, gaussian_log_prob(old, d.av[t])))
        ratio = torch.exp(gaussian_log_prob(out, d.av[t]) - olds[t][1])
        losses.append(-(ratio * d.advv[t] * d.wv[t]).sum())
        kls.append((gaussian_kl(out, old) * d.wv[t]).sum())
    loss = torch.stack(losses).mean()
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, list(theta.values()), retain_graph=True)])
    fvp = _flat_fvp(theta, torch.stack(kls).mean(), a.cg_damping)
    step, _ = trust_region_step(conjugate_gradient(fvp, g, a.cg_iters), fvp, a.max_kl)
    step = unflatten(step, theta)

    def evaluate(size):
        new = {k: (theta[k] - size * step[k]).detach().requires_grad_() for k in theta}
        ls, ks = [], []
        for t in range(T):
            out = _per_task(d, new, t, False).detach()
            ratio = torch.exp(gaussian_log_prob(out, d.av[t]) - olds[t][1])
            ls.append(-(ratio * d.advv[t] * d.wv[t]).sum())
            ks.append((gaussian_kl(out, olds[t][0]) * d.wv[t]).sum())
        return torch.stack(ls).mean().item(), torch.stack(ks).mean().item()

    size, _, _, _ = line_search(evaluate, loss.item(), a.max_kl, a.ls_steps, a.ls_backtrack)
    return {k: -size * step[k] for k in theta}  # the update theta_new - theta


def adapt_loop(d):
    """The adaptation before the validation rollouts are sampled, the per-task way: advantages
    (the same baseline fit + GAE as MAMLTRPO.batch), then one inner step per task of the
    unbatched policy. Returns the per-task adapted parameters."""
    a = d.agent
    x, y = a._inner(*a.batch(d.train))
    theta = {k: p.detach().requires_grad_() for k, p in a.fn.params().items()}
    out = []
    for t in range(x.shape[0]):
        loss = pg_loss(plain_policy(theta, x[t]), y[t])
        g = torch.autograd.grad(loss, list(theta.values()))
        out.append({k: (p - a.fast_lr * gk).detach() for (k, p), gk in zip(theta.items(), g)})
    return out


def phase_loop(d):
    """The optimisation phase of one MAML-TRPO iteration (everything but env stepping), per task:
    :func:`adapt_loop` then :func:`step_loop`. Returns the update of theta."""
    adapt_loop(d)
    return step_loop(d)


def phase_fastmeta(d):
    """The same phase by fastmeta: ``agent.adapt(train)`` (the parameters the validation
    rollouts are sampled with) then ``agent.step(train, valid)``. Returns the update of theta
    (the policy is updated in place, as the trainer does)."""
    a = d.agent
    before = {k: p.detach().clone() for k, p in a.fn.params().items()}
    a.adapt(d.train)
    a.step(d.train, d.valid)
    return {k: p.detach() - before[k] for k, p in a.fn.params().items()}
