"""fastmeta.distributed and ``torchrun ... -m fastmeta train``: 2 CPU processes (gloo) against
one process with the same global batch, exact resume, rank 0 the only writer, a failing rank.

The multi-process cases run tests/dist_helper.py in a subprocess (ranks forked by
torch.multiprocessing with torchrun's environment, on a tiny 28x28 dataset) or under torchrun
itself, always with a subprocess timeout.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_helper import grad_batch, grad_models, learner_grads, trpo_problem, trpo_step

from fastmeta import distributed
from fastmeta.data import Episode
from fastmeta.learners import confidence_interval
from fastmeta.learners._evaluate import evaluate_episodes

HERE = Path(__file__).parent
TIMEOUT_S = 240
LR = 1e-3  # the CLI's default --lr (Adam)
# Gradients: 2 ranks (each averaging its half of the tasks, then all_reduce) against one process
# over all tasks differ only by float reduction order. float64: within GRAD_RTOL_F64 of the
# largest gradient entry of the model (measured <= 1.3e-16 MAML, 1e-15 ProtoNet, 1.8e-15
# MatchingNet; BatchNorm running statistics <= 2.4e-16 of their largest entry). float32: both
# compared with the float64 gradients, the 2-rank error at most twice the 1-process one plus
# GRAD_ATOL_F32 (relative) -- the DESIGN rule: with BatchNorm the first convolution's weight
# gradient sums 10^4 terms that nearly cancel, and 1 process x 4 episodes carries float32 noise
# of 9e-6 (ProtoNet) and 1.1e-5 (MatchingNet) of the largest entry itself; 2 ranks measured 4-5e-6.
GRAD_RTOL_F64 = 1e-14
GRAD_ATOL_F32 = 1e-6
# Parameters after a few Adam steps: Adam divides by sqrt(v) + 1e-8, so on an entry whose
# gradient is ~1e-9 (the conv biases before a BatchNorm, whose exact gradient is 0; dead ReLU
# regions; ProtoNet's last BatchNorm bias where the squared distances are translation invariant)
# float noise of 1e-9 moves the step by up to lr, in either direction in either run. So: every
# entry within 2 * steps * lr, and most (>= 90%) within 1e-6 (measured: MAML 1.2e-7 outside the
# BN-fed biases; ProtoNet 99.3% of the entries within 1e-6, the largest difference 7e-3 on a
# conv bias before a BatchNorm; BatchNorm running means follow those biases).
PARAM_ATOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_jobs(tmp_path: Path, jobs: list[dict]) -> None:
    for job in jobs:
        job["port"] = _free_port()
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(HERE / "dist_helper.py"), str(tmp_path / "jobs.json")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr


def _model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _rows(run: Path) -> list[tuple[str, ...]]:
    """The metrics CSV without its timing columns."""
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"], r["acc"], r["val_acc"], r["val_ci95"]) for r in csv.DictReader(f)]


def _cli(learner: str, run: Path, steps: int, *extra: str) -> list[str]:
    return ["train", learner, "--batch", "4", "--steps", str(steps), "--queries", "2", "--train-queries", "1",
            "--val-every", "2", "--val-episodes", "6", "--test-episodes", "10", "--threads", "1", "--no-progress",
            "--run-dir", str(run), *extra]


def _assert_adam_close(one: dict, two: dict, steps: int) -> None:
    diff = torch.cat([(one[k].double() - two[k].double()).abs().flatten() for k in one])
    assert diff.max().item() <= 2 * steps * LR * 1.01, diff.max().item()
    assert (diff <= PARAM_ATOL).double().mean().item() >= 0.9, (diff <= PARAM_ATOL).double().mean().item()


# ---- one process: the helpers degrade to no-ops ------------------------------------------------


def test_shard_takes_every_world_th_task():
    b = Episode(torch.arange(5)[:, None].float(), torch.arange(5)[:, None], torch.zeros(5, 2), torch.zeros(5, 2),
                torch.arange(10).view(5, 2))
    parts = [distributed.shard(b, r, 2) for r in range(2)]
    assert all(isinstance(p, Episode) for p in parts)
    assert parts[0].support_x.flatten().tolist() == [0, 2, 4] and parts[1].support_x.flatten().tolist() == [1, 3]
    union = torch.cat([p.classes for p in parts]).sort(0).values
    assert torch.equal(union, b.classes)
    assert distributed.shard((b.support_x, None), 1, 3)[1] is None
    assert distributed.shard(b.support_x, 4, 5).shape[0] == 1 and distributed.shard(b.support_x[:2], 3, 5).shape[0] == 0
    assert distributed.shard(b) is not None and torch.equal(distributed.shard(b).support_x, b.support_x)  # no group


def test_shard_rejects_bad_input():
    with pytest.raises(ValueError, match="leading dim B"):
        distributed.shard((torch.zeros(4, 1), torch.zeros(3, 1)), 0, 2)
    with pytest.raises(ValueError, match=r"rank_ must be in \[0, world=2\)"):
        distributed.shard(torch.zeros(4), 2, 2)
    with pytest.raises(TypeError, match="got str"):
        distributed.shard(("a",), 0, 2)
    with pytest.raises(ValueError, match="0-dim"):
        distributed.shard(torch.tensor(1.0), 0, 2)


def test_without_a_process_group_everything_is_local(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.init() and not distributed.is_active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.check_divisible(3)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.all_reduce_gradients([p])
    assert p.grad.tolist() == [3.0, 3.0]
    assert distributed.mean_over_ranks([1.0, 2.0]).tolist() == [1.0, 2.0] and distributed.any_rank(True)


def test_init_checks_backend_and_timeout(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(ValueError, match="backend must be one of .* got 'carrier-pigeon'"):
        distributed.init("carrier-pigeon")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="timeout_s .* got 'soon'"):
        distributed.init("gloo")
    assert not distributed.is_active()


def test_evaluate_in_one_process_matches_evaluate_episodes():
    g = torch.Generator().manual_seed(0)
    batches = [tuple(torch.rand(5, 3, generator=g) for _ in range(4)) for _ in range(3)]

    def metric(sx, sy, qx, qy):
        return (sx * qy).sum(1)

    got = distributed.evaluate(metric, batches, 12)
    want = evaluate_episodes(metric, batches, 12)
    assert got.shape == (12,) and confidence_interval(got) == want
    with pytest.raises(ValueError, match="ran out after 15 of 16"):
        distributed.evaluate(metric, batches, 16)
    with pytest.raises(ValueError, match="episodes must be an int >= 1"):
        distributed.evaluate(metric, batches, 0)


# ---- two processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """One subprocess (one interpreter start-up) runs every forked job of the tests below:
    the library recipe's gradients on 2 ranks, a MAML-TRPO step on 2 ranks, MAML through the
    CLI (1 process x 4 tasks, 2 ranks x 2 tasks, 2 ranks stopped at step 2 then resumed to step
    4) and ``rl maml-trpo`` on 2 ranks. Over 20 s: 8 small jobs of 1-2 ranks, 24 s of CPU for the
    whole file (45 s wall on the shared 2-core machine at load 13); one start-up instead of eight
    keeps it at that."""
    tmp = tmp_path_factory.mktemp("dist")
    common = ("--hidden", "8")
    _run_jobs(tmp, [
        {"world": 2, "grads": str(tmp / "grads.pt")},
        {"world": 2, "trpo": str(tmp / "trpo.pt")},
        {"world": 1, "argv": _cli("maml", tmp / "one", 4, *common)},
        {"world": 2, "argv": _cli("maml", tmp / "two", 4, *common)},
        {"world": 2, "argv": _cli("maml", tmp / "resumed", 2, *common), "writes": str(tmp / "w1")},
        {"world": 2, "argv": _cli("maml", tmp / "resumed", 4, "--resume", *common), "writes": str(tmp / "w2")},
        {"world": 1, "argv": _cli("protonet", tmp / "proto-one", 4)},
        {"world": 2, "argv": _cli("protonet", tmp / "proto-two", 4)},
        {"world": 2, "argv": ["rl", "maml-trpo", "--env", "nav2d", "--iterations", "2", "--meta-batch", "4",
                              "--episodes", "2", "--hidden", "8,8", "--eval-every", "1", "--val-tasks", "2",
                              "--eval-tasks", "3", "--no-progress", "--run-dir", str(tmp / "rl")],
         "writes": str(tmp / "w3")},
    ])
    return tmp


def test_gradients_of_two_ranks_equal_one_process_with_the_global_batch(two_rank_runs, one_thread):
    """The library recipe (shard + backward + all_reduce_gradients) on 2 forked ranks against
    one process with all 4 tasks, in float64 and float32: MAML on a task-batched Conv4
    (per-task BatchNorm), ProtoNet and MatchingNet on Conv4 with its BatchNorm (per episode:
    fastmeta.nn.episode). Gradients and the averaged BatchNorm running statistics."""
    got = torch.load(two_rank_runs / "grads.pt", weights_only=True)
    models = {dtype: grad_models(dtype) for dtype in (torch.float32, torch.float64)}
    for name in models[torch.float64]:
        ref = learner_grads(models[torch.float64][name], grad_batch(torch.float64), reduce=False)
        one = learner_grads(models[torch.float32][name], grad_batch(torch.float32), reduce=False)
        grads = [k for k in ref if not k.startswith("buffer:")]
        assert len(ref) > len(grads) or name == "maml", name  # BatchNorm buffers compared too
        scale = {k: ref[k].abs().max().item() if k.startswith("buffer:") else
                 max(ref[g].abs().max().item() for g in grads) for k in ref}

        def rel(a, k):
            return (a[k].double() - ref[k]).abs().max().item() / scale[k]

        for k in ref:
            assert rel(got[f"{name}/{torch.float64}"], k) <= GRAD_RTOL_F64, (name, k)
        worst_one = max(rel(one, k) for k in ref)
        worst_two = max(rel(got[f"{name}/{torch.float32}"], k) for k in ref)
        assert worst_two <= 2 * worst_one + GRAD_ATOL_F32, (name, worst_two, worst_one)


def test_maml_trpo_ranks_take_the_same_step_as_one_process(two_rank_runs):
    """2 ranks x 2 tasks: the meta-gradient, every CG Fisher product and the line search are
    averaged, so both ranks end with the same parameters, those of one process stepping on all
    4 tasks (float64; measured: 4.5e-12 at most, on parameters up to 0.64 -- conjugate gradient
    carries the reduction-order rounding of its Fisher products into the step)."""
    ranks = [torch.load(f"{two_rank_runs / 'trpo.pt'}.rank{r}", weights_only=True) for r in range(2)]
    agent, train, valid = trpo_problem()
    before = torch.cat([p.detach().flatten().clone() for p in agent.policy.parameters()])
    want = trpo_step(agent, train, valid)
    assert not torch.equal(want, before)  # the step was taken
    assert torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], want, rtol=0, atol=1e-10)


def test_maml_cli_two_ranks_match_one_process_and_resume_exactly(two_rank_runs):
    """``train maml`` (Conv4 with per-task BatchNorm): 2 ranks x 2 tasks == 1 process x 4 tasks
    (up to Adam on float noise, see PARAM_ATOL); stopped at step 2 and resumed under torchrun ==
    the uninterrupted 2-rank run, bit for bit; validation and test episodes split and gathered."""
    tmp = two_rank_runs
    one, two, resumed = (_model(tmp / d) for d in ("one", "two", "resumed"))
    _assert_adam_close(one, two, steps=4)
    for k in one:
        assert torch.equal(two[k], resumed[k]), k
    validation = [(r[0], *r[3:]) for r in _rows(tmp / "two") if r[3]]
    assert len(validation) == 2 and validation == [(r[0], *r[3:]) for r in _rows(tmp / "resumed") if r[3]]
    res = [json.loads((tmp / d / "results.json").read_text()) for d in ("one", "two", "resumed")]
    assert res[1]["world_size"] == 2 and res[1]["test_episodes"] == 10
    assert abs(res[0]["test_accuracy"] - res[1]["test_accuracy"]) <= 0.05  # one query in 20 may flip
    assert res[1]["test_accuracy"] == res[2]["test_accuracy"]


def test_protonet_cli_two_ranks_match_one_process(two_rank_runs):
    """``train protonet`` with the default Conv4 (BatchNorm per episode): 2 ranks x 2 episodes ==
    1 process x 4 episodes after 4 Adam steps -- parameters and BatchNorm running statistics
    (up to Adam on float noise, see PARAM_ATOL); the same test accuracy. Measured with
    ``episode_bn=False`` (whole-batch BatchNorm, each rank normalising its 2 episodes): largest
    difference 0.051 and 0.15% of the entries within 1e-6 (per episode: 99.3%)."""
    one, two = (_model(two_rank_runs / d) for d in ("proto-one", "proto-two"))
    assert any("running_mean" in k for k in one)
    _assert_adam_close(one, two, steps=4)
    for k in one:
        if "running_var" in k:  # not moved by the BN-fed conv biases' noise (running_mean is)
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
        elif "num_batches" in k:
            assert one[k].item() == two[k].item() == 4
    res = [json.loads((two_rank_runs / d / "results.json").read_text())
           for d in ("proto-one", "proto-two")]
    assert res[1]["world_size"] == 2
    # one query in 20 may flip
    assert abs(res[0]["test_accuracy"] - res[1]["test_accuracy"]) <= 0.05


def test_rank0_is_the_only_writer(two_rank_runs):
    for w in ("w1", "w2", "w3"):
        assert (two_rank_runs / w / "rank1.txt").read_text() == ""
        written = {Path(p).name for p in (two_rank_runs / w / "rank0.txt").read_text().split()}
        assert {"checkpoint.pt", "metrics.csv", "learning_curve.png", "results.json"} <= written


def test_rl_maml_trpo_under_two_ranks_gathers_the_held_out_tasks(two_rank_runs):
    out = json.loads((two_rank_runs / "rl" / "results.json").read_text())
    assert out["world_size"] == 2 and out["iterations"] == 2 and out["eval_tasks"] == 3
    with open(two_rank_runs / "rl" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"] and all(r["val_return"] for r in rows)


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_helper.py"), "--fail-rank", "1", "--fail-step", "2", "--",
           *_cli("protonet", tmp_path / "run", 50)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1", FASTMETA_DIST_TIMEOUT="60"),
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "injected failure on rank 1 at step 2" in out, out
    assert time.perf_counter() - t0 < 120, out
    assert not (tmp_path / "run" / "results.json").exists()
