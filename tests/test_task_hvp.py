"""task_hvp: every backend equals a per-task double backward in float64 (HVPs, and the losses
and gradients of return_grad); backend selection and bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close64
from torch import nn

from fastmeta.func import task_function, task_hvp, task_hvp_ref
from fastmeta.nn import TaskConv4, TaskMLP
from fastmeta.ops import BackendError, registry

# torch's forward-AD decompositions (loaded by the first torch.func.jvp) call torch.jit.script
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

T, N = 3, 5


class Custom(nn.Module):
    """Not task-batchable: the generic torch.func.vmap path."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4) * 0.5 + 1)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(torch.sigmoid(x * self.scale) * x.sum(-1, keepdim=True))


def make(name):
    if name == "mlp-nobias":
        m = TaskMLP([2, 4, 3], "tanh", bias=False)
        x, y, loss_fn = torch.randn(T, N, 2), torch.randint(0, 3, (T, N)), F.cross_entropy
    elif name.startswith("mlp"):
        _, act, loss = name.split("-")
        m = TaskMLP([2, 6, 5, 3], act)
        x = torch.randn(T, N, 2)
        y = torch.randint(0, 3, (T, N)) if loss == "ce" else torch.randn(T, N, 3).double()
        loss_fn = F.cross_entropy if loss == "ce" else F.mse_loss
    elif name == "conv4":
        m = TaskConv4(in_channels=2, n_way=3, hidden=3, image_size=16)
        x = torch.randn(T, N, 2, 16, 16)
        y, loss_fn = torch.randint(0, 3, (T, N)), F.cross_entropy
    else:
        m = Custom()
        x, y, loss_fn = torch.randn(T, N, 4), torch.randint(0, 3, (T, N)), F.cross_entropy
    m = m.double()
    fn = task_function(m)
    # distinct parameters per task, away from the shared initialisation
    params = {k: p.detach() + 0.3 * torch.randn(T, *p.shape, dtype=p.dtype) for k, p in fn.params().items()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    return m, fn, params, x.double(), y, v, loss_fn


def per_task_oracle(module, params, x, y, v, loss_fn):
    """Per task: loss, grad and H v by double backward on that task alone."""
    losses, grads, hvps = [], {k: [] for k in params}, {k: [] for k in params}
    for t in range(T):
        p = {k: val[t].clone().requires_grad_() for k, val in params.items()}
        if isinstance(module, Custom):
            out = torch.func.functional_call(module, p, (x[t],))
        else:
            out = module(x[t][None], params={k: val[None] for k, val in p.items()})[0]
        loss = loss_fn(out, y[t])
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        hv = torch.autograd.grad(g, list(p.values()), grad_outputs=[v[k][t] for k in p])
        losses.append(loss.detach())
        for k, gk, hk in zip(p, g, hv):
            grads[k].append(gk.detach())
            hvps[k].append(hk)
    stack = lambda d: {k: torch.stack(val) for k, val in d.items()}  # noqa: E731
    return torch.stack(losses), stack(grads), stack(hvps)


CASES = [
    ("mlp-relu-ce", "analytic"), ("mlp-tanh-mse", "analytic"), ("mlp-sigmoid-ce", "analytic"),
    ("mlp-nobias", "analytic"),
    *[(m, b) for m in ("mlp-tanh-ce", "conv4", "custom") for b in ("func", "reference")],
]


@pytest.mark.parametrize("model,backend", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_hvp_matches_per_task_double_backward(model, backend):
    module, fn, params, x, y, v, loss_fn = make(model)
    losses, grads, hvps = task_hvp(fn, params, x, y, v, loss_fn=loss_fn, backend=backend, return_grad=True)
    ref_losses, ref_grads, ref_hvps = per_task_oracle(module, params, x, y, v, loss_fn)
    assert_close64(losses, ref_losses, name="losses")
    assert list(hvps) == list(fn.names) and list(grads) == list(fn.names)
    for k in fn.names:
        assert hvps[k].shape == params[k].shape and hvps[k].dtype == torch.float64
        assert not hvps[k].requires_grad
        assert_close64(grads[k], ref_grads[k], name=f"grad {k}")
        assert_close64(hvps[k], ref_hvps[k], name=f"hvp {k}")
    # the plain return and the module (not TaskFunction) entry give the same products
    again = task_hvp(module, params, x, y, v, loss_fn=loss_fn, backend=backend)
    for k in fn.names:
        assert_close64(again[k], hvps[k])


def test_reference_function_and_default_backend():
    module, fn, params, x, y, v, loss_fn = make("mlp-tanh-ce")
    ref = task_hvp_ref(module, params, x, y, v, loss_fn)
    auto = task_hvp(module, params, x, y, v, loss_fn)  # analytic by default for an MLP
    for k in fn.names:
        assert_close64(auto[k], ref[k])


def test_expanded_params_and_unused_parameter():
    """fn.expand(T) views work everywhere; a parameter the loss ignores gets zero products."""
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    net.register_parameter("unused", nn.Parameter(torch.randn(2, dtype=torch.float64)))
    fn = task_function(net)
    assert "unused" in fn.names
    params = fn.expand(T)
    x, y = torch.randn(T, N, 2, dtype=torch.float64), torch.randint(0, 3, (T, N))
    v = {k: torch.randn(p.shape, dtype=torch.float64) for k, p in params.items()}
    ref = task_hvp(fn, params, x, y, v, backend="reference")
    for backend in ("func", "reference"):
        out = task_hvp(fn, params, x, y, v, backend=backend)
        assert torch.equal(out["unused"], torch.zeros(T, 2, dtype=torch.float64))
        for k in fn.names:
            assert_close64(out[k], ref[k], name=f"{backend} {k}")


def test_forced_analytic_on_conv_says_why():
    module, fn, params, x, y, v, loss_fn = make("conv4")
    with pytest.raises(BackendError, match=r"task_hvp: backend 'analytic' cannot run this call: .*Linear/activation"):
        task_hvp(fn, params, x, y, v, backend="analytic")
    module, fn, params, x, y, v, _ = make("mlp-relu-ce")
    with pytest.raises(BackendError, match="loss_fn nll_loss is not F.cross_entropy or F.mse_loss"):
        task_hvp(fn, params, x, y, v, loss_fn=F.nll_loss, backend="analytic")
    with pytest.raises(ValueError, match="not a backend of task_hvp"):
        task_hvp(fn, params, x, y, v, backend="cpp")


def test_kernel_backend_env_does_not_break_selection(monkeypatch):
    """FASTMETA_BACKEND=cpp forces kernels, not a task_hvp strategy; =reference forces it."""
    module, fn, params, x, y, v, loss_fn = make("mlp-relu-ce")
    ref = task_hvp(fn, params, x, y, v, backend="reference")
    # a kernel name leaves the strategy to the table (analytic for this MLP + cross-entropy)
    for env, strategy in (("cpp", "analytic"), ("reference", "reference"), ("func", "func")):
        monkeypatch.setenv("FASTMETA_BACKEND", env)
        chosen = registry.select("task_hvp", [params[fn.names[0]], x], fn=fn, loss_fn=loss_fn)
        assert chosen == strategy, env
        out = task_hvp(fn, params, x, y, v)
        for k in fn.names:
            assert_close64(out[k], ref[k], name=env)


def test_non_default_loss_generic_backends():
    """Any per-example loss callable (no reduction= keyword) through func and reference."""
    module, fn, params, x, y, v, _ = make("mlp-tanh-ce")

    def smooth_l1(out, target):
        return F.smooth_l1_loss(out, F.one_hot(target, 3).to(out.dtype), beta=10.0)

    ref = per_task_oracle(module, params, x, y, v, smooth_l1)[2]
    for backend in ("func", "reference", None):
        out = task_hvp(fn, params, x, y, v, loss_fn=smooth_l1, backend=backend)
        for k in fn.names:
            assert_close64(out[k], ref[k], name=f"{backend} {k}")


def test_bad_inputs():
    module, fn, params, x, y, v, loss_fn = make("mlp-relu-ce")
    with pytest.raises(ValueError, match="task count T"):
        task_hvp(fn, params, x[:2], y[:2], v)
    with pytest.raises(ValueError, match=r"v\['0.weight'\] must have shape"):
        task_hvp(fn, params, x, y, {**v, "0.weight": v["0.weight"][..., :1]})
    with pytest.raises(ValueError, match="v is missing keys"):
        task_hvp(fn, params, x, y, {k: val for k, val in v.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="params has unknown keys"):
        task_hvp(fn, {**params, "w": params["0.bias"]}, x, y, v)
    with pytest.raises(ValueError, match="mismatched tasks/examples"):
        task_hvp(fn, params, x, y[:, :2], v)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        task_hvp(fn, params, x, y, v, loss_fn="mse")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        task_hvp(None, params, x, y, v)
