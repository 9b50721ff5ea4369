"""The shared trainer: exact resume, atomic checkpoints, metrics CSV."""

import csv

import pytest
import torch
from learner_helpers import blob_dataset

from fastmeta import data
from fastmeta.learners import ProtoNet
from fastmeta.nn import Conv4
from fastmeta.train import Trainer, TrainConfig, load_checkpoint, save_checkpoint


def make_trainer(run_dir, steps, resume=False):
    torch.manual_seed(0)
    ds = blob_dataset()
    learner = ProtoNet(Conv4(1, hidden=8, blocks=2))
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)

    def batches(start):
        return iter(data.episodes(ds, "train", 5, 1, 3, batch_size=2, start=start, seed=7))

    def step(batch):
        return learner(*batch[:4])

    cfg = TrainConfig(steps=steps, log_every=1, val_every=10**9, ckpt_every=5, run_dir=run_dir,
                      resume=resume, progress=False)
    return Trainer(learner, opt, batches, step, None, cfg, scheduler=sched), learner


def losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_resume_reproduces_the_same_trajectory(tmp_path):
    straight, model_a = make_trainer(tmp_path / "a", 12)
    straight.fit()
    first, _ = make_trainer(tmp_path / "b", 7)  # checkpoint at 5, then the final one at 7
    first.fit()
    second, model_b = make_trainer(tmp_path / "b", 12, resume=True)
    second.fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for (k, va), vb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_resume_after_crash_drops_rows_past_the_checkpoint(tmp_path):
    run = tmp_path / "c"
    t, _ = make_trainer(run, 7)
    t.fit()
    # a crash after step 7's checkpoint at 5 would have logged rows 6..7 then died: emulate a
    # checkpoint from step 5 with rows up to 7 on disk
    state = load_checkpoint(run / "checkpoint.pt")
    state["step"] = 5
    save_checkpoint(run / "checkpoint.pt", state)
    t2, _ = make_trainer(run, 5, resume=True)
    t2.restore()
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


class _SelfUpdating(torch.nn.Module):
    """An agent whose step updates itself (like TRPO): w <- w - 0.1 * (w - target of the step)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def step(self, target):
        with torch.no_grad():
            loss = float(((self.w - target) ** 2).sum())
            self.w -= 0.1 * (self.w - target)
        return loss, -loss, {"pre_return": -loss - 1.0, "post_return": -loss}


def _agent_trainer(run_dir, steps, resume=False):
    agent = _SelfUpdating()

    def batches(start):
        return (torch.full((3,), float(i % 4)) for i in range(start, 10**6))

    cfg = TrainConfig(steps=steps, log_every=2, val_every=10**9, ckpt_every=3, run_dir=run_dir, resume=resume,
                      progress=False, metric="return", extra_fields=("pre_return", "post_return"),
                      plot_fields=("post_return",))
    return Trainer(agent, None, batches, agent.step, None, cfg), agent


def test_agent_without_optimizer_logs_extra_columns_and_resumes(tmp_path):
    straight, a = _agent_trainer(tmp_path / "a", 8)
    straight.fit()
    first, _ = _agent_trainer(tmp_path / "b", 5)
    first.fit()
    second, b = _agent_trainer(tmp_path / "b", 8, resume=True)
    second.fit()
    assert torch.equal(a.w, b.w)
    with open(tmp_path / "a" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-2:] == ["pre_return", "post_return"] and "return" in rows[0]
    # each logged value is the mean over its window of two steps
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    for r in rows:
        assert float(r["pre_return"]) == pytest.approx(float(r["post_return"]) - 1.0)
        assert float(r["return"]) == pytest.approx(float(r["post_return"]))
    assert (tmp_path / "a" / "learning_curve.png").exists()


def test_unknown_metric_is_refused(tmp_path):
    with pytest.raises(ValueError, match="metric must be one of"):
        Trainer(_SelfUpdating(), None, iter, None, None, TrainConfig(metric="reward", run_dir=tmp_path))
    with pytest.raises(ValueError, match="plot_fields"):
        Trainer(_SelfUpdating(), None, iter, None, None,
                TrainConfig(extra_fields=("kl",), plot_fields=("post_return",), run_dir=tmp_path))


def test_every_zero_means_never(tmp_path):
    agent = _SelfUpdating()
    calls = []

    def validate():
        calls.append(1)
        raise AssertionError("validation ran with val_every=0")

    cfg = TrainConfig(steps=3, log_every=0, val_every=0, ckpt_every=0, run_dir=tmp_path, progress=False,
                      metric="return", extra_fields=("pre_return", "post_return"))
    Trainer(agent, None, lambda s: (torch.ones(3) for _ in range(10**6)), agent.step, validate, cfg).fit()
    assert not calls and (tmp_path / "checkpoint.pt").exists()
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "metrics.csv", newline=""))] == [3]
