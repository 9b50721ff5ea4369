"""MAML-TRPO: gradient-based meta-RL (Finn et al., "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", ICML 2017, section 5.3), all T tasks batched.

One meta-iteration, given each task's train rollouts (sampled with ``theta``; for k > 1 inner
steps, one batch per step, batch i sampled with the task's i-step iterate ``phi_i``) and
validation rollouts (sampled with the task's adapted parameters)::

    advantages   <- linear feature baseline + GAE per task, standardised   (returns.py)
    phi_t        <- k policy-gradient steps from theta, step i on task t's train batch i, all
                    tasks at once (fastmeta.ops.inner_update)
    g            <- grad_theta mean_t L_t(phi_t(theta)), L_t = -masked mean of ratio * advantage
                    on the validation data; = sum_t J_t^T grad_phi L_t     (meta_fvp.py)
    x            <- conjugate gradient on F_meta x = g, F_meta the meta-objective's Fisher as
                    batched Hessian-vector products and analytic Gaussian Fisher products
    theta        <- theta - s * x / sqrt(x^T F x / (2 max_kl)) (F x = g - r, CG's own
                    residual: no 11th product), s backtracked until the
                    surrogate improves and mean_t KL < max_kl; every try re-adapts all tasks
                    in one batched call                                      (trpo.py)

Defaults are pytorch-maml-rl's: fast lr 0.1, one inner step, max KL 1e-2, 10 CG iterations,
damping 1e-5, 15 line-search steps x 0.8, gamma 0.99, GAE lambda 1.0.

Sampling loop the trainer runs (``dist``/``sample`` from fastmeta.rl)::

    agent = MAMLTRPO(GaussianMLPPolicy(dist.obs_dim, dist.act_dim))
    tasks = dist.sample_tasks(T, seed)
    train = sample(dist, agent.actor(None, gen), tasks, E, seed1)          # theta for every task
    valid = sample(dist, agent.actor(agent.adapt(train), gen), tasks, E, seed2)
    metrics = agent.step(train, valid)     # updates agent.policy in place

With k > 1 inner steps, ``train`` is a list: ``trains = [train_0]``, then for i = 1..k-1
``trains.append(sample(dist, agent.actor(agent.adapt(trains), gen), ...))`` (``adapt`` of a
list takes one step per batch), as pytorch-maml-rl and Finn et al.'s code resample after every
inner step. A single Rollout given with k > 1 is reused by every step (cheaper, but steps
after the first then use data of an earlier policy without importance weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmeta import distributed
from fastmeta.func import task_function
from fastmeta.rl.meta_fvp import MetaFisher, adapt, adapt_analytic
from fastmeta.rl.categorical import CategoricalMLPPolicy
from fastmeta.rl.policy import GaussianMLPPolicy
from fastmeta.rl.returns import check_padded, discounted_returns, gae, linear_baseline, normalize
from fastmeta.rl.trpo import conjugate_gradient, flatten, line_search, trust_region_step, unflatten


class MAMLTRPO:
    """The MAML-TRPO agent over a task-batched Gaussian policy (see the module docstring).

    Args:
        policy: a :class:`fastmeta.rl.GaussianMLPPolicy` (continuous actions) or
            :class:`fastmeta.rl.CategoricalMLPPolicy` (discrete); updated in place by :meth:`step`.
        fast_lr: inner step size alpha. inner_steps: k inner policy-gradient steps (step i on
            train batch i, or all on one batch: see the module docstring). gamma, gae_lambda:
            discount and GAE lambda.
        max_kl, cg_iters, cg_damping, ls_steps, ls_backtrack: the TRPO outer step.
        baseline_reg: ridge coefficient of the linear feature baseline.
        hvp: inner-loss Hessian products for the meta-Fisher: ``"analytic"`` (cached R-operator,
            fastmeta.rl.curvature) or ``"task_hvp"`` (fastmeta.func.task_hvp); both exact.
    """

    def __init__(self, policy, fast_lr: float = 0.1, inner_steps: int = 1, gamma: float = 0.99,
                 gae_lambda: float = 1.0, max_kl: float = 1e-2, cg_iters: int = 10, cg_damping: float = 1e-5,
                 ls_steps: int = 15, ls_backtrack: float = 0.8, baseline_reg: float = 1e-5,
                 hvp: str = "analytic"):
        if not isinstance(policy, (GaussianMLPPolicy, CategoricalMLPPolicy)):
            raise TypeError("policy must be a fastmeta.rl.GaussianMLPPolicy or CategoricalMLPPolicy, "
                            f"got {type(policy).__name__}")
        if not fast_lr > 0:
            raise ValueError(f"fast_lr must be > 0, got {fast_lr!r}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be a positive int, got {inner_steps!r}")
        self.policy, self.fn = policy, task_function(policy)
        self.fast_lr, self.inner_steps = float(fast_lr), inner_steps
        self.gamma, self.gae_lambda, self.baseline_reg = gamma, gae_lambda, baseline_reg
        self.max_kl, self.cg_iters, self.cg_damping = max_kl, cg_iters, cg_damping
        self.ls_steps, self.ls_backtrack, self.hvp = ls_steps, ls_backtrack, hvp

    # ---- data ---------------------------------------------------------------------------------

    def batch(self, rollout, what: str = "rollout") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(obs [T, N, obs_dim], actions, advantages [T, N], weights [T, N])`` with ``N = E * H``
        (actions ``[T, N, act_dim]`` in the policy's dtype, or ``[T, N]`` int64 when discrete):
        standardised GAE advantages over the per-task linear baseline, and ``weights = mask /
        (task's mask sum)`` (each task's masked mean)."""
        for f in ("obs", "actions", "rewards", "mask"):
            if not hasattr(rollout, f):
                raise TypeError(f"{what} must have .obs/.actions/.rewards/.mask (a fastmeta.rl.Rollout), "
                                f"got {type(rollout).__name__}")
        p = self.policy
        dtype = next(p.parameters()).dtype
        rewards, mask = rollout.rewards.to(dtype), rollout.mask.to(dtype)
        T, E, H = check_padded(rewards, mask, f"{what}.rewards")
        shape = (T, E, H) if p.discrete else (T, E, H, p.act_dim)
        for f, want in (("obs", (T, E, H, p.obs_dim)), ("actions", shape)):
            t = getattr(rollout, f)
            if tuple(t.shape) != want:
                dims = ", ".join(["T", "E", "H"] + [str(d) for d in want[3:]])
                raise ValueError(f"{what}.{f} must have shape [{dims}] = {want}, got {tuple(t.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{what}.{f} has non-finite values")
        if p.discrete:
            a = rollout.actions
            if a.is_floating_point() or bool(((a < 0) | (a >= p.act_dim)).any()):
                raise ValueError(f"{what}.actions must be integer indices in [0, {p.act_dim}), got {a.dtype} "
                                 f"in [{a.min().item()}, {a.max().item()}]")
        if (mask.sum((1, 2)) <= 0).any():
            raise ValueError(f"{what}.mask has a task with no steps")
        obs = rollout.obs.to(dtype)
        returns = discounted_returns(rewards, mask, self.gamma)
        values = linear_baseline(obs, returns, mask, self.baseline_reg)
        adv = normalize(gae(rewards, values, mask, self.gamma, self.gae_lambda), mask)
        weights = mask / mask.sum((1, 2), keepdim=True)
        N = E * H
        actions = rollout.actions.reshape(T, N) if p.discrete else rollout.actions.to(dtype).reshape(T, N, -1)
        return obs.reshape(T, N, -1), actions, adv.reshape(T, N), weights.reshape(T, N)

    def _inner(self, obs, actions, adv, weights):
        """``(x, y)`` for the inner loss ``policy.loss`` (weights scaled so that the per-task mean
        over the N states is the masked mean)."""
        return obs, self.policy.pack(actions, adv * weights * weights.shape[1])

    def _train_data(self, train, steps: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Per inner step ``(xs, ys)`` lists from ``train``: one rollout (every step uses it:
        ``steps`` or ``inner_steps`` steps) or a list or tuple of rollouts (one step each; with
        ``steps`` given, exactly that many)."""
        if isinstance(train, (list, tuple)):
            if not train:
                raise ValueError("train is an empty list; give one rollout per inner step")
            if steps is not None and len(train) != steps:
                raise ValueError(f"train has {len(train)} rollouts for {steps} inner steps: give "
                                 f"one per step (batch i sampled with the i-step iterate) or a "
                                 f"single rollout")
            batches = [self.batch(r, f"train[{i}]") for i, r in enumerate(train)]
            T = {b[0].shape[0] for b in batches}
            if len(T) != 1:
                raise ValueError(f"train's rollouts have different task counts {sorted(T)}; "
                                 f"they must match")
            data = [self._inner(*b) for b in batches]
            return [d[0] for d in data], [d[1] for d in data]
        x, y = self._inner(*self.batch(train, "train"))
        k = self.inner_steps if steps is None else steps
        return [x] * k, [y] * k

    # ---- acting --------------------------------------------------------------------------------

    def theta(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.fn.params().items()}

    def adapt(self, train, theta: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per-task adapted parameters ``{name: [T, *shape]}`` from ``theta`` (default the
        policy's own), detached: ``inner_steps`` steps on one rollout ``train``, or one step per
        rollout of a list (``len(train)`` steps: the iterate the next batch is sampled with).

        With ``hvp="analytic"`` the steps use the policy's analytic gradient (autograd's up to
        rounding; a categorical policy takes autograd). The inner-Hessian operators built on
        the way are kept: :meth:`step` on the same ``train`` reuses them, provided theta and
        the rollouts' tensors are unchanged (checked by identity and version counters)."""
        xs, ys = self._train_data(train)
        start = self.fn.expand(xs[0].shape[0], self.theta() if theta is None else theta)
        iters, hvps = self._iterates(start, xs, ys)
        # kept for step(train, valid): the inner-Hessian operators of these iterates are the ones
        # its meta-Fisher needs, so a step on the same train (unchanged theta and rollouts)
        # builds none again. Held until the next adapt or step (a few [T, N, width] tensors).
        keep = theta is None and self.hvp == "analytic"
        self._adapted = (self._adaptation_key(train), xs, ys, iters, hvps) if keep else None
        return iters[-1]

    def _iterates(self, start, xs, ys):
        """``(iterates, hvps)``: the inner iterates from ``start``, one step per entry of
        ``xs``/``ys``, detached; with ``hvp="analytic"`` by the policy's analytic gradient, with
        the inner-Hessian operators built on the way (None for autograd or a policy without
        them)."""
        if self.hvp == "analytic":
            return adapt_analytic(self.policy, start, xs, ys, self.fast_lr, len(xs))
        return adapt(self.policy, start, xs, ys, self.fast_lr, len(xs)), None

    def _adaptation_key(self, train) -> tuple:
        """What :meth:`adapt`'s result depends on: the rollout objects and the versions of their
        tensors, theta's tensors and versions, and the hyperparameters of the data and the steps."""
        rollouts = list(train) if isinstance(train, (list, tuple)) else [train]
        data = tuple(tuple(getattr(r, f)._version for f in ("obs", "actions", "rewards", "mask"))
                     for r in rollouts)
        params = tuple((p.data_ptr(), p._version, p.dtype) for p in self.fn.params().values())
        hyper = (isinstance(train, (list, tuple)), self.fast_lr, self.gamma, self.gae_lambda,
                 self.baseline_reg, self.hvp)
        return rollouts, data, params, hyper

    def _cached_adaptation(self, train, steps: int):
        """``(xs, ys, iterates, hvps)`` that :meth:`adapt` made for this ``train`` at the current
        theta with ``steps`` inner steps, or None; the cache is used once."""
        cached, self._adapted = getattr(self, "_adapted", None), None
        if cached is None or len(cached[1]) != steps:
            return None
        try:
            key = self._adaptation_key(train)
        except (AttributeError, TypeError):  # not rollouts: step's own checks say what is wrong
            return None
        rollouts, *rest = cached[0]
        if len(rollouts) != len(key[0]) or any(a is not b for a, b in zip(rollouts, key[0])):
            return None
        return cached[1:] if tuple(rest) == key[1:] else None

    def actor(self, params: dict[str, Tensor] | None = None, generator: torch.Generator | None = None):
        """``callable(obs [T, E, obs_dim]) -> actions`` for the sampler (``[T, E, act_dim]`` float32,
        or ``[T, E]`` int64 for a categorical policy)."""
        return self.policy.actor(params, generator)

    # ---- the meta-step ------------------------------------------------------------------------

    def _surrogate(self, phi, xv, av, advv, wv, logp_old, out_old, out=None):
        out = self.fn(phi, xv) if out is None else out
        ratio = torch.exp(self.policy.log_prob(out, av) - logp_old)
        loss = -(ratio * advv * wv).sum(1).mean()
        kl = (self.policy.kl(out, out_old) * wv).sum(1).mean()
        return loss, kl

    def step(self, train, valid) -> dict[str, float]:
        """One outer TRPO step on ``train``/``valid`` rollouts of the same T tasks (``valid``
        sampled with the adapted parameters of :meth:`adapt`). ``train``: one rollout, or a list
        of ``inner_steps`` rollouts (batch i sampled with the i-step iterate). Updates the
        policy in place.

        Returns floats: ``pre_return``/``post_return`` (mean undiscounted episode return of the
        train (its first batch) / valid rollouts: before / after adaptation),
        ``loss_before``/``loss_after`` (the surrogate), ``kl`` (mean_t KL of the accepted step),
        ``step_size`` (0: rejected), ``ls_tries``, ``grad_norm``.

        Under torchrun (:mod:`fastmeta.distributed`), each rank passes the rollouts of its own
        tasks (the same number on every rank): the meta-gradient, every Fisher-vector product of
        conjugate gradient, the surrogate and KL of each line-search try and the returned
        metrics are averaged over the ranks, so every rank takes the same step (the step of the
        mean objective over all ranks' tasks).
        """
        cached = self._cached_adaptation(train, self.inner_steps)
        if cached is not None:  # adapt(train) made them (the iterate valid was sampled with)
            x, y, iters, hvps = cached
        else:
            x, y = self._train_data(train, self.inner_steps)
        xv, av, advv, wv = self.batch(valid, "valid")
        if xv.shape[0] != x[0].shape[0]:
            raise ValueError(f"train has T={x[0].shape[0]} tasks but valid has T={xv.shape[0]}; "
                             f"they must match")
        theta = self.theta()
        T = xv.shape[0]
        if cached is None:  # with hvp="analytic", the operators MetaFisher reuses
            iters, hvps = self._iterates(self.fn.expand(T, theta), x, y)
        if self.hvp == "analytic" and not self.policy.discrete:
            # The surrogate's gradient at phi_old, where its ratio is 1, is the gradient of the
            # inner policy-gradient loss with weights adv * w * M / T (the mean over tasks of
            # the per-task means over M states). The Fisher's build gives it from its own
            # forward over the validation states, and that forward's mean is the old policy.
            M = xv.shape[1]
            target = self.policy.pack(av, advv * wv * (M / T))
            mf = MetaFisher(self.policy, iters, x, y, self.fast_lr, xv, wv, self.cg_damping,
                            self.hvp, hvps=hvps, target=target)
            mu = mf.fisher.mu
            out_old = torch.cat([mu, iters[-1]["log_std"].unsqueeze(1).expand_as(mu)], dim=-1)
            logp_old = self.policy.log_prob(out_old, av)
            loss, _ = self._surrogate(None, xv, av, advv, wv, logp_old, out_old, out_old)
            g_phi = [mf.fisher.grad[k] for k in self.fn.names]
        else:
            with torch.enable_grad():
                phi = {k: v.detach().requires_grad_() for k, v in iters[-1].items()}
                out = self.fn(phi, xv)  # at phi_old: the old policy is this output, detached
                out_old = out.detach()
                logp_old = self.policy.log_prob(out_old, av)
                loss, _ = self._surrogate(phi, xv, av, advv, wv, logp_old, out_old, out)
                g_phi = torch.autograd.grad(loss, [phi[k] for k in self.fn.names])
            mf = MetaFisher(self.policy, iters, x, y, self.fast_lr, xv, wv, self.cg_damping,
                            self.hvp, hvps=hvps)
        g = flatten({k: t.sum(0) for k, t in mf.vjp(dict(zip(self.fn.names, g_phi))).items()})
        distributed.all_reduce_mean_([g])
        loss_before = distributed.mean_over_ranks(loss.item()).item()
        if not bool(g.any()):  # e.g. every advantage is 0: no direction, keep theta
            return self._metrics(train, valid, loss_before, loss_before, 0.0, 0.0, 0, 0.0)

        def fvp(v: Tensor) -> Tensor:
            out = mf.fvp(v)
            distributed.all_reduce_mean_([out])
            return out

        # F direction from CG's residual (b - r): the trust-region scale takes no 11th product
        direction, f_dir = conjugate_gradient(fvp, g, self.cg_iters, return_product=True)
        step, _ = trust_region_step(direction, fvp, self.max_kl, product=f_dir)
        step = unflatten(step, theta)

        def evaluate(size: float) -> tuple[float, float]:
            new = {k: theta[k] - size * step[k] for k in theta}
            with torch.no_grad():
                phi_new = self._iterates(self.fn.expand(T, new), x, y)[0][-1]
                loss_new, kl = self._surrogate(phi_new, xv, av, advv, wv, logp_old, out_old)
            loss_new, kl = distributed.mean_over_ranks([loss_new.item(), kl.item()]).tolist()
            return loss_new, kl

        size, tries, loss_after, kl = line_search(evaluate, loss_before, self.max_kl, self.ls_steps, self.ls_backtrack)
        if size > 0:
            with torch.no_grad():
                for k, p in self.fn.params().items():
                    p.sub_(size * step[k])
        return self._metrics(train, valid, loss_before, loss_after if size > 0 else loss_before,
                             kl if size > 0 else 0.0, size, tries, g.norm().item())

    @staticmethod
    def _metrics(train, valid, loss_before, loss_after, kl, size, tries, grad_norm) -> dict[str, float]:
        if isinstance(train, (list, tuple)):
            train = train[0]  # sampled with theta
        pre, post = distributed.mean_over_ranks([(r.rewards * r.mask).sum(-1).mean().item() for r in (train, valid)])
        return {
            "pre_return": pre.item(),
            "post_return": post.item(),
            "loss_before": loss_before, "loss_after": loss_after, "kl": kl, "step_size": size,
            "ls_tries": tries, "grad_norm": grad_norm,
        }
