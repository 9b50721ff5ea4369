"""Reptile (Nichol et al. 2018): the batched meta-gradient theta - mean(phi) against an
independent per-task SGD loop (float64), the optimiser contract, task chunking, evaluation,
bad inputs and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from learner_helpers import Custom, FuncOnly
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta import cli
from fastmeta.learners import EpisodicLearner, Reptile
from fastmeta.nn import TaskConv4, TaskMLP

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
pytestmark = pytest.mark.usefixtures("one_thread")



def call_one(model, params, x):
    """One task's forward with unbatched parameters: x [N, *in] -> [N, *out]."""
    if isinstance(model, fastmeta.nn.TaskModule):
        return model(x[None], {k: v[None] for k, v in params.items()})[0]
    return functional_call(model, params, (x,))


def batch(kind, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "reg":
        return [torch.randn(T, n, 1, generator=g, dtype=DT) for n in (5, 5, 4, 4)], F.mse_loss
    shape, n = ((1, 16, 16), 3) if kind == "conv" else ((3,), 4)
    sx, qx = torch.randn(T, n, *shape, generator=g, dtype=DT), torch.randn(T, 2 * n, *shape, generator=g, dtype=DT)
    sy, qy = torch.arange(n).repeat(T, 1), torch.arange(n).repeat_interleave(2).repeat(T, 1)
    return [sx, sy, qx, qy], F.cross_entropy


MODELS = {
    "sequential": (lambda: nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)), "reg"),
    "traced": (Custom, "cls"),
    "generic": (FuncOnly, "cls"),
    "conv4_bn": (lambda: TaskConv4(1, n_way=3, hidden=3, image_size=16), "conv"),
}


def loop_reptile(model, data, steps, lr, loss_fn):
    """Per task: ``steps`` plain SGD steps from theta (autograd, one task at a time); returns
    (theta - mean phi per parameter name, per-task query losses of phi)."""
    sx, sy, qx, qy = data
    theta = {n: p.detach() for n, p in model.named_parameters()}
    phis, qloss = [], []
    for t in range(sx.shape[0]):
        p = {n: v.clone().requires_grad_() for n, v in theta.items()}
        for _ in range(steps):
            g = torch.autograd.grad(loss_fn(call_one(model, p, sx[t]), sy[t]), list(p.values()))
            p = {n: (v - lr * gi).detach().requires_grad_() for (n, v), gi in zip(p.items(), g)}
        phis.append(p)
        with torch.no_grad():
            qloss.append(loss_fn(call_one(model, p, qx[t]), qy[t]))
    step = {n: theta[n] - torch.stack([ph[n].detach() for ph in phis]).mean(0) for n in theta}
    return step, torch.stack(qloss)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_grad_is_theta_minus_mean_phi_of_a_per_task_loop(name, steps):
    make, kind = MODELS[name]
    torch.manual_seed(0)
    model = make().to(DT)
    data, loss_fn = batch(kind)
    reptile = Reptile(model, lr=0.3, steps=steps)
    res = reptile.meta_loss(*data, loss_fn=loss_fn)
    step, qloss = loop_reptile(model, data, steps, 0.3, loss_fn)
    model.zero_grad()
    res.loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, step[n], **TOL)
        assert p.grad.abs().max() > 0
    torch.testing.assert_close(res.task_loss, qloss, **TOL)  # the adapted parameters' query loss
    torch.testing.assert_close(res.loss.detach(), qloss.mean(), **TOL)
    assert res.metric_name == ("mse" if kind == "reg" else "accuracy") and not res.metric.requires_grad


def test_sgd_with_lr_epsilon_is_reptiles_update():
    model = TaskMLP([1, 6, 1], activation="tanh").to(DT)
    data, loss_fn = batch("reg", T=4)
    step, _ = loop_reptile(model, data, 2, 0.1, loss_fn)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    opt.zero_grad()
    Reptile(model, lr=0.1, steps=2).meta_loss(*data, loss_fn=loss_fn).loss.backward()
    opt.step()
    for n, p in model.named_parameters():  # theta + eps * (mean phi - theta)
        torch.testing.assert_close(p.detach(), before[n] - 0.25 * step[n], **TOL)


def test_task_chunk_and_steps_override():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    data, loss_fn = batch("cls", T=5)
    reptile = Reptile(model, lr=0.2, steps=1)
    grads = []
    for chunk in (None, 2):
        model.zero_grad()
        res = reptile.meta_loss(*data, steps=3, task_chunk=chunk)
        res.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)
    step, _ = loop_reptile(model, data, 3, 0.2, loss_fn)
    torch.testing.assert_close(grads[0][0], step["0.weight"], **TOL)


def test_without_a_query_set_the_report_is_on_the_support_set():
    """meta_loss(sx, sy): same gradient (theta - mean phi), report = the adapted parameters'
    support loss and accuracy (the loop's, on the support set)."""
    torch.manual_seed(0)
    model = TaskConv4(1, n_way=3, hidden=3, image_size=16).to(DT)
    (sx, sy, qx, qy), loss_fn = batch("conv")
    reptile = Reptile(model, lr=0.3, steps=2)
    grads = []
    for args in ((sx, sy, qx, qy), (sx, sy)):
        model.zero_grad()
        res = reptile.meta_loss(*args)
        res.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    step, sloss = loop_reptile(model, (sx, sy, sx, sy), 2, 0.3, loss_fn)
    for n in step:
        torch.testing.assert_close(grads[0][n], step[n], **TOL)
        torch.testing.assert_close(grads[1][n], step[n], **TOL)
    torch.testing.assert_close(res.task_loss, sloss, **TOL)
    with torch.no_grad():
        acc = (reptile.predict(reptile.adapt_tasks(sx, sy), sx).argmax(-1) == sy).to(DT).mean(1)
    torch.testing.assert_close(res.task_metric, acc)
    for args in ((sx, sy, qx, None), (sx, sy, None, qy)):
        with pytest.raises(ValueError, match="both be given or both be None"):
            reptile.meta_loss(*args)


def test_evaluation_under_no_grad_adapts_and_predicts():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    data, _ = batch("cls")
    reptile = Reptile(model, lr=0.5, steps=2)
    with torch.no_grad():
        res = reptile.meta_loss(*data)
    assert not res.loss.requires_grad
    phi = reptile.adapt_tasks(data[0], data[1])
    acc = (reptile.predict(phi, data[2]).argmax(-1) == data[3]).to(DT).mean(1)
    torch.testing.assert_close(res.task_metric, acc)
    torch.testing.assert_close(res.metric, acc.mean())


def test_bad_inputs_raise_clear_errors():
    model = nn.Linear(3, 2)
    for bad, exc, match in [(0.0, ValueError, "lr"), (-1.0, ValueError, "lr"), (float("nan"), ValueError, "lr"),
                            ("0.1", TypeError, "lr")]:
        with pytest.raises(exc, match=match):
            Reptile(model, lr=bad)
    for bad, exc in [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="steps"):
            Reptile(model, lr=0.1, steps=bad)
    with pytest.raises(TypeError, match="model"):
        Reptile("net", lr=0.1)
    sx, sy = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long)
    reptile = Reptile(model, lr=0.1)
    with pytest.raises(ValueError, match="mismatched number of tasks"):
        reptile.meta_loss(sx, sy, sx[:1], sy[:1])
    with pytest.raises(ValueError, match="steps"):
        reptile.meta_loss(sx, sy, sx, sy, steps=0)
    with pytest.raises(ValueError, match="task_chunk"):
        reptile.meta_loss(sx, sy, sx, sy, task_chunk=0)


def test_exports():
    assert fastmeta.Reptile is Reptile and fastmeta.learners.Reptile is Reptile


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_sinusoid_smoke(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "reptile", "--dataset", "sinusoid", "--steps", "3", "--batch", "4",
                     "--inner-steps", "2", "--val-every", "0", "--ckpt-every", "0", "--test-episodes", "8",
                     "--test-inner-steps", "2", "--run-dir", str(run), "--no-progress", "--device", "cpu"]) == 0
    out = json.loads((run / "results.json").read_text())
    assert out["steps"] == 3 and out["test_episodes"] == 8 and out["test_mse"] > 0


def test_cli_builds_reptile_for_images():
    args = cli.build_parser().parse_args(["train", "reptile", "--hidden", "4", "--inner-steps", "2"])
    cli.resolve_defaults(args, cli.LEARNERS["reptile"])
    learner = cli.LEARNERS["reptile"].build(args, 1)
    assert isinstance(learner, EpisodicLearner) and isinstance(learner.meta, Reptile) and learner.steps == 2
    x, y = torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1)
    loss, acc = learner(x, y, x, y)
    loss.backward()
    assert all(p.grad is not None for p in learner.parameters()) and 0 <= acc <= 1
