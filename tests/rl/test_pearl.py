"""PEARL agent (fastmeta.rl.pearl), the point-sparse task distribution and ``rl pearl`` (CLI,
exact resume with replay buffers)."""

import copy
import csv
import json

import pytest
import torch

from fastmeta import rl
from fastmeta.cli import main
from fastmeta.rl.pearl import PEARL
from fastmeta.train import load_checkpoint


def test_point_sparse_goals_and_reward_formula():
    dist = rl.make("point-sparse")
    tasks = dist.sample_tasks(50, seed=0)
    g = tasks["goal"]
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(50))
    assert (g[:, 1] >= 0).all()
    tasks = {"goal": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    pos = dist.reset(tasks, 1, seed=0)
    assert dist.horizon == 20 and torch.equal(pos, torch.zeros(2, 1, 2))
    total = torch.zeros(2, 1)
    for _ in range(9):  # task 0: along +x at full speed; task 1: stays at the origin
        obs, r, done, info = dist.step(torch.tensor([[[0.5, 0.0]], [[0.0, 0.0]]]))
        d = (obs - tasks["goal"][:, None]).norm(dim=-1)
        want = torch.where(d <= 0.2, 1 - d, torch.zeros(()))
        torch.testing.assert_close(r, want)
        total += r
    assert r[0, 0] > 0.8 and r[1, 0] == 0  # at x = 0.9: within the radius
    assert total[1, 0] == 0 and not done.any()
    dense = dist.dense_reward(tasks, torch.tensor([[[0.9, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0,
                                                                                           0.5]]]))
    torch.testing.assert_close(dense, torch.tensor([[-0.1, -1.0], [-1.0, -0.5]]))
    with pytest.raises(ValueError, match="goal_radius"):
        rl.make("point-sparse", goal_radius=1.5)


def test_dense_critic_learns_from_the_dense_reward():
    dist = rl.make("point-sparse")
    kw = dict(hidden=(16,), meta_batch=2, batch_size=8, context_size=6, capacity=100,
              context_capacity=40)
    losses = []
    for dense in (False, True):  # same networks, same data: only the critic's reward differs
        torch.manual_seed(0)
        agent = PEARL(dist, dist.sample_tasks(3, seed=0), dense_critic=dense, **kw)
        agent.collect(torch.arange(3), 2, 0, False, True, torch.Generator().manual_seed(0))
        # the buffer keeps the sparse reward (never reached)
        assert agent.replay.data["rewards"].abs().sum() == 0
        losses.append(agent.update()["q_loss"])
    assert losses[0] != losses[1]
    with pytest.raises(ValueError, match="dense_reward"):
        PEARL(rl.make("nav2d"), rl.make("nav2d").sample_tasks(3, seed=0), dense_critic=True, **kw)


def small_agent(**kw):
    dist = rl.make("nav2d", horizon=10, goal_box=0.0)
    torch.manual_seed(0)
    agent = PEARL(dist, dist.sample_tasks(4, seed=0), hidden=(16,), meta_batch=2, batch_size=8,
                  context_size=6, capacity=100, context_capacity=20, **kw)
    return dist, agent


def test_collect_update_and_adapt():
    dist, agent = small_agent()
    g = torch.Generator().manual_seed(0)
    ro = agent.collect(torch.arange(4), 2, seed=0, posterior=False, to_context=True, generator=g)
    assert ro.rewards.shape == (4, 2, 10)
    assert agent.replay.size.tolist() == [20] * 4 and agent.context.size.tolist() == [20] * 4
    assert agent.replay.data["actions"].abs().max() <= 1  # stored in the policy's [-1, 1] space
    # returned in the policy's space, sent to the env times max_action (0.1: never clipped there)
    assert ro.actions.abs().max() <= 1
    torch.testing.assert_close(ro.next_obs - ro.obs, 0.1 * ro.actions, rtol=0, atol=1e-6)
    ro = agent.collect(torch.tensor([1, 3]), 1, seed=1, posterior=True, to_context=False,
                       generator=g)
    assert agent.replay.size.tolist() == [20, 30, 20,
                                          30] and agent.context.size.tolist() == [20] * 4
    before = [p.clone() for p in agent.encoder.parameters()]
    m = agent.update()
    assert set(m) == {"q_loss", "actor_loss", "kl", "alpha", "entropy"}
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    # the encoder learns through L_Q + KL
    assert any(not torch.equal(b, p) for b, p in zip(before, agent.encoder.parameters()))
    returns = agent.adapt(dist.sample_tasks(3, seed=5), episodes=3, seed=0, generator=g)
    assert returns.shape == (3, 3) and torch.isfinite(returns).all()


def test_fixed_alpha_never_moves():
    _, agent = small_agent(fixed_alpha=0.05)
    agent.collect(torch.arange(4), 2, 0, False, True, torch.Generator().manual_seed(0))
    for _ in range(3):
        m = agent.update()
    assert abs(m["alpha"] - 0.05) < 1e-8
    assert agent.opt_alpha.state_dict()["state"] == {}  # never stepped


def test_state_dict_round_trip_continues_identically():
    _, a = small_agent()
    g = torch.Generator().manual_seed(0)
    a.collect(torch.arange(4), 2, 0, False, True, g)
    a.update()
    _, b = small_agent()
    # optimizers load state tensors without copying
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    ma, mb = a.update(), b.update()
    assert ma == mb
    for x, y in zip(a.sac.parameters(), b.sac.parameters()):
        assert torch.equal(x, y)


def test_bad_construction():
    with pytest.raises(TypeError, match="continuous-action"):
        PEARL(rl.make("bandit-k5-n10"), {"probs": torch.rand(3, 5)})
    dist = rl.make("nav2d")
    with pytest.raises(ValueError, match="meta_batch"):
        PEARL(dist, dist.sample_tasks(2, seed=0), meta_batch=4)
    with pytest.raises(ValueError, match="shape"):
        PEARL(dist, {"goal": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="NaN"):
        PEARL(dist, {"goal": torch.full((3, 2), float("nan"))})


TINY = ["rl", "pearl", "--env", "nav2d", "--train-tasks", "4", "--tasks-per-iter", "2",
        "--init-episodes", "1", "--prior-episodes", "1", "--post-episodes", "1", "--updates", "3",
        "--meta-batch", "2", "--batch-size", "8", "--context-size", "8", "--hidden", "16",
        "--eval-every", "2", "--val-tasks", "2", "--eval-tasks", "3", "--ckpt-every", "2",
        "--no-progress"]


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("episodes_per_s",
                                                         "elapsed_s")} for r in csv.DictReader(f)]


def test_cli_resume_is_exact_including_replay_buffers(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(TINY + ["--iterations", "4", "--run-dir", str(straight)])
    main(TINY + ["--iterations", "2", "--run-dir", str(resumed)])
    main(TINY + ["--iterations", "4", "--run-dir", str(resumed), "--resume"])
    a, b = (load_checkpoint(d / "checkpoint.pt")["model"] for d in (straight, resumed))

    def same(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return torch.equal(x, y) if torch.is_tensor(x) else x == y

    assert same(a, b)
    assert int(a["replay"]["size"].sum()) > 0
    assert rows(straight) == rows(resumed)
    res = json.loads((resumed / "results.json").read_text())
    assert res["iterations"] == 4 and len(res["episode_returns"]) == 3
    for k in ("prior_return", "post_return", "prior_return_ci95", "post_return_ci95", "gain_ci95"):
        assert isinstance(res[k], float)
    assert res["gain"] == pytest.approx(res["post_return"] - res["prior_return"])
    assert (straight / "learning_curve.png").exists()
    with pytest.raises(SystemExit, match="--hidden"):
        other = ["32" if x == "16" else x for x in TINY]  # --hidden 16 -> 32
        main(other + ["--iterations", "5", "--run-dir", str(resumed), "--resume"])


def test_cli_post_context_fills_the_context_buffer(tmp_path):
    # 1 prior + 1 posterior episode of 100 steps (nav2d); without the flag: 100 (the prior one)
    main(TINY + ["--iterations", "1", "--run-dir", str(tmp_path), "--gamma", "0.9", "--alpha",
                 "auto", "--post-context"])
    ctx = load_checkpoint(tmp_path / "checkpoint.pt")["model"]["context"]
    assert ctx["obs"].shape[1] == 200 and int(ctx["size"].max()) == 200


@pytest.mark.parametrize("bad", [["--meta-batch", "9"], ["--updates", "0"], ["--env",
                                                                             "bandit-k5-n10"],
                                 ["--eval-episodes", "1"], ["--post-episodes", "0"],
                                 ["--dense-critic"], ["--alpha", "0"], ["--alpha", "x"]])
def test_cli_bad_arguments(tmp_path, bad):
    with pytest.raises(SystemExit):
        main(TINY + ["--iterations", "1", "--run-dir", str(tmp_path)] + bad)
