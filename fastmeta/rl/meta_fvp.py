"""The Fisher-vector product of the MAML meta-objective, from task-batched HVPs.

MAML-TRPO (Finn et al. 2017, section 5.3) constrains ``mean_t KL(pi_{phi_t(theta_old)} ||
pi_{phi_t(theta)})`` where ``phi_t(theta)`` is task t's policy after k inner policy-gradient
steps ``phi_{i+1} = phi_i - alpha grad L_t(phi_i)``. At ``theta = theta_old`` the KL's gradient
w.r.t. ``phi_t`` is zero, so the second-order term through ``d^2 phi / d theta^2`` vanishes and
its Hessian is exactly

    F_meta v = (1/T) sum_t J_t^T F_t J_t v,   J_t = (I - alpha H_{t,k-1}) ... (I - alpha H_{t,0})

with ``H_{t,i}`` the inner-loss Hessian at iterate i (on the train data of step i) and
``F_t`` the analytic Gaussian Fisher of the adapted policy on task t's validation states
(fastmeta.rl.curvature; the categorical policy's ``J^T (diag p - p p^T) J``). Each product is
2k batched HVPs plus one batched Fisher product, all tasks at once; no per-task loop, no
third-order graph. The HVPs are ``hvp="analytic"`` (default: fastmeta.rl.curvature.pg_hvp,
activations cached once per operator) or ``hvp="task_hvp"`` (:func:`fastmeta.func.task_hvp`,
double backward of the batched loss, recomputed per product); both are exact. (Peers -- pytorch-maml-rl,
learn2learn, garage -- double-backward through every task's inner graph per product.)

The outer gradient has the same structure: ``grad = sum_t J_t^T grad_phi L_out,t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmeta.func import task_function, task_losses
from fastmeta.ops import inner_update
from fastmeta.func import task_hvp


def per_step(data, steps: int, what: str = "x") -> list[Tensor]:
    """``data`` for each of ``steps`` inner steps: a tensor serves every step; a list or tuple
    must hold exactly ``steps`` tensors."""
    if isinstance(data, Tensor):
        return [data] * steps
    if not isinstance(data, (list, tuple)) or not all(isinstance(d, Tensor) for d in data):
        raise TypeError(f"{what} must be a tensor or a list of one tensor per inner step, got "
                        f"{type(data).__name__}")
    if len(data) != steps:
        raise ValueError(f"{what} has {len(data)} per-step tensors for {steps} inner steps")
    return list(data)


def adapt(policy, params: dict[str, Tensor], x: Tensor, y: Tensor, lr: float, steps: int = 1,
          create_graph: bool = False) -> list[dict[str, Tensor]]:
    """The inner iterates ``[phi_0 = params, phi_1, ..., phi_steps]`` for T tasks at once.

    ``params {name: [T, *shape]}``; ``x [T, N, obs_dim]`` train states; ``y`` the targets
    ``policy.pack(actions, weights)`` of the inner loss ``policy.loss``; each step is one
    batched backward of the summed per-task losses and one :func:`fastmeta.ops.inner_update`.
    ``x`` and ``y`` may instead be lists of ``steps`` tensors: step i then uses ``x[i], y[i]``
    (train data sampled with ``phi_i``, as pytorch-maml-rl and Finn et al. resample after every
    inner step); a single tensor serves every step.
    With ``create_graph`` the iterates stay differentiable (second-order MAML by autograd);
    otherwise they are detached (what the structured product needs).
    """
    fn = task_function(policy)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    xs, ys = per_step(x, steps, "x"), per_step(y, steps, "y")
    names = list(fn.names)
    cur = dict(params) if create_graph else {k: params[k].detach() for k in names}
    out = [cur]
    for i in range(steps):
        with torch.enable_grad():
            p = cur if create_graph else {k: v.detach().requires_grad_() for k, v in cur.items()}
            loss = task_losses(policy.loss, fn(p, xs[i]), ys[i]).sum()
            g = torch.autograd.grad(loss, [p[k] for k in names], create_graph=create_graph)
        nxt = inner_update({k: p[k] for k in names}, list(g), lr)
        cur = nxt if create_graph else {k: v.detach() for k, v in nxt.items()}
        out.append(cur)
    return out


def adapt_analytic(policy, params: dict[str, Tensor], x, y, lr: float, steps: int = 1):
    """:func:`adapt` (detached) from the policy's analytic inner-Hessian operators:
    ``(iterates, hvps)`` with ``hvps[i] = policy.hvp(iterates[i], x_i, y_i)`` whose ``.grad``
    made step i, so :class:`MetaFisher` needs no second forward/backward over the train data.
    ``(adapt(...), None)`` for a policy without them (categorical)."""
    xs, ys = per_step(x, steps, "x"), per_step(y, steps, "y")
    cur = {k: t.detach() for k, t in params.items()}
    out, ops = [cur], []
    for i in range(steps):
        op = policy.hvp(cur, xs[i], ys[i])
        if op is None:
            return adapt(policy, params, xs, ys, lr, steps), None
        names = list(cur)
        cur = inner_update({k: cur[k] for k in names}, [op.grad[k] for k in names], lr)
        out.append(cur)
        ops.append(op)
    return out, ops


class MetaFisher:
    """``F_meta`` at ``theta_old`` as a product operator, built once per TRPO step.

    Args:
        policy: a :class:`fastmeta.rl.GaussianMLPPolicy` or :class:`fastmeta.rl.CategoricalMLPPolicy`
            (the policy protocol of fastmeta.rl.policy).
        iterates: :func:`adapt`'s list at ``theta_old`` (detached), ``[phi_0, ..., phi_k]``.
        x, y: the train batch the iterates were adapted on (see :func:`adapt`): tensors, or
            lists of one tensor per inner step.
        lr: the inner step size alpha.
        x_valid ``[T, M, obs_dim]``, weights ``[T, M]``: the validation states and the KL
            average's weights (each task's summing to 1).
        damping: added as ``damping * v`` (Tikhonov), as TRPO implementations do.
        hvp: ``"analytic"`` or ``"task_hvp"`` (see the module docstring); a policy without an
            analytic inner Hessian (categorical) always uses task_hvp.
        hvps: the inner-Hessian operators :func:`adapt_analytic` built at ``iterates[:-1]``
            (optional; reused instead of building them again).
        target: optional ``[T, M, act_dim + 1]`` targets of the policy's inner loss on the
            validation states (Gaussian policy only): the Fisher's build then also gives that
            loss's per-task gradient at the adapted parameters, ``self.fisher.grad``, from its
            own forward (``self.fisher.mu``: the mean of that forward).

    ``fvp(v)``: ``v`` a flat vector over the policy's parameters (``fn.names`` order) ->
    ``F_meta v + damping v``. ``vjp(u)``: per-task ``{name: [T, *shape]}`` -> ``J_t^T u_t``.
    """

    def __init__(self, policy, iterates, x, y, lr: float, x_valid: Tensor, weights: Tensor,
                 damping: float = 0.0, hvp: str = "analytic", hvps=None, target: Tensor | None = None):
        if hvp not in ("analytic", "task_hvp"):
            raise ValueError(f"hvp must be 'analytic' or 'task_hvp', got {hvp!r}")
        self.fn = task_function(policy)
        self.names = list(self.fn.names)
        self.iterates = iterates
        k = len(iterates) - 1
        self.x, self.y = per_step(x, k, "x"), per_step(y, k, "y")
        self.lr, self.damping = float(lr), float(damping)
        self.T = x_valid.shape[0]
        self.hvp = hvp
        self.loss = policy.loss
        if hvps is not None and hvp == "analytic":  # built by adapt_analytic at these iterates
            self.hvps = list(hvps)
        else:
            self.hvps = ([policy.hvp(it, xi, yi) for it, xi, yi in zip(iterates[:-1], self.x, self.y)]
                         if hvp == "analytic" else None)
        if self.hvps is not None and any(h is None for h in self.hvps):
            self.hvps = None  # no analytic inner Hessian for this policy: task_hvp serves
        self.fisher = (policy.fisher(iterates[-1], x_valid, weights) if target is None else
                       policy.fisher(iterates[-1], x_valid, weights, target))
        self.shapes = {k: tuple(iterates[0][k].shape[1:]) for k in self.names}

    def _step(self, i: int, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(I - alpha H_i) v`` for every task (H_i symmetric: serves J and J^T)."""
        if self.hvps is not None:
            hv = self.hvps[i](v)
        else:
            hv = task_hvp(self.fn, self.iterates[i], self.x[i], self.y[i], v, loss_fn=self.loss)
        return inner_update(v, hv, self.lr)

    def jvp(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        for i in range(len(self.iterates) - 1):
            v = self._step(i, v)
        return v

    def vjp(self, u: dict[str, Tensor]) -> dict[str, Tensor]:
        for i in range(len(self.iterates) - 2, -1, -1):
            u = self._step(i, u)
        return u

    def per_task(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """``J_t^T F_t J_t v_t`` for per-task ``v {name: [T, *shape]}``."""
        return self.vjp(self.fisher(self.jvp(v)))

    def fvp(self, v: Tensor) -> Tensor:
        shared, i = {}, 0
        for k in self.names:
            n = 1
            for s in self.shapes[k]:
                n *= s
            shared[k] = v[i : i + n].view(self.shapes[k]).expand(self.T, *self.shapes[k]).contiguous()
            i += n
        out = self.per_task(shared)
        return torch.cat([out[k].mean(0).reshape(-1) for k in self.names]) + self.damping * v
