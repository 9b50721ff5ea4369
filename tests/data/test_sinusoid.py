"""Sinusoid regression tasks (MAML section 5.1)."""

import math

import pytest
import torch

from fastmeta.data import SinusoidTasks


def test_ranges_shapes_and_function():
    tasks = SinusoidTasks()
    b = tasks.sample(500, 30, torch.Generator().manual_seed(0))
    assert b.x.shape == b.y.shape == (500, 30, 1) and b.amplitude.shape == b.phase.shape == (500,)
    assert b.x.dtype == torch.float32
    assert 0.1 <= b.amplitude.min() and b.amplitude.max() <= 5.0
    assert 0.0 <= b.phase.min() and b.phase.max() <= math.pi
    assert -5.0 <= b.x.min() and b.x.max() <= 5.0
    # The ranges are covered, not a corner of them.
    assert b.amplitude.min() < 0.3 and b.amplitude.max() > 4.8
    assert b.x.min() < -4.9 and b.x.max() > 4.9
    want = b.amplitude[:, None, None] * torch.sin(b.x - b.phase[:, None, None])
    torch.testing.assert_close(b.y, want, rtol=1e-5, atol=1e-5)
    grid = torch.linspace(*tasks.x_range, 200)
    curves = tasks.function(grid, b.amplitude[:3], b.phase[:3])
    assert curves.shape == (3, 200, 1)
    assert torch.allclose(curves.abs().amax(1).squeeze(1), b.amplitude[:3], rtol=1e-2)


def test_determinism():
    tasks = SinusoidTasks()
    a = tasks.sample(8, 10, torch.Generator().manual_seed(3))
    b = tasks.sample(8, 10, torch.Generator().manual_seed(3))
    c = tasks.sample(8, 10, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.x, c.x) and not torch.equal(a.amplitude, c.amplitude)
    g = torch.Generator().manual_seed(3)
    first, second = tasks.sample(8, 10, g), tasks.sample(8, 10, g)
    assert all(torch.equal(x, y) for x, y in zip(first, a))
    assert not torch.equal(second.x, first.x)


def test_options_and_errors():
    tasks = SinusoidTasks(amplitude=(1.0, 1.0), phase=(0.0, 0.0), x_range=(0.0, 1.0))
    b = tasks.sample(2, 5, dtype=torch.float64)
    assert b.x.dtype == torch.float64 and (b.amplitude == 1).all() and (b.phase == 0).all()
    torch.testing.assert_close(b.y, torch.sin(b.x))
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidTasks(amplitude=(5.0, 0.1))
    with pytest.raises(ValueError, match="num_points"):
        tasks.sample(2, 0)
    with pytest.raises(ValueError, match="num_tasks"):
        tasks.sample(2.5, 3)
