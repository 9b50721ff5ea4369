"""inner_loop: exact second- and first-order meta-gradients (params and learned step sizes)
against a naive per-task loop with torch.autograd.grad(create_graph=True), in float64;
memory (only parameter iterates saved), randomness, bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close64
from torch import nn

from fastmeta.func import inner_loop, task_function
from fastmeta.nn import TaskConv4, TaskMLP

# torch's forward-AD decompositions (loaded by the first torch.func.jvp) call torch.jit.script
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

T, N_S, N_Q = 2, 5, 4
LR_KINDS = ["float", "scalar", "per_tensor", "per_element", "per_task"]


class Custom(nn.Module):
    """Not task-batchable (own parameter, custom forward): the generic torch.func.vmap path."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3) * 0.5 + 1)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(x * self.scale) + 0.1 * x.pow(2).sum(-1, keepdim=True))


def make(model_name):
    """(module, support_x, support_y, query_x, query_y, loss_fn) in float64."""
    if model_name == "mlp_ce":
        m = TaskMLP([3, 6, 6, 3], "relu")
        xs, xq = torch.randn(T, N_S, 3), torch.randn(T, N_Q, 3)
        ys, yq = torch.randint(0, 3, (T, N_S)), torch.randint(0, 3, (T, N_Q))
        loss = F.cross_entropy
    elif model_name == "mlp_mse":
        m = TaskMLP([1, 5, 5, 1], "tanh")
        xs, xq = torch.randn(T, N_S, 1), torch.randn(T, N_Q, 1)
        ys, yq = torch.sin(2 * xs), torch.sin(2 * xq)
        loss = F.mse_loss
    elif model_name == "conv4":
        m = TaskConv4(in_channels=1, n_way=3, hidden=4, image_size=16)
        xs, xq = torch.randn(T, N_S, 1, 16, 16), torch.randn(T, N_Q, 1, 16, 16)
        ys, yq = torch.randint(0, 3, (T, N_S)), torch.randint(0, 3, (T, N_Q))
        loss = F.cross_entropy
    else:
        m = Custom()
        xs, xq = torch.randn(T, N_S, 3), torch.randn(T, N_Q, 3)
        ys, yq = torch.randint(0, 3, (T, N_S)), torch.randint(0, 3, (T, N_Q))
        loss = F.cross_entropy
    m = m.double()
    return m, xs.double(), ys if ys.dtype == torch.long else ys.double(), xq.double(), \
        yq if yq.dtype == torch.long else yq.double(), loss


def make_lr(kind, own):
    def base(shape):
        return (0.2 + 0.2 * torch.rand(shape, dtype=torch.float64)).requires_grad_()

    if kind == "float":
        return 0.3
    if kind == "scalar":
        return base(())
    if kind == "per_tensor":
        return {k: base(()) for k in own}
    if kind == "per_element":
        return {k: base(p.shape) for k, p in own.items()}
    return {k: base((T, *p.shape)) for k, p in own.items()}


def lr_tensors(lr):
    if isinstance(lr, torch.Tensor):
        return [lr]
    if isinstance(lr, dict):
        return list(lr.values())
    return []


def per_task_forward(module, p_t, x_t):
    """One task's forward with its own parameters, no task batching involved for plain modules."""
    if isinstance(module, Custom):
        return torch.func.functional_call(module, p_t, (x_t,))
    return module(x_t[None], params={k: v[None] for k, v in p_t.items()})[0]


def naive_adapt(module, own, xs, ys, steps, lr, first_order, loss_fn):
    """Per-task loop (learn2learn style): autograd.grad(create_graph=not first_order)."""
    adapted = []
    for t in range(T):
        p = {k: v for k, v in own.items()}
        for _ in range(steps):
            loss = loss_fn(per_task_forward(module, p, xs[t]), ys[t])
            g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
            new = {}
            for (k, v), gk in zip(p.items(), g):
                if isinstance(lr, dict):
                    step = lr[k][t] if lr[k].dim() == v.dim() + 1 else lr[k]
                else:
                    step = lr
                new[k] = v - step * gk
            p = new
        adapted.append(p)
    return adapted


def meta_grads(module, xs, ys, xq, yq, loss_fn, steps, lr, first_order, backend, weights):
    own = task_function(module).params()
    wrt = list(own.values()) + lr_tensors(lr)
    fn = task_function(module)
    fast = inner_loop(module, fn.expand(T), xs, ys, steps, lr, first_order=first_order, loss_fn=loss_fn,
                      hvp_backend=backend)
    out = fn(fast, xq)
    q = torch.stack([loss_fn(out[t], yq[t]) for t in range(T)])
    got = torch.autograd.grad((q * weights).sum(), wrt, allow_unused=True)

    adapted = naive_adapt(module, own, xs, ys, steps, lr, first_order, loss_fn)
    q_ref = torch.stack([loss_fn(per_task_forward(module, adapted[t], xq[t]), yq[t]) for t in range(T)])
    want = torch.autograd.grad((q_ref * weights).sum(), wrt, allow_unused=True)
    torch.testing.assert_close(q.detach(), q_ref.detach(), rtol=1e-10, atol=1e-12)
    return got, want


# (model, hvp backend): the analytic HVP for the MLPs, torch.func for everything, the double
# backward reference for the generic path.
MODELS = [("mlp_ce", "analytic"), ("mlp_mse", "analytic"), ("mlp_mse", "func"), ("conv4", "func"),
          ("custom", "func"), ("custom", "reference")]


def _check(model_name, backend, steps, lr_kind, first_order):
    module, xs, ys, xq, yq, loss_fn = make(model_name)
    lr = make_lr(lr_kind, task_function(module).params())
    weights = torch.rand(T, dtype=torch.float64) + 0.5
    got, want = meta_grads(module, xs, ys, xq, yq, loss_fn, steps, lr, first_order, backend, weights)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:  # steps == 0: lr unused
            assert a is None or float(a.abs().max()) == 0
            continue
        assert_close64(a, b, name=f"meta-gradient {i}")
        assert a.dtype == torch.float64


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("model_name,backend", MODELS, ids=[f"{m}-{b}" for m, b in MODELS])
def test_meta_gradient_matches_naive_loop(model_name, backend, steps, first_order):
    # every lr kind is covered at k = 2 below; here the kind rotates with k
    _check(model_name, backend, steps, LR_KINDS[steps % len(LR_KINDS)], first_order)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("model_name,backend", [("mlp_ce", "analytic"), ("conv4", "func"), ("custom", "reference")])
def test_learned_lr_kinds(model_name, backend, lr_kind, first_order):
    _check(model_name, backend, 2, lr_kind, first_order)


def test_conv4_reference_backend():
    _check("conv4", "reference", 2, "per_element", False)


def test_default_backend_and_independent_per_task_params():
    """Default backend choice, and params that are per-task leaves (no expand)."""
    module, xs, ys, xq, yq, loss_fn = make("mlp_ce")
    fn = task_function(module)
    leaves = {k: (v.detach() + 0.1 * torch.randn(T, *v.shape, dtype=v.dtype)).requires_grad_()
              for k, v in fn.params().items()}
    fast = inner_loop(fn, leaves, xs, ys, 3, 0.25)
    out = fn(fast, xq)
    got = torch.autograd.grad(F.cross_entropy(out.flatten(0, 1), yq.flatten()), list(leaves.values()))
    p = dict(leaves)
    for _ in range(3):
        loss = F.cross_entropy(fn(p, xs).flatten(0, 1), ys.flatten(), reduction="none").view(T, -1).mean(1).sum()
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        p = {k: v - 0.25 * gk for (k, v), gk in zip(p.items(), g)}
    want = torch.autograd.grad(F.cross_entropy(fn(p, xq).flatten(0, 1), yq.flatten()), list(leaves.values()))
    for a, b in zip(got, want):
        assert_close64(a, b)


def test_steps_zero_returns_params():
    module, xs, ys, *_ = make("mlp_ce")
    fn = task_function(module)
    p = fn.expand(T)
    out = inner_loop(fn, p, xs, ys, 0, 0.1)
    assert all(out[k] is p[k] for k in p)


def test_saves_only_parameter_iterates():
    """The forward keeps theta_0..theta_{k-1} (and learnable lr): no activations."""
    module, xs, ys, *_ = make("conv4")
    fn = task_function(module)
    n_params = sum(p.numel() for p in fn.params().values())
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    for k in (1, 3, 6):
        out = inner_loop(fn, fn.expand(T), xs, ys, k, lr)
        saved = next(iter(out.values())).grad_fn.saved_tensors
        assert len(saved) == k * len(fn.names) + 1
        iterate_numel = sum(t.numel() for t in saved[:-1])
        assert iterate_numel == k * T * n_params
        assert saved[-1] is lr or saved[-1].shape == ()


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_gradient_to_support_inputs(first_order):
    """ANIL-style: support features of a shared body require grad; inner_loop gives them the
    exact second-order gradient (none under first order, like an autograd.grad loop without
    create_graph)."""
    body = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    head, *_ = make("mlp_ce")
    fn = task_function(head)
    xs, xq = torch.randn(T, N_S, 4, dtype=torch.float64), torch.randn(T, N_Q, 4, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (T, N_S)), torch.randint(0, 3, (T, N_Q))
    lr = {k: (0.3 + 0.1 * torch.rand(p.shape, dtype=torch.float64)).requires_grad_() for k, p in fn.params().items()}
    wrt = list(body.parameters()) + list(fn.params().values()) + list(lr.values())

    def query_loss(adapted):
        return F.cross_entropy(fn(adapted, body(xq)).flatten(0, 1), yq.flatten())

    got = torch.autograd.grad(query_loss(inner_loop(fn, fn.expand(T), body(xs), ys, 3, lr, first_order)), wrt)
    zs = body(xs)
    adapted = naive_adapt(head, fn.params(), zs, ys, 3, lr, first_order, F.cross_entropy)
    zq = body(xq)
    q = torch.stack([F.cross_entropy(per_task_forward(head, adapted[t], zq[t]), yq[t], reduction="sum")
                     for t in range(T)]).sum() / (T * N_Q)
    want = torch.autograd.grad(q, wrt)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close64(a, b, name=f"grad {i}")


def test_support_input_gradient_needs_reference_backend():
    module, xs, ys, *_ = make("mlp_ce")
    fn = task_function(module)
    xs = xs.requires_grad_()
    with pytest.raises(ValueError, match="needs hvp_backend='reference'"):
        inner_loop(fn, fn.expand(T), xs, ys, 1, 0.1, hvp_backend="analytic")
    with pytest.raises(ValueError, match="support_y requires grad"):
        inner_loop(fn, fn.expand(T), xs, torch.randn(T, N_S, 3, requires_grad=True), 1, 0.1, loss_fn=F.mse_loss)
    # first order: the support inputs get no gradient, as with autograd.grad(create_graph=False)
    out = inner_loop(fn, fn.expand(T), xs, ys, 2, 0.1, first_order=True)
    sum(v.sum() for v in out.values()).backward()
    assert xs.grad is None


def test_dropout_masks_are_replayed():
    """Random modules: the backward recomputes each step with the RNG state of its forward, so
    the meta-gradient equals the unrolled loop's drawn with the same seed."""
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.4), nn.Linear(8, 3)).double()
    fn = task_function(net)
    assert fn.mlp is None
    xs, xq = torch.randn(T, N_S, 3, dtype=torch.float64), torch.randn(T, N_Q, 3, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (T, N_S)), torch.randint(0, 3, (T, N_Q))
    own = list(fn.params().values())

    def query_loss(p):
        return F.cross_entropy(fn(p, xq).flatten(0, 1), yq.flatten())

    for backend in ("func", "reference"):
        torch.manual_seed(1)
        fast = inner_loop(fn, fn.expand(T), xs, ys, 3, 0.3, hvp_backend=backend)
        ql = query_loss(fast)
        after_forward = torch.random.get_rng_state()
        got = torch.autograd.grad(ql, own)
        assert torch.equal(torch.random.get_rng_state(), after_forward), "backward must not move the global RNG"

        torch.manual_seed(1)
        p = fn.expand(T)
        for _ in range(3):
            loss = F.cross_entropy(fn(p, xs).flatten(0, 1), ys.flatten(), reduction="none").view(T, -1).mean(1).sum()
            g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - 0.3 * gk for (k, v), gk in zip(p.items(), g)}
        want = torch.autograd.grad(query_loss(p), own)
        for a, b in zip(got, want):
            assert_close64(a, b, name=backend)


# ---- bad inputs ---------------------------------------------------------------------------


@pytest.fixture
def setup():
    module, xs, ys, *_ = make("mlp_ce")
    fn = task_function(module)
    fn.keep_alive = module  # the TaskFunction holds its module weakly
    return fn, fn.expand(T), xs, ys


def test_bad_task_count(setup):
    fn, p, xs, ys = setup
    with pytest.raises(ValueError, match="task count T"):
        inner_loop(fn, fn.expand(T + 1), xs, ys, 1, 0.1)
    with pytest.raises(ValueError, match="support_y"):
        inner_loop(fn, p, xs, ys[:1], 1, 0.1)


def test_bad_steps(setup):
    fn, p, xs, ys = setup
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        inner_loop(fn, p, xs, ys, -1, 0.1)
    with pytest.raises(TypeError, match="steps must be an int"):
        inner_loop(fn, p, xs, ys, 1.5, 0.1)
    with pytest.raises(TypeError, match="steps must be an int"):
        inner_loop(fn, p, xs, ys, True, 0.1)


def test_bad_lr(setup):
    fn, p, xs, ys = setup
    for bad in ("0.1", None, True, [0.1]):
        with pytest.raises(TypeError, match="lr"):
            inner_loop(fn, p, xs, ys, 1, bad)
    with pytest.raises(TypeError, match="lr must be a floating tensor"):
        inner_loop(fn, p, xs, ys, 1, torch.tensor(1))
    with pytest.raises(ValueError, match="lr must be finite"):
        inner_loop(fn, p, xs, ys, 1, float("nan"))
    with pytest.raises(ValueError, match="must be a scalar"):
        inner_loop(fn, p, xs, ys, 1, torch.ones(3, dtype=torch.float64))
    lr = {k: torch.tensor(0.1) for k in p}
    del lr[fn.names[0]]
    with pytest.raises(ValueError, match="lr is missing keys"):
        inner_loop(fn, p, xs, ys, 1, lr)
    with pytest.raises(ValueError, match="lr has unknown keys"):
        inner_loop(fn, p, xs, ys, 1, {**{k: 0.1 for k in p}, "nope": 0.1})
    with pytest.raises(ValueError, match="does not broadcast"):
        inner_loop(fn, p, xs, ys, 1, {k: torch.ones(7, dtype=torch.float64) for k in p})
    with pytest.raises(TypeError, match=r"lr\['0.weight'\] must be a floating tensor"):
        inner_loop(fn, p, xs, ys, 1, {k: torch.ones((), dtype=torch.long) for k in p})
    with pytest.raises(ValueError, match=r"lr\['0.weight'\] must be finite"):
        inner_loop(fn, p, xs, ys, 1, {k: float("nan") for k in p})


def test_bad_params(setup):
    fn, p, xs, ys = setup
    with pytest.raises(ValueError, match="unknown keys"):
        inner_loop(fn, {**p, "extra": p[fn.names[0]]}, xs, ys, 1, 0.1)
    q = dict(p)
    del q[fn.names[-1]]
    with pytest.raises(ValueError, match="missing keys"):
        inner_loop(fn, q, xs, ys, 1, 0.1)
    with pytest.raises(ValueError, match=r"must have shape \[T, 6, 3\]"):
        inner_loop(fn, {**p, "0.weight": torch.zeros(T, 3, 6, dtype=torch.float64)}, xs, ys, 1, 0.1)
    with pytest.raises(TypeError, match="params must be a dict"):
        inner_loop(fn, list(p.values()), xs, ys, 1, 0.1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        inner_loop("model", p, xs, ys, 1, 0.1)


def test_no_grad_mode_and_single_differentiation():
    module, xs, ys, *_ = make("mlp_ce")
    fn = task_function(module)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        plain = inner_loop(fn, fn.expand(T), xs, ys, 3, lr)
    out = inner_loop(fn, fn.expand(T), xs, ys, 3, lr)
    for k in fn.names:
        assert not plain[k].requires_grad
        assert_close64(plain[k], out[k].detach())
    # the backward is not itself differentiable: say so instead of returning a wrong Hessian
    g = torch.autograd.grad(sum(v.pow(2).sum() for v in out.values()), lr, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.backward()


def test_float32_params_with_float64_learned_lr():
    module, xs, ys, xq, yq, _ = make("mlp_ce")
    module.float()
    fn = task_function(module)
    lr = {k: torch.full(p.shape, 0.2, dtype=torch.float64, requires_grad=True) for k, p in fn.params().items()}
    out = inner_loop(fn, fn.expand(T), xs.float(), ys, 2, lr)
    assert all(v.dtype == torch.float32 for v in out.values())
    loss = F.cross_entropy(fn(out, xq.float()).flatten(0, 1), yq.flatten())
    grads = torch.autograd.grad(loss, list(lr.values()))
    assert all(g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)


class CustomBN(nn.Module):
    """Not task-batchable and updates running statistics in place: runs on the per-task loop."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3) * 0.5)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(x @ self.w)


def test_buffers_updated_by_forward_only():
    """The backward's recomputation must not update BatchNorm running statistics again."""
    module = CustomBN().double()
    fn = task_function(module)
    xs, ys = torch.randn(T, N_S, 3, dtype=torch.float64), torch.randint(0, 3, (T, N_S))
    with pytest.warns(UserWarning, match="running the tasks one by one"):
        fn(fn.expand(T), xs)  # first call: vmap is probed, fails, the loop path is chosen
    assert fn.path == "loop"
    before = int(module.bn.num_batches_tracked)
    fast = inner_loop(fn, fn.expand(T), xs, ys, 2, 0.3, hvp_backend="reference")
    after_forward = module.bn.running_mean.clone(), int(module.bn.num_batches_tracked)
    assert after_forward[1] - before == 2 * T  # k steps x T tasks, as an unrolled per-task loop
    torch.autograd.grad(sum(v.sum() for v in fast.values()), list(fn.params().values()))
    assert torch.equal(module.bn.running_mean, after_forward[0])
    assert int(module.bn.num_batches_tracked) == after_forward[1]
