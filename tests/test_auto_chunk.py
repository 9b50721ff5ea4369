"""``task_chunk="auto"`` (:func:`fastmeta.func.auto_task_chunk`): MAML's default meta-loss
chunks a CPU second-order meta-batch when one chunk's inner-step graphs would be large, with
the loss and float64 meta-gradients of one chunk; the one-task graph probe leaves the module's
buffers and the RNG as they were; no chunking where the inner loop keeps no graphs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.cli.recipes import _task_chunk
from fastmeta.func import _inner_loop as IL
from fastmeta.func import auto_task_chunk
from fastmeta.nn import TaskMLP

pytestmark = [pytest.mark.usefixtures("one_thread")]

T = 7


class Net(nn.Module):
    """A custom forward (traced path) with BatchNorm running statistics."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1))


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(T, 6, 1, 8, 8, generator=g, dtype=dtype), torch.randn(T, 3, 1, 8, 8, generator=g, dtype=dtype)
    sy, qy = torch.randint(0, 3, (T, 6), generator=g), torch.randint(0, 3, (T, 3), generator=g)
    return sx, sy, qx, qy


def _maml():
    torch.manual_seed(0)
    return fastmeta.MAML(Net().double(), lr=0.3)


def _per_task_bytes(maml, data, steps=2):
    fn = maml.task_function()
    assert auto_task_chunk(fn, fn.expand(T), data[0], data[1], steps) is None  # default sizes: all at once
    (per_task,) = IL._STEP_BYTES[fn].values()
    return per_task


def test_chunk_follows_the_step_target_and_the_keep_budget(monkeypatch):
    maml, data = _maml(), _data()
    fn = maml.task_function()
    per_task = _per_task_bytes(maml, data)
    monkeypatch.setattr(IL, "CHUNK_STEP_MB", 3.5 * per_task / 2**20)  # at most 3 tasks per step graph
    assert auto_task_chunk(fn, fn.expand(T), data[0], data[1], 2) == 3  # 7 tasks: 3 + 3 + 1 -> balanced 3, 3, 1
    monkeypatch.setattr(IL, "CHUNK_STEP_MB", 5 * per_task / 2**20)
    assert auto_task_chunk(fn, fn.expand(T), data[0], data[1], 2) == 4  # 2 chunks: 4 + 3
    # the keep budget bounds all steps' graphs of a chunk: 4 steps x 2 tasks
    monkeypatch.setattr(IL, "CHUNK_STEP_MB", 1024)
    monkeypatch.setenv("FASTMETA_KEEP_GRAPHS_MB", str(8.5 * per_task / 2**20))
    assert auto_task_chunk(fn, fn.expand(T), data[0], data[1], 4) == 2
    assert auto_task_chunk(fn, fn.expand(T), data[0], data[1], 2) == 4  # 2 steps x 4 tasks: 4 + 3
    assert auto_task_chunk(fn, fn.expand(T), data[0], data[1], 1) is None  # 8 tasks' worth >= 7


def test_no_chunk_where_no_graphs_are_kept(monkeypatch):
    monkeypatch.setattr(IL, "CHUNK_STEP_MB", 1e-6)  # any kept graph is "large"
    maml, (sx, sy, *_) = _maml(), _data()
    fn = maml.task_function()
    assert auto_task_chunk(fn, fn.expand(T), sx, sy, 1) == 1
    assert auto_task_chunk(fn, fn.expand(T), sx, sy, 0) is None  # no inner step
    assert auto_task_chunk(fn, fn.expand(T), sx, sy, 1, first_order=True) is None
    assert auto_task_chunk(fn, fn.expand(1), sx[:1], sy[:1], 1) is None  # one task
    with torch.no_grad():
        assert auto_task_chunk(fn, fn.expand(T), sx, sy, 1) is None
    monkeypatch.setenv("FASTMETA_KEEP_GRAPHS_MB", "0")  # keep nothing: recomputed anyway
    assert auto_task_chunk(fn, fn.expand(T), sx, sy, 1) == 1
    net = TaskMLP([3, 5, 2]).double()
    mlp = fastmeta.func.task_function(net)  # analytic HVPs: no graphs
    x, y = torch.randn(T, 4, 3, dtype=torch.float64), torch.randint(0, 2, (T, 4))
    assert auto_task_chunk(mlp, mlp.expand(T), x, y, 1) is None


def test_probe_leaves_buffers_and_rng_alone():
    maml, (sx, sy, *_) = _maml(), _data()
    maml.module.bn.running_mean.fill_(0.25)
    buffers = [b.clone() for b in maml.module.buffers()]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    fn = maml.task_function()
    auto_task_chunk(fn, fn.expand(T), sx, sy, 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(buffers, maml.module.buffers()))
    for p in maml.module.parameters():  # the module still holds its own Parameters
        assert isinstance(p, nn.Parameter) and p.grad is None


@pytest.mark.parametrize("steps", [1, 3])
def test_auto_meta_loss_equals_one_chunk(monkeypatch, steps):
    maml, data = _maml(), _data()
    per_task = _per_task_bytes(maml, data)
    params = list(maml.parameters())
    full = maml.meta_loss(*data, steps=steps, task_chunk=None)
    want = torch.autograd.grad(full.loss, params)
    buffers = [b.clone() for b in maml.module.buffers()]
    monkeypatch.setattr(IL, "CHUNK_STEP_MB", 2.5 * per_task / 2**20)
    auto = maml.meta_loss(*data, steps=steps)  # the default: "auto" -> chunks of 2 tasks
    assert "Chunked" in type(auto.loss.grad_fn).__name__
    got = torch.autograd.grad(auto.loss, params)
    torch.testing.assert_close(auto.loss, full.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(auto.task_metric, full.task_metric)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert all(torch.equal(a, b) for a, b in zip(buffers, maml.module.buffers()))
    with torch.no_grad():  # evaluation: one chunk, no graph
        ev = maml.meta_loss(*data, steps=steps)
    assert ev.loss.grad_fn is None


def test_task_chunk_values():
    maml, data = _maml(), _data()
    for bad in (0, -1, 2.5, "some", True):
        with pytest.raises(ValueError, match="task_chunk"):
            maml.meta_loss(*data, task_chunk=bad)
    assert _task_chunk("auto") == "auto" and _task_chunk("all") is None and _task_chunk("3") == 3
    import argparse
    for bad in ("0", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto"):
            _task_chunk(bad)
