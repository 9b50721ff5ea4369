"""Per-task replay buffers (fastmeta.rl.replay.TaskReplay) and the sampler's next observations."""

import pytest
import torch

from fastmeta import rl
from fastmeta.rl.replay import TaskReplay


def transitions(T, M, start=0.0):
    """Transitions whose reward numbers them: task t, step m has reward start + 100 t + m."""
    r = start + 100 * torch.arange(T)[:, None] + torch.arange(M)[None]
    r = r.float()
    return (r[..., None].expand(T, M, 2), -r[..., None].expand(T, M, 3), r,
            r[..., None].expand(T, M, 2) + 0.5)


def test_add_with_mask_and_sample_only_valid_slots():
    buf = TaskReplay(4, 10, obs_dim=2, act_dim=3)
    o, a, r, o2 = transitions(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    buf.add(torch.tensor([3, 1]), o, a, r, o2, mask)
    assert buf.size.tolist() == [0, 6, 0, 3] and buf.ptr.tolist() == [0, 6, 0, 3]
    s = buf.sample(torch.tensor([3, 1, 3]), 500, torch.Generator().manual_seed(0))
    assert s["rewards"].shape == (3, 500) and s["obs"].shape == (3, 500,
                                                                 2) and s["actions"].shape == (3,
                                                                                               500,
                                                                                               3)
    assert set(s["rewards"][0].tolist()) == {0.0, 1.0, 2.0}  # task 3 got task-row 0's first 3 steps
    assert set(s["rewards"][1].tolist()) == {100.0 + m for m in range(6)}
    # fields of one draw belong to one transition
    torch.testing.assert_close(s["next_obs"][..., 0], s["rewards"] + 0.5)
    torch.testing.assert_close(s["actions"][..., 0], -s["rewards"])


def test_wrap_around_keeps_the_newest():
    buf = TaskReplay(1, 5, obs_dim=2, act_dim=3)
    ids = torch.tensor([0])
    buf.add(ids, *transitions(1, 3))
    buf.add(ids, *transitions(1, 4, start=10.0))
    assert buf.size.tolist() == [5] and buf.ptr.tolist() == [2]
    # ring order: slots 0, 1 overwritten by the 3rd and 4th new transitions
    assert buf.data["rewards"][0].tolist() == [12.0, 13.0, 2.0, 10.0, 11.0]
    s = buf.sample(ids, 400, torch.Generator().manual_seed(1))
    assert set(s["rewards"][0].tolist()) == {2.0, 10.0, 11.0, 12.0, 13.0}


def test_clear_state_dict_and_reproducible_sampling():
    buf = TaskReplay(3, 8, obs_dim=2, act_dim=3)
    buf.add(torch.tensor([0, 1, 2]), *transitions(3, 5))
    buf.clear(torch.tensor([1]))
    assert buf.size.tolist() == [5, 0, 5]
    with pytest.raises(ValueError, match=r"tasks \[1\] have no transitions"):
        buf.sample(torch.tensor([0, 1]), 4)
    other = TaskReplay(3, 8, obs_dim=2, act_dim=3)
    other.load_state_dict(buf.state_dict())
    a = buf.sample(torch.tensor([2, 0]), 7, torch.Generator().manual_seed(5))
    b = other.sample(torch.tensor([2, 0]), 7, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"obs must have shape \[3, 9, 2\]"):
        TaskReplay(3, 9, 2, 3).load_state_dict(buf.state_dict())


def test_bad_inputs():
    buf = TaskReplay(2, 4, obs_dim=2, act_dim=3)
    o, a, r, o2 = transitions(2, 3)
    with pytest.raises(ValueError, match="distinct"):
        buf.add(torch.tensor([1, 1]), o, a, r, o2)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        buf.add(torch.tensor([0, 2]), o, a, r, o2)
    with pytest.raises(TypeError, match="int64"):
        buf.add(torch.tensor([0.0, 1.0]), o, a, r, o2)
    bad = r.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="rewards has NaN"):
        buf.add(torch.tensor([0, 1]), o, a, bad, o2)
    with pytest.raises(ValueError, match="obs must have shape"):
        buf.add(torch.tensor([0, 1]), o[..., :1], a, r, o2)
    with pytest.raises(ValueError, match="at most capacity=4"):
        buf.add(torch.tensor([0, 1]), *transitions(2, 5))
    assert buf.size.tolist() == [0, 0]  # nothing half-written
    with pytest.raises(ValueError, match="n_tasks"):
        TaskReplay(0, 4, 2, 3)


def test_sampler_next_obs_and_add_rollout():
    dist = rl.make("nav2d", horizon=6, goal_box=0.0)
    tasks = dist.sample_tasks(3, seed=0)
    g = torch.Generator().manual_seed(0)
    ro = rl.sample(dist, lambda obs: 0.1 * torch.randn(obs.shape, generator=g), tasks, 2, seed=0)
    assert ro.next_obs.shape == ro.obs.shape
    assert torch.equal(ro.next_obs[:, :, :-1], ro.obs[:, :, 1:])
    final = (ro.obs[:, :, -1] + ro.actions[:, :, -1].clamp(-0.1, 0.1))
    torch.testing.assert_close(ro.next_obs[:, :, -1], final)
    buf = TaskReplay(5, 20, 2, 2)
    buf.add_rollout(torch.tensor([4, 0, 2]), ro)
    assert buf.size.tolist() == [12, 0, 12, 0, 12]
    torch.testing.assert_close(buf.data["rewards"][4, :12], ro.rewards[0].flatten())
