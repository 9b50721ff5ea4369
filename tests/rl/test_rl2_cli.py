"""``python -m fastmeta rl rl2``: results.json with per-episode returns, metrics, exact resume
(Adam state included), the SNAIL flag, refused checkpoints."""

import argparse
import csv
import json

import pytest
import torch

from fastmeta import cli, rl
from fastmeta.cli.rl_rl2 import _fill_defaults
from fastmeta.train import load_checkpoint

SMALL = ["--tasks", "6", "--hidden", "8", "--minibatches", "2", "--epochs", "2", "--val-tasks", "4",
         "--eval-tasks", "5", "--ckpt-every", "1", "--no-progress"]


def run(run_dir, env="tabular-mdp", *extra):
    return cli.main(["rl", "rl2", "--env", env, "--run-dir", str(run_dir), *SMALL, *extra])


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_results_json_has_trial_and_episode_returns(tmp_path):
    assert run(tmp_path, "tabular-mdp", "--iterations", "2", "--episodes", "3", "--eval-every",
               "1") == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["iterations"] == 2 and res["episodes"] == 3 and res["eval_tasks"] == 5
    assert len(res["episode_returns"]) == 3 and len(res["episode_returns_ci95"]) == 3
    # float32 sums
    assert sum(res["episode_returns"]) == pytest.approx(res["trial_return"], rel=1e-6)
    for key in ("trial_return_ci95", "random_trial_return", "random_trial_return_ci95"):
        assert isinstance(res[key], float) and res[key] == res[key], key
    assert "greedy_trial_return" not in res  # a bandit baseline
    assert res["env_steps"] == 2 * 6 * 3 * 10
    r = rows(tmp_path)
    assert [int(x["step"]) for x in r] == [1, 2]
    assert all(x["episode_1"] != "" and x["episode_3"] != "" and x["val_return"] != "" for x in r)
    assert (tmp_path / "learning_curve.png").exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("--episodes", "2", "--eval-every", "0")
    assert run(a, "bandit-k3-n5", "--iterations", "3", *args) == 0
    assert run(b, "bandit-k3-n5", "--iterations", "2", *args) == 0
    assert run(b, "bandit-k3-n5", "--iterations", "3", "--resume", *args) == 0
    assert [x["loss"] for x in rows(a)] == [x["loss"] for x in rows(b)]
    sa = load_checkpoint(a / "checkpoint.pt")["model"]
    sb = load_checkpoint(b / "checkpoint.pt")["model"]
    for k in sa:
        if k != "_extra_state":
            assert torch.equal(sa[k], sb[k]), k
    adam_a = sa["_extra_state"]["optimizer"]["state"]
    adam_b = sb["_extra_state"]["optimizer"]["state"]
    assert adam_a.keys() == adam_b.keys()
    assert all(torch.equal(adam_a[k]["exp_avg_sq"], adam_b[k]["exp_avg_sq"]) for k in adam_a)


def test_snail_policy_flag_and_refused_checkpoint(tmp_path):
    assert run(tmp_path, "nav2d", "--iterations", "1", "--policy", "snail", "--eval-every",
               "0") == 0
    model = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert any(k.startswith("policy.blocks.") for k in model)
    with pytest.raises(SystemExit, match="--policy 'snail'"):
        run(tmp_path, "nav2d", "--iterations", "2", "--policy", "gru", "--resume")


def test_bandit_reward_scale_default_follows_the_pulls():
    def scale(env, *extra):
        a = argparse.Namespace(env=env, episodes=None, tasks=None, lam=None, reward_scale=None,
                               trials=1, env_steps=None)
        for k, v in extra:
            setattr(a, k, v)
        _fill_defaults(a, rl.make(env))
        return a.reward_scale

    assert scale("bandit-k5-n10") == 1.0  # the 5M-step runs of rl2.md keep their setting
    assert scale("bandit-k10-n100") == pytest.approx(0.1)
    assert scale("bandit-k10-n100", ("reward_scale", 0.5)) == 0.5
    assert scale("tabular-mdp") == 0.1


def test_unknown_env_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown task distribution 'moon-walk'"):
        run(tmp_path, "moon-walk", "--iterations", "1")


def test_held_out_evaluation_in_chunks(tmp_path, monkeypatch):
    """A large held-out evaluation is rolled out EVAL_CHUNK tasks at a time: every task counted,
    and a run whose tasks fit in one chunk is unchanged by the chunking (same tasks, same
    returns as the one-piece evaluation)."""
    from fastmeta.cli import rl_rl2

    args = ["--iterations", "1", "--eval-tasks", "7", "--seed", "3"]
    assert run(tmp_path / "one", "bandit-k5-n10", *args) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    monkeypatch.setattr(rl_rl2, "EVAL_CHUNK", 3)
    assert run(tmp_path / "three", "bandit-k5-n10", *args) == 0
    three = json.loads((tmp_path / "three" / "results.json").read_text())
    assert three["eval_tasks"] == 7 and three["iterations"] == 1
    for key in ("trial_return", "random_trial_return", "trial_return_ci95", "greedy_trial_return",
                "greedy_beta_trial_return"):
        assert isinstance(three[key], float) and three[key] == three[key], key
    monkeypatch.setattr(rl_rl2, "EVAL_CHUNK", 7)
    assert run(tmp_path / "same", "bandit-k5-n10", *args) == 0
    same = json.loads((tmp_path / "same" / "results.json").read_text())
    assert same["trial_return"] == one["trial_return"]
    assert same["random_trial_return"] == one["random_trial_return"]
    assert same["greedy_trial_return"] == one["greedy_trial_return"]
