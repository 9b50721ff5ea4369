"""iMAML (Rajeswaran et al. 2019): the implicit meta-gradient against the closed form of a
linear least-squares task and against a dense per-task solve on a nonlinear model (float64),
batched conjugate gradient against direct solves, task chunking, evaluation, bad inputs and
the CLI."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta import cli
from fastmeta.learners import MAML, EpisodicLearner, iMAML
from fastmeta.learners.imaml import conjugate_gradient
from fastmeta.nn import TaskConv4

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


class GenericLinear(nn.Module):
    """A linear map that is not task-batchable: torch.func path, double-backward HVPs."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, x):
        return self.lin(x) * 1.0


def lsq_batch(T=3, d=3, S=8, Q=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, n, k, generator=g, dtype=DT) for n, k in ((S, d), (S, 1), (Q, d), (Q, 1))]


def lsq_closed_form(w, b, data, lam):
    """Per task, with X~ = [x, 1] and L(phi) = mean (X~ phi - y)^2: H = 2/N X~^T X~, the inner
    optimum phi* = (H + lam I)^-1 (2/N X~^T y + lam theta) and the implicit meta-gradient
    lam (H + lam I)^-1 grad L_query(phi*). Returns (phi* [T, d+1], mean meta-gradient [d+1])."""
    sx, sy, qx, qy = data
    theta = torch.cat([w.detach().flatten(), b.detach()])
    eye = torch.eye(theta.numel(), dtype=DT)
    phis, grads = [], []
    for t in range(sx.shape[0]):
        xs = torch.cat([sx[t], torch.ones(sx.shape[1], 1, dtype=DT)], 1)
        xq = torch.cat([qx[t], torch.ones(qx.shape[1], 1, dtype=DT)], 1)
        h = 2 / len(xs) * xs.T @ xs
        phi = torch.linalg.solve(h + lam * eye, 2 / len(xs) * xs.T @ sy[t, :, 0] + lam * theta)
        gq = 2 / len(xq) * xq.T @ (xq @ phi - qy[t, :, 0])
        phis.append(phi)
        grads.append(lam * torch.linalg.solve(h + lam * eye, gq))
    return torch.stack(phis), torch.stack(grads).mean(0)


def flat_grad(lin):
    return torch.cat([lin.weight.grad.flatten(), lin.bias.grad])


@pytest.mark.parametrize("generic", [False, True], ids=["linear", "generic"])
def test_meta_gradient_equals_the_least_squares_closed_form(generic):
    torch.manual_seed(0)
    model = (GenericLinear(3) if generic else nn.Linear(3, 1)).to(DT)
    lin = model.lin if generic else model
    data, lam = lsq_batch(), 2.0
    imaml = iMAML(model, lr=0.1, lam=lam, steps=200, cg_steps=4)  # 4 unknowns: CG is exact in 4
    phi_ref, grad_ref = lsq_closed_form(lin.weight, lin.bias, data, lam)
    phi = imaml.adapt_tasks(data[0], data[1], loss_fn=F.mse_loss)
    pre = "lin." if generic else ""
    torch.testing.assert_close(torch.cat([phi[pre + "weight"].flatten(1), phi[pre + "bias"]], 1), phi_ref,
                               rtol=1e-10, atol=1e-12)
    res = imaml.meta_loss(*data, loss_fn=F.mse_loss)
    res.loss.backward()
    torch.testing.assert_close(flat_grad(lin), grad_ref, rtol=1e-9, atol=1e-12)
    # the reported loss is the query loss of the adapted parameters
    xq = torch.cat([data[2], torch.ones(3, 6, 1, dtype=DT)], 2)
    torch.testing.assert_close(res.task_loss, ((xq @ phi_ref[..., None])[..., 0] - data[3][..., 0]).square().mean(1))


def test_converged_meta_gradient_does_not_depend_on_the_number_of_steps():
    model = nn.Linear(3, 1).to(DT)
    data = lsq_batch(seed=1)
    grads = []
    for steps in (150, 300):
        model.zero_grad()
        iMAML(model, lr=0.1, lam=2.0, steps=steps, cg_steps=4).meta_loss(*data, loss_fn=F.mse_loss).loss.backward()
        grads.append(flat_grad(model))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-13)


def call_one(model, params, x):
    """One task's forward with unbatched parameters: x [N, *in] -> [N, *out]."""
    if isinstance(model, fastmeta.nn.TaskModule):
        return model(x[None], {k: v[None] for k, v in params.items()})[0]
    return functional_call(model, params, (x,))


def mlp_case():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    return model, [torch.randn(3, 6, k, generator=g, dtype=DT) for k in (2, 1, 2, 1)], F.mse_loss, 5.0, 0.1


def conv_case():
    # per-task BatchNorm over 3 support images is far from convex: lam 200 keeps H + lam I
    # positive definite (at lam 20 one task's smallest eigenvalue is about -44)
    g = torch.Generator().manual_seed(0)
    model = TaskConv4(1, n_way=3, hidden=2, image_size=16).to(DT)
    sx, qx = torch.randn(2, 3, 1, 16, 16, generator=g, dtype=DT), torch.randn(2, 6, 1, 16, 16, generator=g, dtype=DT)
    sy, qy = torch.arange(3).repeat(2, 1), torch.arange(3).repeat_interleave(2).repeat(2, 1)
    return model, [sx, sy, qx, qy], F.cross_entropy, 200.0, 0.002


@pytest.mark.parametrize("case", [mlp_case, conv_case], ids=["mlp_tanh", "conv4_bn"])
def test_nonlinear_model_equals_a_dense_per_task_solve(case):
    """After a few (unconverged) inner steps: the implicit formula at the reached phi, with
    each task's full Hessian built by torch.autograd.functional.hessian."""
    torch.manual_seed(0)
    model, (sx, sy, qx, qy), loss_fn, lam, lr = case()
    steps = 4
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    n = theta.numel()

    def loss(v, x, y):
        parts = [c.reshape(s) for c, s in zip(v.split([s.numel() for s in shapes]), shapes)]
        return loss_fn(call_one(model, dict(zip(names, parts)), x), y)

    expected = []
    for t in range(sx.shape[0]):  # independent loop: plain GD on the regularised loss, then a dense solve
        phi = theta.clone()
        for _ in range(steps):
            phi = phi - lr * (torch.func.grad(loss)(phi, sx[t], sy[t]) + lam * (phi - theta))
        h = torch.autograd.functional.hessian(lambda v: loss(v, sx[t], sy[t]), phi)
        assert torch.linalg.eigvalsh(h + lam * torch.eye(n, dtype=DT)).min() > 0
        gq = torch.func.grad(loss)(phi, qx[t], qy[t])
        expected.append(torch.linalg.solve(torch.eye(n, dtype=DT) + h / lam, gq))
    imaml = iMAML(model, lr=lr, lam=lam, steps=steps, cg_steps=n)
    imaml.meta_loss(sx, sy, qx, qy, loss_fn=loss_fn).loss.backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, torch.stack(expected).mean(0), rtol=1e-8, atol=1e-11)


def test_large_lam_is_the_query_gradient_at_theta():
    """lam -> infinity pins phi to theta: the meta-gradient tends to MAML's with 0 steps."""
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(2, 4, 3, generator=g, dtype=DT), torch.randn(2, 8, 3, generator=g, dtype=DT)
    sy, qy = torch.arange(4).repeat(2, 1), torch.arange(4).repeat(2, 2)
    ref = torch.autograd.grad(MAML(model, 0.1).meta_loss(sx, sy, qx, qy, steps=0).loss, list(model.parameters()))
    res = iMAML(model, lr=1e-7, lam=1e6, steps=2, cg_steps=3).meta_loss(sx, sy, qx, qy)
    for a, b in zip(torch.autograd.grad(res.loss, list(model.parameters())), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def spd_system(T=3, seed=0, indefinite=False):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(T, 6, 6, generator=g, dtype=DT)
    a = m @ m.transpose(1, 2) + 0.5 * torch.eye(6, dtype=DT)
    if indefinite:
        a = a - 8 * torch.eye(6, dtype=DT)
    b = torch.randn(T, 6, generator=g, dtype=DT)
    return a, b


def as_dict(v):  # a [T, 6] vector as two parameter-shaped tensors, and back
    return {"w": v[:, :4].reshape(-1, 2, 2), "b": v[:, 4:]}


def as_flat(d):
    return torch.cat([d["w"].flatten(1), d["b"]], 1)


def spd_matvec(a):
    return lambda v: as_dict(torch.einsum("tij,tj->ti", a, as_flat(v)))


def test_cg_equals_a_direct_solve_on_spd_systems():
    a, b = spd_system()
    calls = []

    def matvec(v):
        calls.append(1)
        return spd_matvec(a)(v)

    x = as_flat(conjugate_gradient(matvec, as_dict(b), steps=6))
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    errors = []  # CG minimises the A-norm of the error: it falls with every iteration
    for k in range(1, 7):
        e = as_flat(conjugate_gradient(matvec, as_dict(b), steps=k)) - torch.linalg.solve(a, b)
        errors.append(torch.einsum("ti,tij,tj->t", e, a, e))
    assert all((later <= earlier * (1 + 1e-9)).all() for earlier, later in zip(errors, errors[1:]))
    calls.clear()
    x = as_flat(conjugate_gradient(matvec, as_dict(b), steps=100, tol=1e-8))
    assert len(calls) < 100
    r = b - torch.einsum("tij,tj->ti", a, x)
    assert (r.norm(dim=1) <= 1e-8 * b.norm(dim=1)).all()


def test_cg_zero_rhs_and_indefinite_systems_stay_finite():
    a, b = spd_system(indefinite=True)
    b[1] = 0
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        x = as_flat(conjugate_gradient(spd_matvec(a), as_dict(b), 12))
    assert torch.isfinite(x).all() and (x[1] == 0).all()
    with pytest.raises(FloatingPointError, match="non-finite"):
        conjugate_gradient(lambda v: {k: t * float("nan") for k, t in v.items()}, as_dict(b), 3)


def test_inner_descent_backtracks_where_the_step_size_is_too_large():
    """lr = 5 is far above 2 / (lam + largest eigenvalue of H) on these least-squares tasks:
    plain gradient descent diverges, the safeguarded descent halves each task's step until the
    regularised loss falls, never lets it rise, and reaches the closed-form inner optimum."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    data, lam = lsq_batch(), 2.0
    phi_ref, _ = lsq_closed_form(model.weight, model.bias, data, lam)
    imaml = iMAML(model, lr=5.0, lam=lam, steps=1, cg_steps=4)
    objective = []
    with pytest.warns(RuntimeWarning, match="step sizes halved"):
        for k in range(0, 30):
            phi = imaml.adapt_tasks(data[0], data[1], steps=k, loss_fn=F.mse_loss)
            theta = {n: p.detach().expand(3, *p.shape) for n, p in model.named_parameters()}
            objective.append(imaml._objective(phi, theta, data[0], data[1], F.mse_loss))
        phi = imaml.adapt_tasks(data[0], data[1], steps=400, loss_fn=F.mse_loss)
    assert all((later <= earlier * (1 + 1e-8)).all() for earlier, later in zip(objective, objective[1:]))
    xs = torch.cat([data[0], torch.ones(3, 8, 1, dtype=DT)], 2)  # plain descent's contraction:
    top = torch.linalg.eigvalsh(2 / 8 * xs.transpose(1, 2) @ xs).max() + lam  # |1 - lr L| > 1 diverges
    assert abs(1 - 5.0 * top) > 1
    torch.testing.assert_close(torch.cat([phi["weight"].flatten(1), phi["bias"]], 1), phi_ref, rtol=1e-7, atol=1e-9)


def test_sinusoid_training_stays_finite_with_the_cli_defaults():
    """The CLI's sinusoid defaults (inner lr 0.01, lam 2) with Adam 0.01: plain inner descent
    went to NaN after ~75 meta-steps (the support Hessian's top eigenvalue passed 2/lr - lam =
    198); with the safeguard every adapted loss stays finite and no task's regularised support
    loss rises above its value at theta."""
    torch.manual_seed(0)
    imaml = iMAML(fastmeta.nn.TaskMLP([1, 40, 40, 1]), lr=0.01, lam=2.0, steps=5, cg_steps=5)
    opt = torch.optim.Adam(imaml.parameters(), 0.01)
    tasks = fastmeta.data.SinusoidTasks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(120):
            b = tasks.sample(10, 20, torch.Generator().manual_seed(i))
            res = imaml.meta_loss(b.x[:, :10], b.y[:, :10], b.x[:, 10:], b.y[:, 10:], loss_fn=F.mse_loss)
            opt.zero_grad()
            res.loss.backward()
            assert torch.isfinite(res.task_loss).all(), i
            assert all(torch.isfinite(p.grad).all() for p in imaml.parameters()), i
            opt.step()
        fn = imaml.task_function()
        theta = fn.expand(10, {k: p.detach() for k, p in fn.params().items()})
        phi = imaml.adapt_tasks(b.x[:, :10], b.y[:, :10], steps=10, loss_fn=F.mse_loss)
    before = imaml._objective(theta, theta, b.x[:, :10], b.y[:, :10], F.mse_loss)
    after = imaml._objective(phi, theta, b.x[:, :10], b.y[:, :10], F.mse_loss)
    assert (after <= before * (1 + 1e-3)).all()


def test_task_chunk_and_no_grad_evaluation():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(5, 4, 3, generator=g, dtype=DT), torch.randn(5, 8, 3, generator=g, dtype=DT)
    sy, qy = torch.arange(4).repeat(5, 1), torch.arange(4).repeat(5, 2)
    imaml = iMAML(model, lr=0.3, lam=2.0, steps=3, cg_steps=4)
    grads = []
    for chunk in (None, 2):
        model.zero_grad()
        res = imaml.meta_loss(sx, sy, qx, qy, task_chunk=chunk)
        res.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        ev = imaml.meta_loss(sx, sy, qx, qy)
    acc = (imaml.predict(imaml.adapt_tasks(sx, sy), qx).argmax(-1) == qy).to(DT).mean(1)
    torch.testing.assert_close(ev.task_metric, acc)
    torch.testing.assert_close(ev.task_loss, res.task_loss)
    assert not ev.loss.requires_grad and ev.metric_name == "accuracy"


def test_bad_inputs_raise_clear_errors():
    model = nn.Linear(3, 2)
    for kw, exc, match in [(dict(lam=0.0), ValueError, "lam"), (dict(lam=-1.0), ValueError, "lam"),
                           (dict(lam=float("inf")), ValueError, "lam"), (dict(lam=None), TypeError, "lam"),
                           (dict(lr=0.0), ValueError, "lr"), (dict(steps=0), ValueError, "steps"),
                           (dict(steps=2.0), TypeError, "steps"), (dict(cg_steps=0), ValueError, "cg_steps"),
                           (dict(cg_steps=True), TypeError, "cg_steps"), (dict(cg_tol=-1.0), ValueError, "cg_tol"),
                           (dict(cg_tol="1e-3"), TypeError, "cg_tol")]:
        with pytest.raises(exc, match=match):
            iMAML(model, **{"lr": 0.1, **kw})
    with pytest.raises(TypeError, match="model"):
        iMAML(None, lr=0.1)
    sx, sy = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="support_x"):
        iMAML(model, lr=0.1).meta_loss(sx, sy[:, :3], sx, sy)
    with pytest.raises(ValueError, match="steps"):
        conjugate_gradient(lambda v: v, {"w": torch.ones(2, 3)}, steps=0)
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda v: v, {"w": torch.ones(2, 3)}, steps=1, tol=float("nan"))


def test_cli_sinusoid_smoke(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "imaml", "--dataset", "sinusoid", "--steps", "3", "--batch", "4",
                     "--inner-steps", "2", "--val-every", "0", "--ckpt-every", "0", "--test-episodes", "8",
                     "--test-inner-steps", "2", "--run-dir", str(run), "--no-progress", "--device", "cpu"]) == 0
    out = json.loads((run / "results.json").read_text())
    assert out["steps"] == 3 and out["test_episodes"] == 8 and out["test_mse"] > 0


def test_cli_builds_imaml_for_images():
    assert fastmeta.iMAML is iMAML and fastmeta.learners.iMAML is iMAML
    args = cli.build_parser().parse_args(["train", "imaml", "--hidden", "4", "--task-chunk", "1"])
    cli.resolve_defaults(args, cli.LEARNERS["imaml"])
    learner = cli.LEARNERS["imaml"].build(args, 1)
    assert isinstance(learner, EpisodicLearner) and isinstance(learner.meta, iMAML) and learner.task_chunk == 1
    x, y = torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1)
    loss, acc = learner(x, y, x, y)
    loss.backward()
    assert all(p.grad is not None for p in learner.parameters()) and 0 <= acc <= 1


def test_cli_sinusoid_defaults_solve_the_proximal_problem():
    from fastmeta.cli.recipes import LEARNERS, resolve_defaults, train_parser

    def resolved(*argv):
        args = train_parser().parse_args(list(argv))
        resolve_defaults(args, LEARNERS[args.learner])
        return args.inner_steps, args.inner_lr, args.lam

    assert resolved("imaml", "--dataset", "sinusoid") == (10, 0.05, 0.5)
    assert resolved("imaml", "--dataset", "sinusoid", "--inner-steps", "3", "--lam", "4") == (3, 0.05, 4.0)
    assert resolved("imaml") == (1, 0.4, 2.0)
    assert resolved("maml", "--dataset", "sinusoid")[:2] == (1, 0.01)
