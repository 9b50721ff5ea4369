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
