"""The RL CLIs' resume check (fastmeta.cli.rl_common.check_resume): it refuses a checkpoint
written with other settings and reads only the checkpoint's metadata (the Trainer reads the
tensors, once)."""

import argparse
from pathlib import Path

import pytest
import torch

from fastmeta.cli.rl_common import check_resume
from fastmeta.train import checkpoint_extra, save_checkpoint


def _write(path: Path, n: int = 10) -> None:
    args = {"agent": "maml-trpo", "env": "nav2d", "hidden": 64}
    save_checkpoint(path, {"model": {"w": torch.arange(n, dtype=torch.float32)}, "step": 3,
                           "extra": {"args": args}})


def _args(**kw) -> argparse.Namespace:
    base = dict(resume=True, agent="maml-trpo", env="nav2d", hidden=64)
    return argparse.Namespace(**{**base, **kw})


def test_refuses_other_settings_and_accepts_the_same(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _write(path)
    check_resume(path, _args(), ("env", "hidden"))
    with pytest.raises(SystemExit, match="--hidden 64.*this run has 32"):
        check_resume(path, _args(hidden=32), ("env", "hidden"))
    with pytest.raises(SystemExit, match="--agent 'maml-trpo'"):
        check_resume(path, _args(agent="pearl"), ("env",))
    check_resume(path, _args(hidden=32, resume=False), ("env", "hidden"))  # not resuming
    check_resume(tmp_path / "none.pt", _args(hidden=32), ("env", "hidden"))  # nothing to resume


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_the_check_does_not_read_the_tensors(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _write(path, n=4_000_000)  # 16 MB of tensor data
    before = _bytes_read()
    assert checkpoint_extra(path) == {"args": {"agent": "maml-trpo", "env": "nav2d", "hidden": 64}}
    assert _bytes_read() - before < 1_000_000
    before = _bytes_read()
    torch.load(path, map_location="cpu", weights_only=True)  # what a full read costs
    assert _bytes_read() - before > 16_000_000
