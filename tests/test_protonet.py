"""ProtoNet learner and its training CLI: learning, evaluation with CI, the pixel baseline."""

import json

import pytest
import torch
from learner_helpers import blob_dataset

from fastmeta import cli, data
from fastmeta.learners import PixelNN, ProtoNet, confidence_interval
from fastmeta.nn import Conv4


def test_forward_shapes_and_batched_episodes():
    ds = blob_dataset()
    sx, sy, qx, qy, _ = next(iter(data.episodes(ds, "train", 5, 2, 3, batch_size=4, num_batches=1)))
    learner = ProtoNet(Conv4(1, hidden=16, blocks=3))
    loss, acc = learner(sx, sy, qx, qy)
    assert loss.dim() == 0 and 0 <= float(acc) <= 1
    rows, correct = learner(sx, sy, qx, qy, reduction="none")
    assert rows.shape == (4, 15) and correct.shape == (4, 15)
    assert learner.episode_accuracy(sx, sy, qx, qy).shape == (4,)


def test_short_training_run_learns():
    torch.manual_seed(0)
    ds = blob_dataset()
    learner = ProtoNet(Conv4(1, hidden=16, blocks=3))
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    losses = []
    for sx, sy, qx, qy, _ in data.episodes(ds, "train", 5, 1, 5, batch_size=4, num_batches=60):
        loss, _ = learner(sx, sy, qx, qy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    test = data.episodes(ds, "test", 5, 1, 5, batch_size=10, num_batches=10, seed=1)
    res = learner.evaluate(test, episodes=100)
    assert res.episodes == 100 and res.accuracy > 0.5, res  # chance is 0.2
    assert 0 < res.ci95 < 0.1


def test_pixel_nn_baseline_and_ci():
    ds = blob_dataset()
    test = data.episodes(ds, "test", 5, 1, 5, batch_size=10, num_batches=5)
    res = PixelNN().evaluate(test, episodes=50)
    assert 0.2 < res.accuracy <= 1.0
    ci = confidence_interval(torch.tensor([0.0, 1.0] * 50))
    assert ci.accuracy == 0.5 and abs(ci.ci95 - 1.96 * 0.50251 / 10) < 1e-4


def test_evaluate_raises_when_episodes_run_out():
    ds = blob_dataset()
    with pytest.raises(ValueError, match="ran out after 4 of 10"):
        PixelNN().evaluate(data.episodes(ds, "test", 5, 1, 2, batch_size=2, num_batches=2), episodes=10)


def test_bad_metric():
    with pytest.raises(ValueError, match="metric must be one of"):
        ProtoNet(Conv4(1), metric="l1")


def test_cli_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    ds = blob_dataset(size=16)  # the full Conv4 needs >= 16 pixels
    monkeypatch.setattr(data, "load_dataset", lambda name, root=None: ds)
    run = tmp_path / "run"
    base = ["train", "protonet", "--dataset", "glyphs", "--ways", "5", "--shots", "1", "--queries", "3",
            "--batch", "2", "--val-every", "4", "--val-episodes", "8", "--test-episodes", "20",
            "--ckpt-every", "4", "--run-dir", str(run), "--no-progress"]
    assert cli.main(base + ["--steps", "8"]) == 0
    out = json.loads((run / "results.json").read_text())
    assert out["steps"] == 8 and out["test_episodes"] == 20
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert cli.main(base + ["--steps", "12", "--resume"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 12
