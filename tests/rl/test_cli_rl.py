"""``python -m fastmeta rl maml-trpo``: results.json, metrics, exact resume, refused checkpoints."""

import csv
import json

import pytest
import torch

from fastmeta import cli
from fastmeta.train import load_checkpoint

SMALL = ["--meta-batch", "3", "--episodes", "2", "--hidden", "8,8", "--val-tasks", "2", "--eval-tasks", "3",
         "--ckpt-every", "1", "--no-progress"]


def run(tmp_path, *extra):
    return cli.main(["rl", "maml-trpo", "--env", "nav2d", "--run-dir", str(tmp_path), *SMALL, *extra])


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_results_json_and_metrics(tmp_path):
    assert run(tmp_path, "--iterations", "2", "--eval-every", "1") == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("pre_return", "pre_return_ci95", "post_return", "post_return_ci95"):
        assert isinstance(res[key], float) and res[key] == res[key], key
    # nav2d rewards are minus distances: every return is negative, bounded by 100 steps x sqrt(2) x 0.5 + 100 x 0.2
    assert -200 < res["pre_return"] < 0 and -200 < res["post_return"] < 0
    assert res["iterations"] == 2 and res["eval_tasks"] == 3
    r = rows(tmp_path)
    assert [int(x["step"]) for x in r] == [1, 2]
    assert all(x["val_return"] != "" and x["pre_return"] != "" and x["post_return"] != "" for x in r)
    assert (tmp_path / "learning_curve.png").exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, "--iterations", "3", "--eval-every", "0") == 0
    assert run(b, "--iterations", "2", "--eval-every", "0") == 0
    assert run(b, "--iterations", "3", "--eval-every", "0", "--resume") == 0
    assert [x["loss"] for x in rows(a)] == [x["loss"] for x in rows(b)]
    sa, sb = load_checkpoint(a / "checkpoint.pt")["model"], load_checkpoint(b / "checkpoint.pt")["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_two_inner_steps_resample_and_resume(tmp_path):
    import argparse

    from fastmeta.cli import rl_maml_trpo
    from fastmeta.rl.meta_fvp import adapt

    p = argparse.ArgumentParser()
    rl_maml_trpo.add_args(p)
    args = p.parse_args(["--env", "nav2d", *SMALL, "--inner-steps", "2"])
    args.agent, args.meta_batch = "maml-trpo", 3
    runner = rl_maml_trpo._Runner(args)
    tasks = runner.dist.sample_tasks(3, 0)
    train, valid = runner.rollouts(tasks, 0, 0, 0)
    # one batch per inner step: the second is new data, sampled with the one-step iterate
    assert len(train) == 2 and not torch.equal(train[0].obs, train[1].obs)
    agent = runner.agent
    phi1 = agent.adapt(train[:1])
    x0, y0 = agent._inner(*agent.batch(train[0]))
    ref = adapt(runner.policy, agent.fn.expand(3), x0, y0, agent.fast_lr, 1)[-1]
    for k in ref:  # the agent adapts by the analytic gradient: autograd's up to float32 rounding
        torch.testing.assert_close(phi1[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, "--iterations", "2", "--eval-every", "0", "--inner-steps", "2") == 0
    assert run(b, "--iterations", "1", "--eval-every", "0", "--inner-steps", "2") == 0
    assert run(b, "--iterations", "2", "--eval-every", "0", "--inner-steps", "2", "--resume") == 0
    assert [x["loss"] for x in rows(a)] == [x["loss"] for x in rows(b)]


def test_checkpoint_of_another_policy_is_refused(tmp_path):
    assert run(tmp_path, "--iterations", "1", "--eval-every", "0") == 0
    with pytest.raises(SystemExit, match="--hidden '8,8'"):
        cli.main(["rl", "maml-trpo", "--env", "nav2d", "--run-dir", str(tmp_path), *SMALL[:4],
                  "--hidden", "16,16", "--iterations", "2", "--resume", "--no-progress"])


def test_unknown_env_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown task distribution 'moon-walk'"):
        cli.main(["rl", "maml-trpo", "--env", "moon-walk", "--run-dir", str(tmp_path), "--iterations", "1",
                  "--no-progress"])


def test_action_scale_only_for_the_cheetah(tmp_path):
    with pytest.raises(SystemExit, match="--action-scale applies to cheetah"):
        run(tmp_path, "--iterations", "1", "--action-scale", "10")


def test_discrete_env_takes_the_categorical_policy(tmp_path):
    assert cli.main(["rl", "maml-trpo", "--env", "bandit-k5-n10", "--run-dir", str(tmp_path), *SMALL,
                     "--iterations", "2", "--eval-every", "0"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    # a bandit's return is the number of successful pulls out of 10
    assert 0 <= res["pre_return"] <= 10 and 0 <= res["post_return"] <= 10
    assert "logits.0.weight" in load_checkpoint(tmp_path / "checkpoint.pt")["model"]  # the categorical policy
