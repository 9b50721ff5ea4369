"""fastmeta.rl.envs: rewards equal their formulas, seeding, statistics (bad input:
test_env_errors.py)."""

import math

import numpy as np
import pytest
import torch

import fastmeta.rl as rl
from fastmeta.rl.envs import BernoulliBandit, HalfCheetahTasks, Navigation2D, TabularMDP

try:
    import gymnasium
    import mujoco  # noqa: F401
except ImportError:  # the rl extra is missing: the torch-only distributions are still tested
    gymnasium = None
needs_mujoco = pytest.mark.skipif(gymnasium is None, reason="needs gymnasium + mujoco (rl extra)")

TORCH_DISTS = ["nav2d", "bandit-k5-n10", "tabular-mdp"]
CHEETAHS = [pytest.param(n, marks=needs_mujoco) for n in ("cheetah-vel", "cheetah-dir")]
ALL_DISTS = TORCH_DISTS + CHEETAHS


def _random_actions(dist, g, T, E, scale=0.3):
    if dist.discrete:
        return torch.randint(0, dist.act_dim, (T, E), generator=g)
    return scale * torch.randn(T, E, dist.act_dim, generator=g)


@needs_mujoco
def test_make_cheetah():
    c = rl.make("cheetah-dir")
    assert isinstance(c, HalfCheetahTasks) and (c.obs_dim, c.act_dim, c.horizon) == (17, 6, 100)


def test_make_registry():
    assert isinstance(rl.make("nav2d"), Navigation2D)
    b = rl.make("bandit-k7-n30")
    assert isinstance(b, BernoulliBandit) and (b.act_dim, b.horizon, b.obs_dim) == (7, 30, 1)
    m = rl.make("tabular-mdp", states=4, actions=3, horizon=6)
    assert isinstance(m, TabularMDP) and (m.obs_dim, m.act_dim, m.horizon) == (4, 3, 6)
    assert rl.make("tabular-mdp").horizon == 10  # the RL^2 paper's episode length
    with pytest.raises(ValueError, match="unknown task distribution 'ant'.*nav2d.*tabular-mdp"):
        rl.make("ant")
    with pytest.raises(TypeError, match="no keyword"):
        rl.make("bandit-k5-n10", arms=3)
    with pytest.raises(ValueError, match="arms must be >= 1"):
        rl.make("bandit-k0-n10")


@pytest.mark.parametrize("name", ALL_DISTS)
def test_sample_tasks_pure_function_of_seed(name):
    dist = rl.make(name)
    a, b, c = dist.sample_tasks(6, 3), dist.sample_tasks(6, 3), dist.sample_tasks(6, 4)
    assert set(a) == set(dist.task_shapes)
    for k in a:
        assert a[k].shape == (6, *dist.task_shapes[k])
        assert torch.equal(a[k], b[k])
    if name != "cheetah-dir":  # six +-1 coins may coincide; checked on more tasks below
        assert any(not torch.equal(a[k], c[k]) for k in a)
    else:
        assert not torch.equal(dist.sample_tasks(64, 3)["direction"],
                               dist.sample_tasks(64, 4)["direction"])


@needs_mujoco
def test_cheetah_task_ranges():
    v = rl.make("cheetah-vel").sample_tasks(2000, 0)["velocity"]
    assert v.min() >= 0 and v.max() <= 2 and abs(v.mean().item() - 1) < 0.05
    d = rl.make("cheetah-dir").sample_tasks(2000, 0)["direction"]
    assert set(d.tolist()) == {-1.0, 1.0} and abs(d.mean().item()) < 0.1


def test_task_ranges():
    g = rl.make("nav2d").sample_tasks(2000, 0)["goal"]
    assert g.abs().max() <= 0.5 and g.min() < -0.45 and g.max() > 0.45
    p = rl.make("bandit-k5-n10").sample_tasks(2000, 0)["probs"]
    assert p.min() >= 0 and p.max() <= 1 and abs(p.mean().item() - 0.5) < 0.02
    tasks = rl.make("tabular-mdp", states=4).sample_tasks(3000, 0)
    P, R = tasks["transitions"], tasks["reward_means"]
    assert torch.allclose(P.sum(-1), torch.ones(()), atol=1e-6) and P.min() >= 0
    # Dirichlet(1,1,1,1): each coordinate ~ Beta(1, 3): mean 1/4, variance 3/80
    assert abs(P.mean().item() - 0.25) < 1e-6 and abs(P.var().item() - 3 / 80) < 2e-3
    assert abs(R.mean().item() - 1) < 0.02 and abs(R.std().item() - 1) < 0.02


def test_navigation_reward_formula_float64():
    dist = rl.make("nav2d", horizon=12)
    tasks = dist.sample_tasks(3, 1)
    obs = dist.reset(tasks, 4, seed=0)
    assert obs.dtype == torch.float32 and torch.equal(obs, torch.zeros(3, 4, 2))
    g = torch.Generator().manual_seed(0)
    pos = torch.zeros(3, 4, 2, dtype=torch.float64)
    goal = tasks["goal"].double()[:, None]
    for h in range(12):
        a = 0.2 * torch.randn(3, 4, 2, generator=g)  # about half of them beyond the clip
        obs, rew, done, _ = dist.step(a)
        pos = pos + a.double().clamp(-0.1, 0.1)
        ref = -((pos - goal) ** 2).sum(-1).sqrt()
        torch.testing.assert_close(obs.double(), pos, rtol=0, atol=1e-6)
        torch.testing.assert_close(rew.double(), ref, rtol=0, atol=1e-6)
        assert rew.dtype == torch.float32 and done.dtype == torch.bool
        assert bool(done.all()) == (h == 11)
    with pytest.raises(ValueError, match="every episode has ended"):
        dist.step(a)


def test_bandit_reward_statistics():
    # T=3 tasks, E=4000 episodes x 10 pulls of random arms: ~8000 pulls per (task, arm); the
    # empirical mean must be within 5 standard errors sqrt(p(1-p)/N) (+1e-3) of the arm's p
    dist = rl.make("bandit-k5-n10")
    tasks = dist.sample_tasks(3, 0)
    obs = dist.reset(tasks, 4000, seed=1)
    assert torch.equal(obs, torch.ones(3, 4000, 1))
    g = torch.Generator().manual_seed(2)
    acts, rews = [], []
    for _ in range(10):
        a = torch.randint(0, 5, (3, 4000), generator=g)
        obs, r, done, _ = dist.step(a)
        acts.append(a), rews.append(r)
    assert bool(done.all()) and torch.equal(obs, torch.ones(3, 4000, 1))
    A, Rw = torch.stack(acts), torch.stack(rews).double()
    assert set(Rw.unique().tolist()) <= {0.0, 1.0}
    onehot = torch.nn.functional.one_hot(A, 5).double()  # [10, T, E, 5]
    n = onehot.sum((0, 2))
    emp = (onehot * Rw[..., None]).sum((0, 2)) / n
    p = tasks["probs"].double()
    tol = 5 * (p * (1 - p) / n).sqrt() + 1e-3
    assert ((emp - p).abs() <= tol).all(), (emp, p)


def test_tabular_statistics_and_one_hot():
    # every episode starts in state 0; the first step's reward and next state are checked
    # against reward_means[t, 0, a] (5 standard errors of N(mean, 1)) and transitions[t, 0, a]
    S, A, T, E = 4, 3, 2, 6000
    dist = rl.make("tabular-mdp", states=S, actions=A, horizon=5)
    tasks = dist.sample_tasks(T, 0)
    obs = dist.reset(tasks, E, seed=3)
    assert torch.equal(obs, torch.nn.functional.one_hot(torch.zeros(T, E).long(), S).float())
    a = torch.randint(0, A, (T, E), generator=torch.Generator().manual_seed(0))
    obs, r, _, info = dist.step(a)
    assert torch.equal(info["state"], torch.zeros(T, E, dtype=torch.long))
    assert torch.equal(obs.sum(-1), torch.ones(T, E)) and set(obs.unique().tolist()) == {0, 1}
    nxt = obs.argmax(-1)
    for t in range(T):
        for act in range(A):
            sel = a[t] == act
            n = int(sel.sum())
            mean = tasks["reward_means"][t, 0, act].item()
            assert abs(r[t][sel].double().mean().item() - mean) < 5 / math.sqrt(n)
            freq = torch.bincount(nxt[t][sel], minlength=S).double() / n
            p = tasks["transitions"][t, 0, act].double()
            assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all()
    # later steps: the state fed back is the one observed
    prev = nxt
    _, _, _, info = dist.step(a)
    assert torch.equal(info["state"], prev)


def test_tabular_indexing_with_deterministic_transitions():
    # transitions[t, s, a] = one-hot((s + a + t) % S); means 100 apart per (t, s, a): every
    # next state is exact and every reward within 6 (noise N(0, 1)) of its own mean
    S, A, T, E = 5, 3, 3, 4
    dist = rl.make("tabular-mdp", states=S, actions=A, horizon=8)
    t_, s_, a_ = torch.meshgrid(torch.arange(T), torch.arange(S), torch.arange(A), indexing="ij")
    P = torch.nn.functional.one_hot((s_ + a_ + t_) % S, S).float()
    R = 100.0 * (t_ * S * A + s_ * A + a_).float()
    obs = dist.reset({"transitions": P, "reward_means": R}, E, seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        s = obs.argmax(-1)
        a = torch.randint(0, A, (T, E), generator=g)
        obs, r, _, _ = dist.step(a)
        t = torch.arange(T)[:, None]
        assert torch.equal(obs.argmax(-1), (s + a + t) % S)
        assert ((r - R[t, s, a]).abs() < 6).all()


@pytest.mark.parametrize("name", TORCH_DISTS + CHEETAHS[:1])
def test_reset_seeding(name):
    dist = rl.make(name, horizon=4) if name != "bandit-k5-n10" else rl.make(name)
    tasks = dist.sample_tasks(2, 0)

    def run(seed):
        g = torch.Generator().manual_seed(0)
        out = [dist.reset(tasks, 3, seed)]
        for _ in range(4):
            out.extend(dist.step(_random_actions(dist, g, 2, 3))[:2])
        return torch.cat([x.flatten().float() for x in out])

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    if name != "nav2d":  # 2D navigation is deterministic: the seed has nothing to fix
        assert not torch.equal(a, c)


@needs_mujoco
def test_cheetah_rewards_equal_gymnasium_info():
    # each sub-env is stepped next to a plain gymnasium HalfCheetah-v5 (default weights:
    # forward 1, ctrl cost 0.1) reset with the same seed: identical observations, and our
    # rewards follow from its own info["x_velocity"] and reward_ctrl = -0.1 ||a||^2
    T, E, steps = 2, 1, 5
    for kind in ("vel", "dir"):
        dist = rl.make(f"cheetah-{kind}", horizon=steps)
        tasks = dist.sample_tasks(T, 0)
        if kind == "dir":
            tasks = {"direction": torch.tensor([1.0, -1.0])}
        obs = dist.reset(tasks, E, seed=7)
        refs = [gymnasium.make("HalfCheetah-v5") for _ in range(T * E)]
        ref_obs = [env.reset(seed=s)[0] for env, s in zip(refs, dist.last_seeds)]
        torch.testing.assert_close(obs.view(T * E, -1).double(),
                                   torch.from_numpy(np.stack(ref_obs)), rtol=0, atol=1e-6)
        g = torch.Generator().manual_seed(1)
        for h in range(steps):
            a = torch.randn(T, E, 6, generator=g)
            obs, rew, done, info = dist.step(a)
            assert obs.dtype == torch.float32 and rew.dtype == torch.float32
            for i, env in enumerate(refs):
                t, e = divmod(i, E)
                o, r_gym, _, _, inf = env.step(a[t, e].numpy())
                vx, sq = inf["x_velocity"], -inf["reward_ctrl"] / 0.1
                goal = tasks[dist.key][t].item()
                want = -abs(vx - goal) - 0.05 * sq if kind == "vel" else goal * vx - 0.05 * sq
                assert abs(rew[t, e].item() - want) < 1e-4 * (1 + abs(want))
                assert abs(info["x_velocity"][t, e].item() - vx) < 1e-4 * (1 + abs(vx))
                torch.testing.assert_close(obs[t, e].double(), torch.from_numpy(o),
                                           rtol=1e-5, atol=1e-5)
                if kind == "dir" and goal == 1.0:  # gymnasium's own reward, with its 0.1 cost
                    assert abs(rew[t, e].item() - (r_gym + 0.05 * sq)) < 1e-4 * (1 + abs(r_gym))
            assert bool(done.all()) == (h == steps - 1)


@needs_mujoco
def test_cheetah_action_scale_divides_the_action_before_mujoco_and_the_cost():
    # action_scale=10 (pytorch-maml-rl's normalization_scale): acting with a is acting with
    # a / 10 in the unscaled env -- same observations, velocities and rewards
    T, E, steps = 2, 2, 4
    for kind in ("vel", "dir"):
        scaled = rl.make(f"cheetah-{kind}", horizon=steps, action_scale=10)
        plain = rl.make(f"cheetah-{kind}", horizon=steps)
        tasks = scaled.sample_tasks(T, 3)
        torch.testing.assert_close(scaled.reset(tasks, E, seed=5), plain.reset(tasks, E, seed=5))
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            a = 10 * torch.randn(T, E, 6, generator=g)
            o1, r1, _, i1 = scaled.step(a)
            o2, r2, _, i2 = plain.step(a / 10)
            torch.testing.assert_close(o1, o2, rtol=0, atol=0)
            torch.testing.assert_close(r1, r2, rtol=0, atol=0)
            torch.testing.assert_close(i1["x_velocity"], i2["x_velocity"], rtol=0, atol=0)
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="action_scale"):
            rl.make("cheetah-vel", action_scale=bad)


@needs_mujoco
def test_cheetah_vector_env_reused_and_episodes_clean():
    dist = rl.make("cheetah-vel", horizon=3)
    tasks = dist.sample_tasks(2, 0)
    first = dist.reset(tasks, 1, seed=0)
    venv = dist.vector_env(2)
    for _ in range(3):
        dist.step(torch.ones(2, 1, 6))
    with pytest.raises(ValueError, match="every episode has ended"):
        dist.step(torch.ones(2, 1, 6))
    again = dist.reset(tasks, 1, seed=0)  # a clean start, not the state after 3 steps
    assert dist.vector_env(2) is venv and torch.equal(first, again)
    dist.reset(dist.sample_tasks(3, 0), 1, seed=0)
    assert dist.vector_env(3) is not venv



def test_nav2d_goal_box_ends_an_episode_at_the_goal():
    dist = rl.make("nav2d", goal_box=0.01)
    tasks = {"goal": torch.tensor([[0.25, -0.15], [0.5 - 1e-3, 0.5 - 1e-3]])}

    def toward_goal(obs):  # full-speed steps toward the goal (clipped to 0.1 by the env)
        return (tasks["goal"][:, None, :] - obs).clamp(-0.1, 0.1)

    ro = rl.sample(dist, toward_goal, tasks, episodes=2, seed=0)
    # task 0 is 3 steps away (0.25 needs 3 steps of <= 0.1), task 1 five steps
    assert ro.mask.sum(-1).tolist() == [[3.0, 3.0], [5.0, 5.0]]
    assert torch.equal(ro.rewards[0, 0, 3:], torch.zeros(97))
    with pytest.raises(ValueError, match="goal_box"):
        rl.make("nav2d", goal_box=-0.1)
