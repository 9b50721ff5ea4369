"""``inner_loop``: k task-batched gradient steps as ONE autograd op with an exact,
activation-free second-order backward.

Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017
(second- and first-order MAML); Li et al., "Meta-SGD", 2017 (learned per-element step sizes).
The backward is reverse-mode through the k updates ``theta_{i+1} = theta_i - lr * g(theta_i)``
(the "backprop through the optimizer" recursion of Maclaurin et al., ICML 2015), with each
step's vector-Jacobian product ``v - H_i (lr * v)`` taken by one batched Hessian-vector
product (:func:`fastmeta.func.task_hvp`) that recomputes the step's activations.

Memory: the forward keeps the parameter iterates ``theta_0 .. theta_{k-1}`` (``theta_0`` is
usually a zero-copy ``expand`` view of the shared parameters) and nothing else -- each step's
activations are freed as soon as its gradient is taken. An unrolled ``create_graph=True`` loop
keeps every step's activations (and their double-backward graph) until the outer backward.

Cost: each step's forward and gradient run twice (forward pass, then recomputed in the
backward), so a meta-step does about one extra support forward+backward per inner step
compared with the unrolled loop. Measured memory and time against the unrolled loop:
``bench/results/inner_loop_hvp.md``.

``recompute=False`` trades that memory for the time: each step's gradient is taken with its
double-backward graph kept (``create_graph=True``) and the backward runs the Hessian-vector
products on those graphs (exactly the unrolled loop's memory, as learn2learn's clone/adapt;
same values). The default (``recompute=None``) does so for CPU tensors, where the
recomputation is a large share of a second-order meta-step (``bench/results/dropin.md``), as
long as the kept graphs' saved tensors total at most :data:`KEEP_BUDGET_MB` (1 GiB;
``FASTMETA_KEEP_GRAPHS_MB`` overrides it) -- the later steps are recomputed -- and recomputes
on other devices.

This is a model-level op (it runs the module), so it is a ``torch.autograd.Function``, not a
``torch.library`` custom op.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from fastmeta.func import _task_hvp as _hvp
from fastmeta.ops import checks, inner_update, registry


def _update(theta: list, grads: list, lrs: list) -> list:
    """One inner step for every tensor (the single place the update rule lives)."""
    if all(isinstance(lr, float) for lr in lrs) and len(set(lrs)) == 1:
        lrs = lrs[0]  # one python step size: inner_update's scalar fast path
    return inner_update(list(theta), list(grads), lrs if isinstance(lrs, float) else list(lrs))


def _module_state(fn):
    """Snapshot of the module's buffers (BatchNorm running statistics) so that the backward's
    recomputation does not update them a second time."""
    module = fn.module
    # running statistics kept as non-trainable Parameters (MAML-PyTorch's Learner) count too
    state = [*module.buffers(), *(p for _, p in module.named_parameters() if not p.requires_grad)]
    return [(b, b.detach().clone()) for b in state]


def _restore(state):
    with torch.no_grad():
        for b, saved in state:
            b.copy_(saved)


def _rng_devices(x):
    return [x.device] if x.device.type == "cuda" else []


class _InnerLoop(torch.autograd.Function):
    """Inputs: (plan, *params in fn.names order, *learnable lr tensors, [support_x when it
    requires grad under second order]).

    ``plan`` carries the configuration and the (detached) data; outputs are the adapted
    parameters in fn.names order.
    """

    @staticmethod
    def forward(ctx, plan, *tensors):
        n = len(plan.names)
        params = tensors[:n]
        lr_inputs = tensors[n:n + plan.n_lr]
        lrs = plan.lr_values(lr_inputs)
        theta = [p.detach() for p in params]
        iterates = []
        rng = []
        graphs = []
        keep, kept = plan.keep, 0
        for _ in range(plan.steps):
            iterates.append(theta)
            rng.append(torch.random.get_rng_state())
            if plan.cuda_rng:
                rng[-1] = (rng[-1], torch.cuda.get_rng_state(plan.x.device))
            if keep:
                # keep this step's double-backward graph for the backward (no recomputation),
                # while the kept graphs' saved tensors fit the budget
                leaves, g, nbytes = _hvp.grad_graph(plan.fn, dict(zip(plan.names, theta)), plan.x,
                                                    plan.y, plan.loss_fn)
                if plan.keep_budget is not None and kept + nbytes > plan.keep_budget:
                    keep = False  # this and the later steps are recomputed by the backward
                    graphs.append(None)
                else:
                    kept += nbytes
                    graphs.append((leaves, g))
                grads = {k: torch.zeros_like(t) if gi is None else gi.detach()
                         for k, t, gi in zip(plan.names, theta, g)}
                del leaves, g
            else:
                graphs.append(None)
                _, grads = plan.grad(dict(zip(plan.names, theta)))
            theta = _update(theta, [grads[k] for k in plan.names], lrs)
        ctx.plan = plan
        ctx.rng = rng
        ctx.graphs = graphs if any(gr is not None for gr in graphs) else []
        flat = [t for it in iterates for t in it]
        ctx.save_for_backward(*flat, *lr_inputs)
        return tuple(t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(theta, params))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out):
        plan = ctx.plan
        names, n, k = plan.names, len(plan.names), plan.steps
        saved = ctx.saved_tensors
        iterates = [saved[i * n:(i + 1) * n] for i in range(k)]
        lr_inputs = saved[k * n:]
        lrs = plan.lr_values(lr_inputs)
        dx = torch.zeros_like(plan.x) if plan.x_grad else None
        v = [
            torch.zeros_like(it0) if g is None else g.to(it0.dtype)
            for g, it0 in zip(grad_out, iterates[0])
        ]
        want_lr = any(ctx.needs_input_grad[1 + n:1 + n + plan.n_lr])
        if plan.first_order and not want_lr:
            return (None, *v, *[None] * plan.n_lr)
        d_lr = [torch.zeros_like(t) for t in lr_inputs]
        state = _module_state(plan.fn)
        with torch.random.fork_rng(devices=_rng_devices(plan.x), enabled=True):
            for i in reversed(range(k)):
                cpu_state = ctx.rng[i]
                if plan.cuda_rng:
                    cpu_state, cuda_state = cpu_state
                    torch.cuda.set_rng_state(cuda_state, plan.x.device)
                torch.random.set_rng_state(cpu_state)
                theta = dict(zip(names, iterates[i]))
                if ctx.graphs and ctx.graphs[i] is not None:
                    # (a second backward, retain_graph=True, finds it used and recomputes)
                    leaves, g = ctx.graphs[i]
                    ctx.graphs[i] = None  # free step i's graph as soon as it is used
                    u = [(vv * lr).to(vv.dtype) for vv, lr in zip(v, lrs)]
                    grads, hv = _hvp.hvp_from_graph(names, leaves, g, u)
                elif plan.first_order:
                    _, grads = plan.grad(theta)
                    hv = None
                else:
                    u = {kk: (vv * lr).to(vv.dtype) for kk, vv, lr in zip(names, v, lrs)}
                    if plan.x_grad:
                        _, grads, hv, xu = _hvp.hvp_reference(
                            plan.fn, theta, plan.x, plan.y, u, plan.loss_fn, x_grad=True
                        )
                        dx = dx - xu
                    else:
                        _, grads, hv = _hvp.run_backend(
                            plan.backend, plan.fn, theta, plan.x, plan.y, u, plan.loss_fn
                        )
                if want_lr:
                    for j, (kk, vv) in enumerate(zip(names, v)):
                        slot = plan.lr_slot[j]
                        if slot is not None:
                            d = -(grads[kk] * vv).to(lr_inputs[slot].dtype)
                            d_lr[slot] = d_lr[slot] + _reduce_to(d, lr_inputs[slot].shape)
                if hv is not None:
                    v = [vv - hv[kk] for kk, vv in zip(names, v)]
        _restore(state)
        d_lr = [d.to(t.dtype) for d, t in zip(d_lr, lr_inputs)]
        return (None, *v, *d_lr, *([dx] if plan.x_grad else []))


def _reduce_to(d: torch.Tensor, shape) -> torch.Tensor:
    return d.sum() if len(shape) == 0 else d.sum_to_size(shape)


class _Plan:
    """Configuration of one inner_loop call (not a tensor input of the autograd.Function)."""

    def __init__(self, fn, x, y, steps, first_order, loss_fn, backend, lr_spec, n_lr, x_grad,
                 keep=False, keep_budget=None):
        self.fn, self.x, self.y = fn, x, y
        self.keep = keep  # keep each step's double-backward graph (the backward does not recompute)
        self.keep_budget = keep_budget  # bytes of saved tensors the kept graphs may hold (None: any)
        self.n_lr, self.x_grad = n_lr, x_grad
        self.names = tuple(fn.names)
        self.steps, self.first_order, self.loss_fn, self.backend = steps, first_order, loss_fn, backend
        # lr_spec: per name, either a python float or an index into the learnable-lr inputs
        self.lr_spec = lr_spec
        self.lr_slot = [s if isinstance(s, int) and not isinstance(s, bool) else None for s in lr_spec]
        # the forward's gradients: closed form for an MLP (no autograd graph at all)
        self.grad_backend = registry.select(_hvp.GRAD_OP, [x], fn=fn, loss_fn=loss_fn)
        self.cuda_rng = x.device.type == "cuda"

    def lr_values(self, lr_inputs):
        return [float(s[1]) if isinstance(s, tuple) else lr_inputs[s].detach() for s in self.lr_spec]

    def grad(self, theta: dict):
        return _hvp.run_grad(self.grad_backend, self.fn, theta, self.x, self.y, self.loss_fn)


def _check_lr(lr, names, params):
    """-> (lr_spec per name, learnable lr tensors). A spec entry is ('const', float) or an
    index into the tensor list."""
    if isinstance(lr, dict):
        unknown = [k for k in lr if k not in names]
        missing = [k for k in names if k not in lr]
        if unknown:
            raise ValueError(f"lr has unknown keys {unknown}; the model's parameters are {list(names)}")
        if missing:
            raise ValueError(f"lr is missing keys {missing}; give a learning rate for each of {list(names)}")
        spec, tensors = [], []
        for k in names:
            v = checks.lr_value(f"lr[{k!r}]", lr[k], params[k], repr(k))
            if isinstance(v, torch.Tensor):
                spec.append(len(tensors))
                tensors.append(v)
            else:
                spec.append(("const", v))
        return spec, tensors
    v = checks.lr_value("lr", lr, one_of="a dict name -> float or tensor")
    if isinstance(v, torch.Tensor):
        return [0] * len(names), [v.reshape(())]
    return [("const", v)] * len(names), []


KEEP_BUDGET_MB = 1024
"""Default budget (MiB) of the graphs ``inner_loop(recompute=None)`` keeps on a CPU: steps are
kept while their saved tensors total at most this; the later steps are recomputed. The
environment variable ``FASTMETA_KEEP_GRAPHS_MB`` overrides it (0: always recompute). Graph
sizes per step and the memory this costs against the recomputing design:
``bench/results/design_notes.md``, ``bench/results/maml_memory_keep.md``."""


def keep_budget_bytes() -> int:
    """The budget in bytes (``FASTMETA_KEEP_GRAPHS_MB``, else :data:`KEEP_BUDGET_MB`)."""
    raw = os.environ.get("FASTMETA_KEEP_GRAPHS_MB")
    try:
        mb = float(raw) if raw is not None else KEEP_BUDGET_MB
    except ValueError:
        raise ValueError(f"FASTMETA_KEEP_GRAPHS_MB must be a number of MiB, got {raw!r}") from None
    return int(mb * 2**20)


def _keep_graphs(support_x, backend, first_order, x_grad, recompute, diff_inputs) -> tuple[bool, int | None]:
    """``(keep, budget)``: whether the forward keeps its steps' double-backward graphs, and
    the byte budget they may hold (None: any) -- the ``recompute`` rule of :func:`inner_loop`."""
    budget = None
    if recompute is None:
        recompute = support_x.device.type != "cpu"
        budget = keep_budget_bytes()
    keep = (not recompute and backend == "reference" and not first_order and not x_grad
            and torch.is_grad_enabled() and any(t.requires_grad for t in diff_inputs))
    return keep, budget


CHUNK_STEP_MB = 128
"""Target size (MiB) of one chunk's inner-step graph for :func:`auto_task_chunk`: on this
repository's 2-core CPU, learn2learn's MiniImagenetCNN (28 MB of saved tensors per task and
step at 5-way 1-shot) ran its T=32 second-order meta-step fastest in chunks of 2-8 tasks
(55-220 MB per step; 1.16x faster than one chunk of 32 at k=1, 1.9x at k=5, where one
chunk's five graphs no longer fit the keep budget): ``bench/results/dropin.md``."""

_STEP_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # TaskFunction -> {key: bytes per task}


def auto_task_chunk(model, params: dict[str, torch.Tensor], support_x: torch.Tensor, support_y: torch.Tensor,
                    steps: int, first_order: bool = False, loss_fn=F.cross_entropy) -> int | None:
    """Tasks per chunk for a task-chunked meta-loss on this inner loop, or None (all at once).

    A number only where :func:`inner_loop` (``recompute=None``) keeps its steps' graphs: CPU
    tensors, second order, the double-backward HVP strategy, gradients enabled. Then the
    chunk is the largest (balanced) number of tasks whose step graph holds at most
    :data:`CHUNK_STEP_MB` and whose ``steps`` graphs fit the keep budget
    (:func:`keep_budget_bytes`), so that no step is recomputed and each step's tensors stay
    small; None when all ``T`` tasks fit. The graph size of one task is measured once per
    model, training mode and per-task data shape/dtype/loss (one task's support forward and
    gradient with its graph, run with the module's buffers and the RNG restored afterwards)
    and cached with the model's :class:`~fastmeta.func.TaskFunction`.

    The chunked meta-loss (``MAML.meta_loss(task_chunk=c)``) gives the same loss and
    gradients as one chunk up to float rounding (the sum over tasks is taken per chunk).
    """
    fn = _hvp.task_fn(model)
    T = support_x.shape[0]
    steps = checks.steps_value(steps)
    names = tuple(fn.names)
    if T <= 1 or steps == 0 or not names or support_x.requires_grad:
        return None
    backend = registry.select(_hvp.HVP_OP, [params[names[0]], support_x], None, fn=fn, loss_fn=loss_fn)
    keep, budget = _keep_graphs(support_x, backend, bool(first_order), False, None, [params[k] for k in names])
    if not keep:
        return None
    module = fn.module
    key = (tuple(support_x.shape[1:]), support_x.dtype, tuple(support_y.shape[1:]), support_y.dtype,
           loss_fn, module.training)
    cache = _STEP_BYTES.setdefault(fn, {})
    if key not in cache:
        state = _module_state(fn)
        with torch.random.fork_rng(devices=_rng_devices(support_x), enabled=True):
            one = {k: params[k][:1].detach() for k in names}
            *_, nbytes = _hvp.grad_graph(fn, one, support_x[:1].detach(), support_y[:1].detach(), loss_fn)
        _restore(state)
        cache[key] = max(int(nbytes), 1)
    per_task = cache[key]
    most = int(CHUNK_STEP_MB * 2**20) // per_task
    if budget is not None:
        most = min(most, budget // (steps * per_task))
    if most >= T:
        return None
    n_chunks = -(-T // max(most, 1))
    return -(-T // n_chunks)


def inner_loop(
    model,
    params: dict[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
    lr,
    first_order: bool = False,
    loss_fn=F.cross_entropy,
    hvp_backend: str | None = None,
    recompute: bool | None = None,
) -> dict[str, torch.Tensor]:
    """``steps`` gradient steps on every task's support set at once, as one autograd op.

    For each task t (all T at once)::

        theta_0 = params[t];  theta_{i+1} = theta_i - lr * grad L_t(theta_i; support_t)

    Backward gives the EXACT meta-gradient w.r.t. ``params`` and (learnable) ``lr``: it walks
    the steps in reverse, ``v <- v - H_t(theta_i) (lr * v)`` and ``d lr += -g_i * v``, with one
    batched Hessian-vector product per step (:func:`fastmeta.func.task_hvp`) that recomputes
    the step's activations. The forward stores only ``theta_0 .. theta_{steps-1}``: memory
    grows with ``steps`` by the parameters, not the activations. ``first_order=True`` (FOMAML)
    treats each step's Jacobian as the identity (no HVPs; ``lr`` still gets ``-sum g_i * v``).

    Args:
        model: ``nn.Module`` (converted by :func:`fastmeta.func.task_function`) or a
            :class:`fastmeta.func.TaskFunction`.
        params: ``{name: [T, *shape]}`` for every requires-grad parameter, typically
            ``fn.expand(T)`` (views of the shared parameters: their gradient is the sum over
            tasks, which autograd does through the expand).
        support_x: ``[T, N, *in]``; support_y: ``[T, N, ...]`` (what ``loss_fn`` expects).
            A ``support_x`` that requires grad (e.g. features of a shared body, ANIL) gets
            its exact second-order gradient ``-sum_i (d g_i / d x)^T (lr * v_{i+1})`` from
            the double backward (the ``reference`` HVP backend is then used; forcing another
            raises ``ValueError``). With ``first_order=True`` it gets none: FOMAML treats the
            inner gradients as constants. ``support_y`` gets no gradient (``ValueError`` if it
            requires grad).
        steps: number of inner steps k >= 0; 0 returns ``params`` unchanged.
        lr: a float; a 0-d tensor (one learnable step size); or a dict name -> float or tensor
            broadcastable to ``[T, *shape]``: 0-d (per tensor), ``[*shape]`` (per element,
            shared by tasks, Meta-SGD) or ``[T, *shape]`` (per task). Tensors may require grad.
        first_order: first-order MAML (no second-order terms).
        loss_fn: per-example loss (``F.cross_entropy``, ``F.mse_loss`` or any callable
            ``(out, y)``); each task's loss is its mean over N, the inner objective is their sum.
        hvp_backend: force task_hvp's ``"analytic"``, ``"func"`` or ``"reference"``.
        recompute: True: the backward recomputes each step's activations (memory grows with
            ``steps`` by the parameters only); False: each step's double-backward graph is
            kept from the forward (the unrolled loop's memory, one support forward+backward
            per step less work); None: False for CPU tensors up to the graph budget
            (:data:`KEEP_BUDGET_MB`, the later steps recompute), True elsewhere. Only the
            double-backward (``reference``) strategy can keep graphs: with the analytic MLP
            kernels, ``func``, first order or a ``support_x`` that requires grad it recomputes.

    Returns:
        ``{name: [T, *shape]}`` adapted parameters, differentiable w.r.t. ``params`` and ``lr``
        (once: the backward itself is not differentiable).

    Randomness (dropout): the forward saves the RNG state before each step and the backward
    restores it, so each recomputation draws the same masks as the forward did (the global
    RNG is left as the forward left it). Module buffers (BatchNorm running statistics) are
    updated once per step by the forward, as in an unrolled loop, and not by the backward.

    Example::

        >>> fn = fastmeta.func.task_function(model)
        >>> fast = fastmeta.func.inner_loop(fn, fn.expand(T), sx, sy, steps=5, lr=0.4)
        >>> F.cross_entropy(fn(fast, qx).flatten(0, 1), qy.flatten()).backward()

    Equivalent PyTorch code (per task, keeping every step's graph)::

        p = params
        for _ in range(steps):
            losses = task_losses(loss_fn, fn(p, support_x), support_y)
            g = torch.autograd.grad(losses.sum(), list(p.values()), create_graph=not first_order)
            p = {k: t - lr[k] * gk for (k, t), gk in zip(p.items(), g)}
    """
    fn = _hvp.task_fn(model)
    T = _hvp.check_data(support_x, support_y, "support_x", "support_y")
    _hvp.check_param_dict(fn, "params", params, T)
    steps = checks.steps_value(steps)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    names = tuple(fn.names)
    spec, lr_tensors = _check_lr(lr, names, params)
    first_order = bool(first_order)
    if steps == 0:
        return {k: params[k] for k in names}
    if support_y.requires_grad and torch.is_grad_enabled():
        raise ValueError("support_y requires grad; inner_loop gives no gradient to the support targets: detach it")
    x_grad = not first_order and torch.is_grad_enabled() and support_x.requires_grad
    tensors = [params[names[0]], support_x] if names else [support_x]
    if x_grad:
        # (d g / d x)^T u comes out of the double backward only
        if hvp_backend not in (None, "reference"):
            raise ValueError(
                f"support_x requires grad: its second-order gradient (through the inner updates) "
                f"needs hvp_backend='reference' (double backward), got hvp_backend={hvp_backend!r}; "
                f"detach support_x or leave hvp_backend=None"
            )
        backend = registry.select(_hvp.HVP_OP, tensors, "reference", fn=fn, loss_fn=loss_fn)
    elif first_order and hvp_backend is None:
        backend = "none"
    else:
        backend = registry.select(_hvp.HVP_OP, tensors, hvp_backend, fn=fn, loss_fn=loss_fn)
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"recompute must be True, False or None, got {recompute!r}")
    keep, budget = _keep_graphs(support_x, backend, first_order, x_grad, recompute,
                                [*(params[k] for k in names), *lr_tensors])
    plan = _Plan(fn, support_x.detach(), support_y.detach(), steps, first_order, loss_fn, backend, spec,
                 len(lr_tensors), x_grad, keep, budget)
    out = _InnerLoop.apply(plan, *[params[k] for k in names], *lr_tensors, *([support_x] if x_grad else []))
    return dict(zip(names, out))
