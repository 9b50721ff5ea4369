"""fastmeta.rl.sample: padded [T, E, H, ...] rollouts, masks, seeding, NaN detection."""

import pytest
import torch

import fastmeta.rl as rl
from fastmeta.rl import Rollout, TaskDistribution, sample

try:
    import gymnasium
    import mujoco  # noqa: F401
except ImportError:  # the rl extra is missing: the torch-only distributions are still tested
    gymnasium = None
needs_mujoco = pytest.mark.skipif(gymnasium is None, reason="needs gymnasium + mujoco (rl extra)")


class Countdown(TaskDistribution):
    """Test distribution whose episodes end early: episode e of task t lasts
    ``length[t] + e`` steps (capped by the horizon). obs = [steps so far], reward = the
    action's first coordinate + 10 * step; ``nan_at`` = (field, step, t, e) poisons one value."""

    obs_dim, act_dim, discrete = 1, 2, False

    def __init__(self, horizon=6, nan_at=None):
        super().__init__()
        self.name, self.horizon, self.nan_at = "countdown", horizon, nan_at
        self.task_shapes = {"length": ()}
        self.steps_taken = 0

    def _sample_tasks(self, n, generator):
        return {"length": torch.randint(1, self.horizon, (n,), generator=generator).float()}

    def _reset(self, tasks, episodes, seed):
        T = tasks["length"].shape[0]
        self._len = tasks["length"][:, None] + torch.arange(episodes)
        self._k = 0
        return torch.zeros(T, episodes, 1)

    def _step(self, actions):
        self._k += 1
        self.steps_taken += 1
        obs = torch.full((self.T, self.E, 1), float(self._k))
        reward = actions[..., 0] + 10.0 * (self._k - 1)
        if self.nan_at and self.nan_at[1] == self._k - 1:
            field, _, t, e = self.nan_at
            (obs[t, e] if field == "observation" else reward[t:t + 1, e]).fill_(float("nan"))
        return obs, reward, self._len <= self._k, {}


def _policy(dist, seed):
    g = torch.Generator().manual_seed(seed)

    def act(obs):
        assert not torch.is_grad_enabled()
        T, E = obs.shape[:2]
        if dist.discrete:
            return torch.randint(0, dist.act_dim, (T, E), generator=g)
        return 0.2 * torch.randn(T, E, dist.act_dim, generator=g)
    return act


@pytest.mark.parametrize("name,T,E", [("nav2d", 3, 4), ("bandit-k5-n10", 2, 3),
                                      ("tabular-mdp", 2, 5),
                                      pytest.param("cheetah-vel", 2, 1, marks=needs_mujoco)])
def test_shapes_dtypes_flat_to(name, T, E):
    dist = rl.make(name, horizon=7) if name != "bandit-k5-n10" else rl.make(name)
    H = dist.horizon
    ro = sample(dist, _policy(dist, 0), dist.sample_tasks(T, 0), episodes=E, seed=0)
    assert (ro.T, ro.E, ro.H) == (T, E, H)
    assert ro.obs.shape == (T, E, H, dist.obs_dim) and ro.obs.dtype == torch.float32
    if dist.discrete:
        assert ro.actions.shape == (T, E, H) and ro.actions.dtype == torch.int64
    else:
        assert ro.actions.shape == (T, E, H, dist.act_dim) and ro.actions.dtype == torch.float32
    assert ro.rewards.shape == ro.mask.shape == (T, E, H)
    assert ro.rewards.dtype == ro.mask.dtype == torch.float32
    assert torch.equal(ro.mask, torch.ones(T, E, H))  # these distributions have fixed horizons
    flat = ro.flat()
    assert flat.obs.shape == (T, E * H, dist.obs_dim) and flat.rewards.shape == (T, E * H)
    assert flat.obs.data_ptr() == ro.obs.data_ptr()  # views, not copies
    assert torch.equal(flat.actions[1, (E - 1) * H + 2], ro.actions[1, E - 1, 2])  # [t, e*H+h]
    moved = ro.to("cpu")
    assert isinstance(moved, Rollout) and torch.equal(moved.rewards, ro.rewards)
    torch.testing.assert_close(ro.returns(), ro.rewards.sum(-1))


def test_nav_rollout_contents():
    dist = rl.make("nav2d", horizon=9)
    tasks = dist.sample_tasks(2, 0)
    ro = sample(dist, _policy(dist, 1), tasks, episodes=3, seed=0)
    assert torch.equal(ro.obs[:, :, 0], torch.zeros(2, 3, 2))
    step = ro.actions.double().clamp(-0.1, 0.1)
    pos = step.cumsum(2)  # position after each step
    torch.testing.assert_close(ro.obs[:, :, 1:].double(), pos[:, :, :-1], rtol=0, atol=1e-6)
    ref = -(pos - tasks["goal"].double()[:, None, None]).norm(dim=-1)
    torch.testing.assert_close(ro.rewards.double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["nav2d", "bandit-k5-n10", "tabular-mdp",
                                  pytest.param("cheetah-dir", marks=needs_mujoco)])
def test_seeding(name):
    dist = rl.make(name, horizon=5) if name != "bandit-k5-n10" else rl.make(name)
    tasks = dist.sample_tasks(2, 0)
    a = sample(dist, _policy(dist, 0), tasks, 3, seed=4)
    b = sample(dist, _policy(dist, 0), tasks, 3, seed=4)
    c = sample(dist, _policy(dist, 1), tasks, 3, seed=5)
    for f in ("obs", "actions", "rewards", "mask"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.rewards, c.rewards)
    if name != "nav2d":  # env randomness alone (same policy seed) changes the rollout too
        d = sample(dist, _policy(dist, 0), tasks, 3, seed=5)
        assert not torch.equal(a.rewards, d.rewards) or not torch.equal(a.obs, d.obs)


def test_masks_for_episodes_that_end_early():
    dist = Countdown(horizon=8)
    tasks = {"length": torch.tensor([2.0, 4.0, 1.0])}
    ro = sample(dist, _policy(dist, 0), tasks, episodes=3, seed=0)
    length = (tasks["length"][:, None] + torch.arange(3)).clamp(max=8)  # [T, E]
    want = (torch.arange(8) < length[..., None]).float()
    assert torch.equal(ro.mask, want)
    pad = want == 0
    assert (ro.rewards[pad] == 0).all() and (ro.obs[pad] == 0).all()
    assert (ro.actions[pad] == 0).all()
    h = torch.arange(8).float().expand(3, 3, 8)
    torch.testing.assert_close(ro.rewards[~pad], (ro.actions[..., 0] + 10 * h)[~pad])
    torch.testing.assert_close(ro.obs[..., 0][~pad], h[~pad])
    assert dist.steps_taken == 6  # the longest episode (4 + 2): sampling stopped there
    torch.testing.assert_close(ro.returns(), (ro.rewards * want).sum(-1))


def test_all_done_before_horizon_then_nothing_more():
    dist = Countdown(horizon=5)
    ro = sample(dist, _policy(dist, 0), {"length": torch.ones(2)}, episodes=1, seed=0)
    assert ro.H == 5 and torch.equal(ro.mask[..., 0], torch.ones(2, 1))
    assert ro.mask[..., 1:].sum() == 0 and dist.steps_taken == 1


@pytest.mark.parametrize("field", ["observation", "reward"])
def test_nan_detection_names_distribution_field_step(field):
    dist = Countdown(horizon=6, nan_at=(field, 2, 1, 0))
    tasks = {"length": torch.full((2,), 5.0)}
    # an observation returned by step k is the one acted on at step k
    step = 3 if field == "observation" else 2
    with pytest.raises(ValueError, match=f"countdown: {field} has NaN or inf at step {step} "
                                         r"\(task 1, episode 0"):
        sample(dist, _policy(dist, 0), tasks, episodes=2, seed=0)


def test_nan_after_an_episode_ended_is_padding():
    # the episode (task 0, episode 0) lasts 1 step; garbage the env returns later is masked
    dist = Countdown(horizon=6, nan_at=("reward", 3, 0, 0))
    ro = sample(dist, _policy(dist, 0), {"length": torch.tensor([1.0, 5.0])}, 1, seed=0)
    assert torch.isfinite(ro.rewards).all() and ro.mask[0, 0].sum() == 1


def test_bad_policy_and_arguments():
    dist = rl.make("nav2d", horizon=3)
    tasks = dist.sample_tasks(2, 0)
    with pytest.raises(TypeError, match="policy must be callable"):
        sample(dist, None, tasks, 1, 0)
    with pytest.raises(TypeError, match="dist must be a TaskDistribution"):
        sample("nav2d", lambda o: o, tasks, 1, 0)
    with pytest.raises(ValueError, match=r"nav2d: actions must have shape \[T, E, act_dim\]"):
        sample(dist, lambda o: o[..., :1], tasks, 1, 0)
    with pytest.raises(ValueError, match="nav2d: actions contain NaN"):
        sample(dist, lambda o: o * float("nan"), tasks, 1, 0)
    with pytest.raises(ValueError, match=r"tasks\['goal'\] must have shape"):
        sample(dist, lambda o: o, {"goal": torch.zeros(2)}, 1, 0)
