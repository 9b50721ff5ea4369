"""fastmeta dropped into existing research code: a MAML-PyTorch-style functional ``Learner``
(its own ``vars`` ParameterList, ``parameters()`` overridden, BatchNorm running statistics kept
as non-trainable Parameters) through learn2learn's clone/adapt API and through ``meta_loss``;
a plain ``import fastmeta`` exposing its subpackages; the CLI with only the core dependencies."""

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from _dropin_models import Learner, clone_adapt_loss  # noqa: E402

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# (name, args) as the standalone MAML-PyTorch repository's Learner takes them (small here)
CONFIG = [
    ("conv2d", [4, 1, 3, 3, 1, 1]), ("bn", [4]), ("relu", [True]), ("max_pool2d", [2, 2, 0]),
    ("conv2d", [4, 4, 3, 3, 2, 1]), ("bn", [4]), ("relu", [True]),
    ("flatten", []), ("linear", [3, 16]),
]


def make_learner(cls=Learner):
    """The Learner at test size, its biases and BatchNorm affine parameters perturbed off their
    initial 0 / 1 (so every term of the meta-gradient is exercised)."""
    net = cls(CONFIG)
    with torch.no_grad():
        for p in net.vars:
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return net


def batch(T=3, n=3, Q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n, 1, 8, 8, generator=g, dtype=DT)
    qx = torch.randn(T, n * Q, 1, 8, 8, generator=g, dtype=DT)
    return sx, torch.arange(n).repeat(T, 1), qx, torch.arange(n).repeat_interleave(Q).repeat(T, 1)


def maml_pytorch_loss(net, data, steps, lr, lrs=None):
    """MAML-PyTorch's own meta-training loop: fast weights through ``net(x, fast_weights)``."""
    sx, sy, qx, qy = data
    total = 0
    for t in range(sx.shape[0]):
        fast = list(net.parameters())
        for _ in range(steps):
            g = torch.autograd.grad(F.cross_entropy(net(sx[t], fast), sy[t]), fast, create_graph=True)
            fast = [p - (lr if lrs is None else a) * gi for p, gi, a in zip(fast, g, lrs or g)]
        total = total + F.cross_entropy(net(qx[t], fast), qy[t])
    return total / sx.shape[0]


@pytest.mark.parametrize("steps", [1, 2])
def test_learner_clone_adapt_matches_its_own_loop(steps):
    torch.manual_seed(0)
    net = make_learner().to(DT)
    stats = [s.detach().clone() for s in net.vars_bn]
    wrt = list(net.parameters())
    assert len(wrt) == 10 and len(list(net.named_parameters())) == 14
    data = batch()
    # learn2learn's defaults (allow_nograd=False) work: adapt steps what parameters() returns
    g_fast = torch.autograd.grad(clone_adapt_loss(fastmeta.MAML(net, lr=0.2), data, steps), wrt)
    for s, s0 in zip(net.vars_bn, stats):  # the clones' statistics moved, not the original's
        assert torch.equal(s, s0)
    g_ref = torch.autograd.grad(maml_pytorch_loss(net, data, steps, 0.2), wrt)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **TOL)


def test_learner_metasgd_rates_follow_parameters():
    torch.manual_seed(1)
    net = make_learner().to(DT)
    msgd = fastmeta.MetaSGD(net, lr=0.1)
    assert sorted(msgd.lrs.keys()) == sorted(f"vars-{i}" for i in range(10))  # none for vars_bn
    with torch.no_grad():
        for v in msgd.lrs.values():
            v.uniform_(0.05, 0.3)
    wrt = list(net.parameters()) + list(msgd.lrs.values())
    data = batch(seed=1)
    g_fast = torch.autograd.grad(clone_adapt_loss(msgd, data, 2), wrt)
    lrs = [msgd.lrs[f"vars-{i}"] for i in range(10)]
    g_ref = torch.autograd.grad(maml_pytorch_loss(net, data, 2, None, lrs=lrs), wrt)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **TOL)


def test_learner_meta_loss_matches_and_backward_keeps_statistics():
    """The Learner's functional forward (F.conv2d / F.batch_norm / F.linear on its own
    ParameterList) takes the traced task-batched path; its training-mode batch norm uses each
    task's batch statistics and leaves the running statistics (vars_bn) alone."""
    torch.manual_seed(2)
    net = make_learner().to(DT)
    maml = fastmeta.MAML(net, lr=0.2)
    data = batch(seed=2)
    wrt = list(net.parameters())
    stats = [s.detach().clone() for s in net.vars_bn]
    res = maml.meta_loss(*data, steps=2)
    assert maml.task_function().path == "traced"
    mapping = "\n".join(maml.task_function().mapping)
    assert "conv2d(weight=vars.0, bias=vars.1) -> TaskConv2d" in mapping
    assert "running_mean=vars_bn.0" in mapping and "linear(weight=vars.8, bias=vars.9) -> TaskLinear" in mapping
    assert "max_pool2d -> TaskMaxPool2d" in mapping
    g_fast = torch.autograd.grad(res.loss, wrt)
    for s, s0 in zip(net.vars_bn, stats):  # neither the forward nor the backward moved them
        assert torch.equal(s, s0)
    ref = maml_pytorch_loss(net, data, 2, 0.2)
    g_ref = torch.autograd.grad(ref, wrt)
    torch.testing.assert_close(res.loss, ref, **TOL)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **TOL)
    for p in net.parameters():
        assert isinstance(p, nn.Parameter) and p.is_leaf


def test_learner_eval_mode_batch_norm_uses_running_statistics():
    """bn_training=False (MAML-PyTorch's evaluation forward) normalises with vars_bn, per task
    as the model does on its own."""

    class EvalLearner(Learner):
        def forward(self, x, vars=None, bn_training=False):
            return super().forward(x, vars, bn_training)

    torch.manual_seed(3)
    net = make_learner(EvalLearner).to(DT)
    with torch.no_grad():
        for s in net.vars_bn:
            s.uniform_(0.5, 1.5)
    fn = fastmeta.func.task_function(net)
    assert fn.path == "traced"
    x = torch.randn(3, 4, 1, 8, 8, dtype=DT)
    want = torch.stack([net(x[t]) for t in range(3)])
    torch.testing.assert_close(fn(None, x), want, **TOL)


def test_functional_forward_refusals():
    """A parameter used other than as a functional layer's weight, or a weight computed in the
    forward, keeps the model off the traced path with a reason."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return F.linear(x, self.w) * self.scale

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.linear(x, 2 * self.w)

    for cls, why in ((Scaled, "reads scale directly"), (Computed, "reads w directly")):
        fn = fastmeta.func.task_function(cls())
        assert fn.path != "traced" and why in fn.reason, fn.reason



class Frozen(nn.Module):
    """A parameter that ``parameters()`` returns but that does not require grad."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)
        self.a.bias.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_nograd_parameter_needs_allow_nograd_like_learn2learn():
    model = Frozen().to(DT)
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 0, 1])
    learner = fastmeta.MAML(model, lr=0.5).clone()
    with pytest.raises(RuntimeError, match="allow_nograd=True"):
        learner.adapt(F.cross_entropy(learner(x), y))
    learner = fastmeta.MAML(model, lr=0.5, allow_nograd=True).clone()
    loss = F.cross_entropy(learner(x), y)
    g = dict(zip(["a.weight", "b.weight", "b.bias"],
                 torch.autograd.grad(loss, [model.a.weight, model.b.weight, model.b.bias], retain_graph=True)))
    learner.adapt(loss)
    assert torch.equal(learner.module.a.bias, model.a.bias)  # frozen: not stepped
    for name, p in [("a.weight", learner.module.a.weight), ("b.weight", learner.module.b.weight),
                    ("b.bias", learner.module.b.bias)]:
        base = dict(model.named_parameters())[name]
        torch.testing.assert_close(p, base - 0.5 * g[name], **TOL)


def test_plain_import_exposes_subpackages(tmp_path):
    code = textwrap.dedent("""
        import fastmeta, torch
        from torch import nn
        net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        fn = fastmeta.func.task_function(net)
        assert fn.path == "batched", fn.path
        assert fn(fn.expand(4), torch.randn(4, 5, 2)).shape == (4, 5, 1)
        assert fastmeta.nn.TaskMLP and fastmeta.learners.MAML is fastmeta.MAML
        assert fastmeta.data.SinusoidTasks and fastmeta.ops.proto_loss
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


# Makes the modules named in FASTMETA_TEST_ABSENT unimportable (as if not installed), also
# for importlib.util.find_spec probes (torch probes some optional modules at import).
_ABSENT = """
import os, sys
from importlib.machinery import ModuleSpec

class _Absent:
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named '{spec.name}'", name=spec.name)

    def exec_module(self, module):
        pass

class _Finder:
    names = set(filter(None, os.environ.get("FASTMETA_TEST_ABSENT", "").split(",")))

    def find_spec(self, name, path=None, target=None):
        return ModuleSpec(name, _Absent()) if name.split(".")[0] in self.names else None

sys.meta_path.insert(0, _Finder())
"""


def _extra_only_modules() -> set[str]:
    """Top-level modules of the distributions pyproject.toml lists only in optional extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def dist(req):
        return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")

    core = {dist(r) for r in project["dependencies"]}
    extra = {dist(r) for reqs in project["optional-dependencies"].values() for r in reqs} - core
    return {mod for mod, dists in importlib.metadata.packages_distributions().items()
            if any(d.lower().replace("_", "-") in extra for d in dists)}


def _cli_train(tmp_path, absent):
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(_ABSENT)
    env = dict(os.environ, FASTMETA_TEST_ABSENT=",".join(sorted(absent)), PYTHONPATH=str(tmp_path / "site"),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastmeta", "train", "maml", "--dataset", "sinusoid", "--steps", "2",
           "--batch", "2", "--val-every", "100", "--val-episodes", "2", "--test-episodes", "2",
           "--run-dir", str(tmp_path / "run"), "--no-progress", "--threads", "1"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_cli_trains_with_core_dependencies_only(tmp_path):
    absent = _extra_only_modules()
    assert "tqdm" not in absent and "matplotlib" not in absent  # core: the CLI needs them
    out = _cli_train(tmp_path, absent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "learning_curve.png").exists() and (tmp_path / "run" / "results.json").exists()
    # the harness really hides modules: without tqdm the same run fails at its first step
    out = _cli_train(tmp_path / "run", {"tqdm"})
    assert out.returncode != 0 and "No module named 'tqdm'" in out.stderr
