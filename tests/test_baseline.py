"""Baseline / Baseline++ (Chen et al. 2019): batched head fits vs per-episode fits (float64),
cosine logits, pretraining on global labels, evaluation, bad input, the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from learner_helpers import blob_dataset

import fastmeta
from fastmeta import cli, data
from fastmeta.cli import recipes
from fastmeta.learners import Baseline, EvalResult, cosine_logits, fit_heads
from fastmeta.nn import Conv4


def _loop_fit(z, y, n_way, head, steps, lr, scale, w0, b0):
    """One episode's fit by hand: SGD with momentum 0.9, dampening 0.9, weight decay 1e-3
    (torch.optim.SGD's update written out), full batch."""
    w = w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if head == "linear" else None
    params = [w] + ([b] if b is not None else [])
    bufs = [None] * len(params)
    for _ in range(steps):
        if head == "linear":
            logits = z @ w.T + b
        else:
            logits = scale * (z / z.norm(dim=1, keepdim=True).clamp_min(1e-5)) @ \
                (w / w.norm(dim=1, keepdim=True).clamp_min(1e-5)).T
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                g = g + 1e-3 * p
                bufs[i] = g.clone() if bufs[i] is None else 0.9 * bufs[i] + 0.1 * g
                p -= lr * bufs[i]
    return w.detach(), None if b is None else b.detach()


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_batched_fit_equals_per_episode_fit(head):
    g = torch.Generator().manual_seed(0)
    B, N, K, D = 3, 4, 2, 6
    z = torch.randn(B, N * K, D, generator=g, dtype=torch.float64)
    y = torch.stack([torch.randperm(N * K, generator=g) % N for _ in range(B)])
    w0 = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    b0 = torch.randn(B, N, generator=g, dtype=torch.float64) if head == "linear" else None
    w, b = fit_heads(z, y, N, head, steps=7, lr=0.3, scale=5.0, init=(w0, b0))
    assert w.dtype == torch.float64 and w.shape == (B, N, D)
    assert not torch.allclose(w, w0)  # it moved
    for t in range(B):
        wt, bt = _loop_fit(z[t], y[t], N, head, 7, 0.3, 5.0, w0[t], None if b0 is None else b0[t])
        torch.testing.assert_close(w[t], wt, rtol=0, atol=1e-10)
        if head == "linear":
            torch.testing.assert_close(b[t], bt, rtol=0, atol=1e-10)
        else:
            assert b is None


def test_fit_reduces_support_loss_and_default_init_is_seeded():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 10, 8, generator=g, dtype=torch.float64)
    y = torch.arange(5).repeat(2).expand(5, 10).contiguous()
    for head in ("linear", "cosine"):
        w0, b0 = fit_heads(z, y, 5, head, steps=0)
        w, b = fit_heads(z, y, 5, head, steps=100, lr=0.1)
        loss = [F.cross_entropy(fastmeta.learners.baseline.head_logits(z, ww, bb, head, 10.0).flatten(0, 1),
                                y.flatten()) for ww, bb in ((w0, b0), (w, b))]
        assert loss[1] < 0.5 * loss[0], (head, loss)
        torch.testing.assert_close(fit_heads(z, y, 5, head, steps=3)[0], fit_heads(z, y, 5, head, steps=3)[0])
        assert not torch.equal(fit_heads(z, y, 5, head, steps=0, seed=1)[0], w0)


def test_cosine_logits():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    out = cosine_logits(z, w, 7.0)
    for b in range(2):
        for m in range(5):
            for c in range(3):
                ref = 7.0 * float(z[b, m] @ w[b, c]) / (float(z[b, m].norm()) * float(w[b, c].norm()))
                assert math.isclose(float(out[b, m, c]), ref, rel_tol=1e-12)
    assert out.abs().max() <= 7.0 + 1e-12
    assert torch.equal(cosine_logits(z * 3.0, w * 0.5, 7.0), out) or \
        torch.allclose(cosine_logits(z * 3.0, w * 0.5, 7.0), out, rtol=0, atol=1e-12)  # scale-invariant


def test_global_labels_follow_episode_classes():
    learner = Baseline(Conv4(1, hidden=8, blocks=3), 8, [7, 3, 11])
    sy = torch.tensor([[0, 1, 1], [1, 0, 0]])
    classes = torch.tensor([[11, 3], [7, 11]])
    assert learner.global_labels(sy, classes).tolist() == [[2, 1, 1], [2, 0, 0]]
    with pytest.raises(ValueError, match="outside the 3 pretraining classes"):
        learner.global_labels(sy, torch.tensor([[11, 5], [7, 11]]))


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_pretraining_learns_and_evaluates(head):
    torch.manual_seed(0)
    ds = blob_dataset()
    learner = Baseline(Conv4(1, hidden=16, blocks=3), 16, ds.classes("train"), head=head, learn_scale=True,
                       finetune_steps=50, finetune_lr=0.1)
    opt = torch.optim.Adam(learner.parameters(), 3e-3)
    losses = []
    for sx, sy, qx, qy, classes in data.episodes(ds, "train", 6, 1, 3, batch_size=2, num_batches=40):
        loss, acc = learner(sx, sy, qx, qy, classes=classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8, losses
    if head == "cosine":
        assert learner.scale.grad is not None
    sx, sy, qx, qy, classes = next(iter(data.episodes(ds, "train", 5, 1, 2, batch_size=2, num_batches=1)))
    rows, correct = learner(sx, sy, qx, qy, reduction="none", classes=classes)
    assert rows.shape == correct.shape == (2, 15)
    test = data.episodes(ds, "test", 5, 1, 5, batch_size=10, num_batches=4, seed=1)
    res = learner.evaluate(test, episodes=40)
    assert isinstance(res, EvalResult) and res.episodes == 40 and res.accuracy > 0.4, res  # chance 0.2
    assert learner.training  # evaluate restores the mode
    loss, correct = learner(sx, sy, qx, qy, reduction="none")
    assert loss.shape == correct.shape == (2, 10) and loss.grad_fn is None  # backbone frozen


def test_bad_input():
    with pytest.raises(ValueError, match="head must be one of"):
        Baseline(Conv4(1), 64, 5, head="rbf")
    for bad in ([1, 1], [], [[0, 1]], -1, [-1, 2]):
        with pytest.raises(ValueError, match="classes must be"):
            Baseline(Conv4(1), 64, bad)
    z, y = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="support_y must lie in"):
        fit_heads(z, y + 5, 5)
    with pytest.raises(ValueError, match="support_z must be"):
        fit_heads(z[0], y[0], 5)
    with pytest.raises(TypeError, match="int64"):
        fit_heads(z, y.float(), 5)
    with pytest.raises(ValueError, match="steps must be"):
        fit_heads(z, y, 5, steps=-1)
    with pytest.raises(ValueError, match="init must be"):
        fit_heads(z, y, 5, init=(torch.zeros(2, 5, 3), None))
    learner = Baseline(Conv4(1, hidden=8, blocks=3), 8, 5)
    x = torch.rand(2, 4, 1, 12, 12)
    with pytest.raises(ValueError, match="reduction"):
        learner(x, y, x, y, reduction="sum")
    with pytest.raises(ValueError, match="expected support_x"):
        learner(x[0], y[0], x[0], y[0])
    with pytest.raises(ValueError, match="classes must be"):
        learner(x, y, x, y, classes=torch.zeros(3, 5, dtype=torch.long))


@pytest.mark.parametrize("name", ["baseline", "baseline++"])
def test_cli_trains_and_evaluates(name, tmp_path, monkeypatch):
    ds = blob_dataset(size=16)  # the full Conv4 needs >= 16 pixels
    monkeypatch.setattr(data, "load_dataset", lambda name, root=None: ds)
    run = tmp_path / "run"
    args = ["train", name, "--dataset", "glyphs", "--ways", "5", "--shots", "1", "--queries", "3",
            "--steps", "3", "--val-every", "2", "--val-episodes", "4", "--test-episodes", "8",
            "--ckpt-every", "2", "--run-dir", str(run), "--no-progress"]
    assert cli.main(args) == 0
    out = json.loads((run / "results.json").read_text())
    assert out["steps"] == 3 and out["test_episodes"] == 8 and 0 <= out["test_accuracy"] <= 1
    assert cli.main(args[:args.index("--steps") + 1] + ["5"] + args[args.index("--steps") + 2:] + ["--resume"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 5
    assert name not in recipes.DEMO_SKIP  # in the demo


def test_default_finetune_lr_depends_on_the_head():
    assert Baseline(Conv4(1), 64, 5).finetune_lr == 0.1
    assert Baseline(Conv4(1), 64, 5, head="cosine").finetune_lr == 0.03
    assert Baseline(Conv4(1), 64, 5, head="cosine", finetune_lr=0.5).finetune_lr == 0.5
