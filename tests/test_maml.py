"""MAML, MetaSGD, ANIL: batched meta-gradients vs naive per-task loops (float64), the
learn2learn-compatible clone/adapt API, task chunking, evaluation, bad inputs and the CLI."""

import json

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from learner_helpers import Custom, FuncOnly
from torch import nn
from torch.func import functional_call

import fastmeta
import fastmeta.data
from fastmeta import cli
from fastmeta.learners import ANIL, MAML, EpisodicLearner, MetaSGD, clone_module
from fastmeta.nn import TaskConv4, TaskMLP

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
pytestmark = pytest.mark.usefixtures("one_thread")



def regression_batch(T=3, S=5, Q=4, d_in=1, d_out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, S, d_in, generator=g, dtype=DT), torch.randn(T, S, d_out, generator=g, dtype=DT),
            torch.randn(T, Q, d_in, generator=g, dtype=DT), torch.randn(T, Q, d_out, generator=g, dtype=DT))


def class_batch(T=2, n=3, shape=(3,), Q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n, *shape, generator=g, dtype=DT)
    qx = torch.randn(T, n * Q, *shape, generator=g, dtype=DT)
    sy = torch.arange(n).repeat(T, 1)
    qy = torch.arange(n).repeat_interleave(Q).repeat(T, 1)
    return sx, sy, qx, qy


def task_call(model, params, x):
    """One task's forward with an unbatched params dict: x [N, *in] -> [N, *out]."""
    if isinstance(model, fastmeta.nn.TaskModule):
        return model(x[None], {k: v[None] for k, v in params.items()})[0]
    return functional_call(model, params, (x,))


def naive_meta_grads(model, batch, steps, lr, first_order, loss_fn, lrs=None):
    """Per-task loop with torch.autograd.grad(create_graph=True): (loss, grads of params [, lrs])."""
    sx, sy, qx, qy = batch
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    base = dict(model.named_parameters())
    total = 0.0
    for t in range(sx.shape[0]):
        p = {n: base[n] for n in names}
        for _ in range(steps):
            loss = loss_fn(task_call(model, p, sx[t]), sy[t])
            g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
            p = {n: v - (lr if lrs is None else lrs[n]) * gi for (n, v), gi in zip(p.items(), g)}
        total = total + loss_fn(task_call(model, p, qx[t]), qy[t])
    total = total / sx.shape[0]
    wrt = [base[n] for n in names] + ([] if lrs is None else [lrs[n] for n in names])
    return total, torch.autograd.grad(total, wrt)


def tiny_conv():
    torch.manual_seed(0)
    return TaskConv4(1, n_way=3, hidden=3, image_size=16).to(DT)


MODELS = {
    "mlp": (lambda: TaskMLP([1, 8, 8, 1], activation="tanh").to(DT), "reg"),
    "conv4_bn": (tiny_conv, "conv"),
    "sequential": (lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT), "cls"),
    "generic": (lambda: Custom().to(DT), "cls"),
    "func": (lambda: FuncOnly().to(DT), "cls"),
}


def batch_for(kind):
    if kind == "reg":
        return regression_batch(), F.mse_loss
    if kind == "conv":
        return class_batch(T=2, n=3, shape=(1, 16, 16), Q=1), F.cross_entropy
    return class_batch(T=3, n=4, shape=(3,), Q=2), F.cross_entropy


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_meta_loss_gradients_match_naive_loop(name, steps, first_order):
    make, kind = MODELS[name]
    torch.manual_seed(0)
    model = make()
    batch, loss_fn = batch_for(kind)
    maml = MAML(model, 0.3, first_order=first_order)
    res = maml.meta_loss(*batch, steps=steps, loss_fn=loss_fn)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(res.loss, params)
    ref_loss, ref = naive_meta_grads(model, batch, steps, 0.3, first_order, loss_fn)
    torch.testing.assert_close(res.loss, ref_loss, **TOL)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)
    assert res.metric_name == ("mse" if kind == "reg" else "accuracy")
    assert (res.mse if kind == "reg" else res.accuracy) is res.metric
    assert (res.accuracy if kind == "reg" else res.mse) is None
    assert res.task_loss.shape == (batch[0].shape[0],) and not res.metric.requires_grad
    with pytest.raises(TypeError):  # fields are read by name: not a (loss, metric) tuple
        _loss, _metric = res


def test_generic_module_takes_the_generic_path():
    assert MAML(Custom(), 0.1).task_function().path == "traced"
    assert MAML(nn.Sequential(nn.Linear(3, 4)), 0.1).task_function().path == "batched"


def test_zero_steps_is_the_plain_query_loss():
    model = TaskMLP([1, 4, 1]).to(DT)
    sx, sy, qx, qy = regression_batch()
    res = MAML(model, 0.5).meta_loss(sx, sy, qx, qy, steps=0, loss_fn=F.mse_loss)
    torch.testing.assert_close(res.loss, F.mse_loss(model(qx), qy), **TOL)
    torch.testing.assert_close(res.metric, res.loss.detach(), **TOL)


# ---- learn2learn-compatible API ---------------------------------------------------------------


def l2l_reference_grads(model, lr, batch, steps, first_order, loss_fn):
    """learn2learn semantics written out: clone = p.clone() of every parameter, adapt =
    autograd.grad(loss, params, create_graph=second_order) then p + (-lr * g)."""
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    total = 0.0
    for t in range(sx.shape[0]):
        p = {n: v.clone() for n, v in model.named_parameters()}
        for _ in range(steps):
            loss = loss_fn(functional_call(model, p, (sx[t],)), sy[t])
            g = torch.autograd.grad(loss, list(p.values()), retain_graph=not first_order,
                                    create_graph=not first_order)
            p = {n: v + (-lr * gi) for (n, v), gi in zip(p.items(), g)}
        total = total + loss_fn(functional_call(model, p, (qx[t],)), qy[t]) / sx.shape[0]
    return total, torch.autograd.grad(total, [dict(model.named_parameters())[n] for n in names])


def clone_adapt_grads(meta, batch, steps, loss_fn, per_task=lambda x: x):
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        learner = meta.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(per_task(sx[t])), per_task(sy[t])))
        total = total + loss_fn(learner(per_task(qx[t])), per_task(qy[t])) / sx.shape[0]
    return total, torch.autograd.grad(total, list(meta.parameters()))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_clone_adapt_matches_l2l_semantics_and_the_batched_api(first_order):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)
    batch = class_batch(T=3, n=4, shape=(3,), Q=2)
    maml = MAML(model, 0.4, first_order=first_order)
    loss, grads = clone_adapt_grads(maml, batch, 2, F.cross_entropy)
    ref_loss, ref = l2l_reference_grads(model, 0.4, batch, 2, first_order, F.cross_entropy)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, **TOL)
    res = maml.meta_loss(*batch, steps=2)
    torch.testing.assert_close(res.loss, loss, **TOL)
    for g, r in zip(torch.autograd.grad(res.loss, list(model.parameters())), grads):
        torch.testing.assert_close(g, r, **TOL)


def test_clone_adapt_on_task_batched_model_matches_batched_api():
    torch.manual_seed(0)
    model = tiny_conv()
    batch = class_batch(T=2, n=3, shape=(1, 16, 16), Q=1)
    maml = MAML(model, 0.3)
    loss, grads = clone_adapt_grads(maml, batch, 2, lambda out, y: F.cross_entropy(out[0], y[0]),
                                    per_task=lambda x: x[None])
    res = maml.meta_loss(*batch, steps=2)
    torch.testing.assert_close(res.loss, loss, **TOL)
    for g, r in zip(torch.autograd.grad(res.loss, list(model.parameters())), grads):
        torch.testing.assert_close(g, r, **TOL)


def _learn2learn_maml():
    """learn2learn's MAML class, loaded like bench/bench_maml.py does (its package __init__
    needs a torchvision that does not import beside the CPU torch); skip when not installed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from bench_maml import import_l2l_maml

        return import_l2l_maml()[0]
    except ImportError as exc:
        pytest.skip(f"learn2learn: {exc}")
    finally:
        sys.path.pop(0)


def test_learn2learn_itself_if_installed():
    l2l_maml = _learn2learn_maml()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)
    batch = class_batch(T=3, n=4, shape=(3,), Q=2)
    ours = clone_adapt_grads(MAML(model, 0.4), batch, 2, F.cross_entropy)
    theirs = clone_adapt_grads(l2l_maml(model, lr=0.4), batch, 2, F.cross_entropy)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    for g, r in zip(ours[1], theirs[1]):
        torch.testing.assert_close(g, r, **TOL)


def test_clone_is_differentiable_copy_sharing_structure():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.BatchNorm1d(2), lin)  # shared submodule and parameters
    c = clone_module(model)
    assert c is not model and c[0] is c[2] and c[0] is not lin
    assert c[0].weight is not lin.weight and c[0].weight.grad_fn is not None
    torch.testing.assert_close(c[0].weight, lin.weight)
    assert c[1].running_mean is model[1].running_mean  # buffers shared, as in learn2learn
    c(torch.randn(4, 2)).sum().backward()
    assert lin.weight.grad is not None


def test_adapt_unused_and_nograd_parameters():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1), nn.Linear(1, 1)).to(DT)
    x = torch.randn(5, 2, dtype=DT)
    model[0].bias.requires_grad_(False)
    learner = MAML(model, 0.1).clone()
    with pytest.raises(RuntimeError, match="allow_nograd"):
        learner.adapt(learner(x).sum())
    learner = MAML(model, 0.1, allow_nograd=True).clone()  # allow_unused defaults to allow_nograd
    before = learner.module[0].bias
    loss = learner.module[1](learner.module[0](x)).sum()  # module[2] unused
    learner.adapt(loss)
    assert learner.module[0].bias is before  # no grad: unchanged
    torch.testing.assert_close(learner.module[2].weight, model[2].weight)
    assert not torch.equal(learner.module[1].weight, model[1].weight)


# ---- Meta-SGD and ANIL ------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_metasgd_gradients_for_weights_and_learning_rates(first_order):
    torch.manual_seed(0)
    model = TaskMLP([1, 6, 1], activation="tanh").to(DT)
    msgd = MetaSGD(model, lr=0.2, first_order=first_order).to(DT)
    with torch.no_grad():
        for v in msgd.lrs.values():
            v.uniform_(0.05, 0.3)
    assert sorted(msgd.lrs.keys()) == ["0-bias", "0-weight", "2-bias", "2-weight"]
    batch = regression_batch()
    res = msgd.meta_loss(*batch, steps=2, loss_fn=F.mse_loss)
    names = [n for n, _ in model.named_parameters()]
    wrt = list(model.parameters()) + [msgd.lrs[MetaSGD.lr_key(n)] for n in names]
    got = torch.autograd.grad(res.loss, wrt)
    lrs = {n: msgd.lrs[MetaSGD.lr_key(n)] for n in names}
    ref_loss, ref = naive_meta_grads(model, batch, 2, None, first_order, F.mse_loss, lrs=lrs)
    torch.testing.assert_close(res.loss, ref_loss, **TOL)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)
    assert all(g.abs().sum() > 0 for g in got[len(names):])  # the lrs learn, first order too
    # clone/adapt gives the same loss and gradients (lrs cloned, differentiable)
    loss, grads = clone_adapt_grads(msgd, batch, 2, lambda o, y: F.mse_loss(o, y), per_task=lambda x: x[None])
    torch.testing.assert_close(loss, res.loss, **TOL)
    by_param = dict(zip([id(p) for p in msgd.parameters()], grads))
    for p, g in zip(wrt, got):
        torch.testing.assert_close(by_param[id(p)], g, **TOL)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_anil_matches_naive_head_loop(first_order):
    torch.manual_seed(0)
    features = nn.Sequential(nn.Linear(3, 5), nn.Tanh()).to(DT)
    head = nn.Linear(5, 4).to(DT)
    anil = ANIL(features, head, 0.5, first_order=first_order)
    sx, sy, qx, qy = class_batch(T=3, n=4, shape=(3,), Q=2)
    res = anil.meta_loss(sx, sy, qx, qy, steps=2)
    params = list(anil.parameters())
    got = torch.autograd.grad(res.loss, params)
    # naive: features once over everything, per-task head adaptation with create_graph
    T, S = sx.shape[:2]
    z = features(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)]))
    zs, zq = z[: T * S].view(T, S, -1), z[T * S:].view(T, qx.shape[1], -1)
    total = 0.0
    for t in range(T):
        p = dict(head.named_parameters())
        for _ in range(2):
            g = torch.autograd.grad(F.cross_entropy(functional_call(head, p, (zs[t],)), sy[t]), list(p.values()),
                                    create_graph=not first_order)
            p = {n: v - 0.5 * gi for (n, v), gi in zip(p.items(), g)}
        total = total + F.cross_entropy(functional_call(head, p, (zq[t],)), qy[t]) / T
    ref = torch.autograd.grad(total, params)
    torch.testing.assert_close(res.loss, total, **TOL)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)
    # learn2learn-style: features shared, head cloned and adapted
    learner = anil.clone()
    assert learner.features is features and learner.head is not head
    learner.adapt(F.cross_entropy(learner(sx[0]), sy[0]))
    assert not torch.equal(learner.head.weight, head.weight)


# ---- chunking, evaluation ---------------------------------------------------------------------


def _grads(meta, res):
    return torch.autograd.grad(res.loss, [p for p in meta.parameters() if p.requires_grad])


@pytest.mark.parametrize("which", ["maml", "metasgd", "anil"])
def test_task_chunk_gives_the_same_loss_and_gradients(which):
    torch.manual_seed(0)
    if which == "anil":
        meta = ANIL(nn.Sequential(nn.Linear(3, 5), nn.Tanh()).to(DT), nn.Linear(5, 4).to(DT), 0.5)
        batch, loss_fn = class_batch(T=5, n=4, shape=(3,), Q=2), F.cross_entropy
    else:
        cls = MetaSGD if which == "metasgd" else MAML
        meta = cls(TaskMLP([1, 6, 1], activation="tanh").to(DT), 0.1).to(DT)
        batch, loss_fn = regression_batch(T=5), F.mse_loss
    full = meta.meta_loss(*batch, steps=2, loss_fn=loss_fn)
    ref = _grads(meta, full)
    for chunk in (1, 2, 5, 7):
        part = meta.meta_loss(*batch, steps=2, loss_fn=loss_fn, task_chunk=chunk)
        torch.testing.assert_close(part.loss, full.loss, **TOL)
        torch.testing.assert_close(part.task_metric, full.task_metric, **TOL)
        for g, r in zip(_grads(meta, part), ref):
            torch.testing.assert_close(g, r, **TOL)
    scaled = meta.meta_loss(*batch, steps=2, loss_fn=loss_fn, task_chunk=2)
    (3 * scaled.loss).backward()  # backward() through the chunked loss, scaled upstream
    for p, r in zip([p for p in meta.parameters() if p.requires_grad], ref):
        torch.testing.assert_close(p.grad, 3 * r, **TOL)
    with torch.no_grad():
        ev = meta.meta_loss(*batch, steps=2, loss_fn=loss_fn, task_chunk=2)
    assert ev.loss.grad_fn is None
    torch.testing.assert_close(ev.loss, full.loss.detach(), **TOL)


def test_evaluation_under_no_grad_still_adapts():
    torch.manual_seed(0)
    learner = EpisodicLearner(MAML(TaskMLP([1, 8, 1]).to(DT), 0.05), steps=1, test_steps=5, loss_fn=F.mse_loss)
    b = fastmeta.data.SinusoidTasks().sample(4, 20, torch.Generator().manual_seed(0), dtype=DT)
    batch = b.x[:, :10], b.y[:, :10], b.x[:, 10:], b.y[:, 10:]
    learner.eval()
    with torch.no_grad():
        mse = learner.episode_accuracy(*batch)
    ref = learner.meta.meta_loss(*batch, steps=5, loss_fn=F.mse_loss).task_metric
    torch.testing.assert_close(mse, ref, **TOL)
    zero = learner.meta.meta_loss(*batch, steps=0, loss_fn=F.mse_loss).task_metric
    assert mse.mean() < zero.mean()  # 5 steps on the support lower the query error
    res = learner.evaluate([batch] * 2, episodes=6)
    assert res.metric == "mse" and res.episodes == 6 and "mse" in str(res)


def test_classification_metric_is_accuracy():
    torch.manual_seed(0)
    learner = EpisodicLearner(MAML(nn.Sequential(nn.Linear(3, 4)).to(DT), 0.5), steps=1)
    batch = class_batch(T=3, n=4, shape=(3,), Q=2)
    loss, acc = learner(*batch)
    assert loss.requires_grad and 0 <= float(acc) <= 1
    out = learner.meta.meta_loss(*batch)
    assert out.accuracy is not None and out.mse is None


# ---- bad inputs -------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    maml = MAML(TaskMLP([1, 4, 1]).to(DT), 0.1)
    sx, sy, qx, qy = regression_batch(T=3)
    with pytest.raises(ValueError, match="mismatched number of tasks T"):
        maml.meta_loss(sx, sy, qx[:2], qy[:2], loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="agree on"):
        maml.meta_loss(sx, sy[:, :2], qx, qy, loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        maml.meta_loss(sx, sy, qx, qy, steps=-1, loss_fn=F.mse_loss)
    with pytest.raises(TypeError, match="steps must be an int"):
        maml.meta_loss(sx, sy, qx, qy, steps=1.0, loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="task_chunk"):
        maml.meta_loss(sx, sy, qx, qy, loss_fn=F.mse_loss, task_chunk=0)
    with pytest.raises(ValueError, match=r"\[T, N, \.\.\.\]"):
        maml.meta_loss(sx[0, 0], sy, qx, qy)
    for bad in ("0.1", None, True, torch.tensor(1)):
        with pytest.raises(TypeError, match="lr must be a float"):
            MAML(nn.Linear(1, 1), bad)
    with pytest.raises(TypeError, match="lr must be a float"):
        MetaSGD(nn.Linear(1, 1), "1.0")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        MAML(lambda x: x, 0.1)
    with pytest.raises(TypeError, match="loss must be a scalar tensor"):
        maml.clone().adapt(1.0)


def test_top_level_exports():
    assert fastmeta.MAML is MAML and fastmeta.MetaSGD is MetaSGD and fastmeta.ANIL is ANIL


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_sinusoid_trains_reports_mse_and_resumes(tmp_path):
    run = tmp_path / "run"
    base = ["train", "maml", "--dataset", "sinusoid", "--batch", "10", "--lr", "1e-2", "--val-every", "40",
            "--val-episodes", "16", "--test-episodes", "32", "--test-inner-steps", "5", "--ckpt-every", "40",
            "--train-queries", "5", "--run-dir", str(run), "--no-progress", "--device", "cpu"]
    assert cli.main(base + ["--steps", "80"]) == 0
    out = json.loads((run / "results.json").read_text())
    assert out["steps"] == 80 and out["test_episodes"] == 32 and 0 < out["test_mse"] < 10
    assert (run / "adaptation.png").stat().st_size > 1000 and (run / "learning_curve.png").exists()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,mse,val_mse,val_ci95")
    losses = [float(r.split(",")[1]) for r in rows[1:] if r.split(",")[1]]
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses  # the meta-training loss falls
    assert cli.main(base + ["--steps", "100", "--resume"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 100


def test_cli_rejects_sinusoid_for_classifiers():
    with pytest.raises(SystemExit, match="regression"):
        cli.main(["train", "protonet", "--dataset", "sinusoid", "--no-progress"])


def test_cli_builds_the_maml_family_for_images():
    for name in ("maml", "metasgd", "anil"):
        args = cli.build_parser().parse_args(["train", name, "--hidden", "4", "--first-order", "--task-chunk", "2"])
        cli.resolve_defaults(args, cli.LEARNERS[name])
        assert (args.batch, args.inner_lr, args.test_inner_steps) == (32, 0.4, 3)
        learner = cli.LEARNERS[name].build(args, 1)
        x = torch.rand(2, 5, 1, 28, 28)
        y = torch.arange(5).repeat(2, 1)
        loss, acc = learner(x, y, x, y)
        assert loss.requires_grad and learner.meta.first_order and learner.task_chunk == 2
