"""fastmeta.rl.envs: bad input raises ValueError/TypeError naming what was wrong."""

import pytest
import torch

import fastmeta.rl as rl



def test_bad_input():
    nav, band = rl.make("nav2d"), rl.make("bandit-k3-n4")
    with pytest.raises(ValueError, match="before reset"):
        nav.step(torch.zeros(1, 1, 2))
    with pytest.raises(TypeError, match="n must be an int"):
        nav.sample_tasks(2.0, 0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        nav.sample_tasks(2, -1)
    with pytest.raises(TypeError, match="tasks must be a dict"):
        nav.reset(torch.zeros(2, 2), 1, 0)
    with pytest.raises(ValueError, match=r"keys \['goal'\], got \['target'\]"):
        nav.reset({"target": torch.zeros(2, 2)}, 1, 0)
    with pytest.raises(ValueError, match=r"tasks\['goal'\] must have shape \[T, 2\], got \[2, 3\]"):
        nav.reset({"goal": torch.zeros(2, 3)}, 1, 0)
    with pytest.raises(ValueError, match="NaN"):
        nav.reset({"goal": torch.tensor([[0.0, float("nan")]])}, 1, 0)
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        nav.reset(nav.sample_tasks(2, 0), 0, 0)
    with pytest.raises(ValueError, match=r"probs'\] must be floating point in \[0, 1\]"):
        band.reset({"probs": torch.full((2, 3), 1.5)}, 1, 0)
    with pytest.raises(ValueError, match="rows summing to 1"):
        rl.make("tabular-mdp", states=2, actions=1).reset(
            {"transitions": torch.ones(1, 2, 1, 2), "reward_means": torch.zeros(1, 2, 1)}, 1, 0)
    nav.reset(nav.sample_tasks(2, 0), 3, 0)
    with pytest.raises(ValueError, match=r"shape \[T, E, act_dim\] = \[2, 3, 2\], got \[2, 3\]"):
        nav.step(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating-point.*got torch.int64"):
        nav.step(torch.zeros(2, 3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a torch.Tensor, got ndarray"):
        nav.step(torch.zeros(2, 3, 2).numpy())
    bad = torch.zeros(2, 3, 2)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="actions contain NaN or inf"):
        nav.step(bad)
    band.reset(band.sample_tasks(2, 0), 3, 0)
    with pytest.raises(TypeError, match="integer tensor.*got torch.float32"):
        band.step(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[0, 3\), got values in \[0, 3\]"):
        band.step(torch.tensor([[0, 1, 3], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"shape \[T, E\] = \[2, 3\], got \[2, 3, 1\]"):
        band.step(torch.zeros(2, 3, 1, dtype=torch.long))


def test_bad_cheetah_direction():
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    with pytest.raises(ValueError, match="direction'\\] must be \\+1 or -1"):
        rl.make("cheetah-dir").check_tasks({"direction": torch.tensor([0.5])})
