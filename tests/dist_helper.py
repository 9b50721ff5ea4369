"""Ranks of distributed jobs for tests/test_distributed.py: ``python -m fastmeta train ...`` on a
tiny image dataset, the library recipe's gradients, a MAML-TRPO step.

Two ways in:

* under ``torchrun`` (``RANK`` set): ``torchrun --nproc_per_node=2 tests/dist_helper.py
  [--fail-rank R --fail-step S] [--writes DIR] -- train protonet ...`` runs one rank;
* plainly: ``python tests/dist_helper.py JOBS.json`` runs each job of the list in turn, each
  as ``world`` ranks forked by ``torch.multiprocessing.start_processes`` with torchrun's
  environment variables (one interpreter start-up for several jobs keeps the tests fast).
  A job: ``{"world": 2, "argv": [...], "port": 29512, "writes": dir (optional)}``: the CLI;
  ``{"world": 2, "grads": file}``: the averaged gradients of :func:`grad_models` on
  :func:`grad_batch`, saved by rank 0; ``{"world": 2, "trpo": file}``: each rank's parameters
  after one MAML-TRPO step on its share of :func:`trpo_problem`'s tasks (``file.rank<r>``).

``--writes DIR`` records, per rank, every file the rank opened for writing or renamed
(``DIR/rank<r>.txt``); ``--fail-rank/--fail-step`` make that rank's learner raise in training
step ``S`` (1-based).
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import io
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp
from learner_helpers import blob_dataset

from torch import nn

from fastmeta import cli, data, distributed
from fastmeta.learners import MAML, EpisodicLearner, MatchingNet, ProtoNet
from fastmeta.nn import Conv4, TaskConv4
from fastmeta.rl import GaussianMLPPolicy, MAMLTRPO


def _track_writes(out_dir: str):
    """Record every path this process opens for writing or renames onto; returns ``dump()``,
    which writes them to ``out_dir/rank<r>.txt``."""
    written: list[str] = []
    real_open, real_replace = builtins.open, os.replace

    def tracked_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            written.append(os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    def tracked_replace(src, dst, *args, **kwargs):
        written.append(os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    builtins.open = io.open = tracked_open
    os.replace = tracked_replace
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"rank{distributed.rank()}.txt")

    def dump():
        with real_open(path, "w") as f:
            f.write("\n".join(written))

    return dump


def _inject_failure(rank: int, step: int) -> None:
    calls = {"n": 0}
    for cls in (ProtoNet, EpisodicLearner):
        forward = cls.forward

        def failing(self, *a, _forward=forward, **k):
            if self.training:
                calls["n"] += 1
                if distributed.rank() == rank and calls["n"] == step:
                    raise RuntimeError(f"injected failure on rank {rank} at step {step}")
            return _forward(self, *a, **k)

        cls.forward = failing


def run_rank(argv: list[str], writes: str | None = None, fail: tuple[int, int] | None = None) -> int:
    """One rank (or the only process): the CLI on a 28x28 blob dataset."""
    ds = blob_dataset(size=28)
    data.load_dataset = lambda name, root=None: ds
    with distributed.session():
        dump = _track_writes(writes) if writes else None
        if fail is not None:
            _inject_failure(*fail)
        try:
            return cli.main(argv)
        finally:
            if dump is not None:
                dump()


def _as_torchrun_rank(local_rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank ``local_rank`` of ``world`` on one machine (none for
    a world of 1: a plain process), and one intra-op thread."""
    if world > 1:
        os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _forked_rank(local_rank: int, world: int, port: int, argv: list[str], writes: str | None) -> None:
    _as_torchrun_rank(local_rank, world, port)
    if run_rank(argv, writes) != 0:
        raise SystemExit(1)


def grad_models(dtype: torch.dtype) -> dict[str, nn.Module]:
    """The learners of the gradient check, built the same way in every process: MAML on a
    task-batched Conv4 (per-task BatchNorm), ProtoNet and MatchingNet on the default Conv4
    (per-episode BatchNorm, fastmeta.nn.episode)."""
    torch.manual_seed(0)
    maml = EpisodicLearner(MAML(TaskConv4(1, n_way=5, hidden=8, image_size=28), 0.4), steps=1)
    proto = ProtoNet(Conv4(1, hidden=8))
    matching = MatchingNet(Conv4(1, hidden=8))
    return {"maml": maml.to(dtype), "protonet": proto.to(dtype), "matching": matching.to(dtype)}


def grad_batch(dtype: torch.dtype, batch: int = 4):
    """``batch`` 5-way 1-shot episodes (2 queries per class) of the blob dataset."""
    b = next(iter(data.episodes(blob_dataset(size=28), "train", 5, 1, 2, batch_size=batch, num_batches=1)))
    return b.support_x.to(dtype), b.support_y, b.query_x.to(dtype), b.query_y


def learner_grads(model: nn.Module, batch, reduce: bool) -> dict[str, torch.Tensor]:
    """``.grad`` of every parameter after one loss on ``batch`` (this rank's shard of it when
    ``reduce``, then averaged over the ranks), as in fastmeta.distributed's example, and the
    floating-point buffers (BatchNorm running statistics) as ``buffer:<name>``."""
    model.zero_grad()
    if reduce:
        batch = distributed.shard(batch)
    loss, _ = model(*batch)
    loss.backward()
    if reduce:
        distributed.all_reduce_gradients(model)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    buffers = {f"buffer:{k}": b.clone() for k, b in model.named_buffers() if b.is_floating_point()}
    return grads | buffers


def _forked_grads(local_rank: int, world: int, port: int, out: str) -> None:
    _as_torchrun_rank(local_rank, world, port)
    result = {}
    with distributed.session():
        for dtype in (torch.float32, torch.float64):
            for name, model in grad_models(dtype).items():
                result[f"{name}/{dtype}"] = learner_grads(model, grad_batch(dtype), reduce=True)
    if local_rank == 0:
        torch.save(result, out)


def trpo_problem(T: int = 4, E: int = 2, H: int = 5, obs_dim: int = 3, act_dim: int = 2):
    """A float64 MAML-TRPO agent and synthetic train/valid rollouts of ``T`` tasks, the same in
    every process: ``(agent, train, valid)``, rollouts as ``(obs, actions, rewards, mask)``."""
    torch.manual_seed(0)
    agent = MAMLTRPO(GaussianMLPPolicy(obs_dim, act_dim, hidden=(8, 8)).to(torch.float64))
    g = torch.Generator().manual_seed(1)

    def rollout():
        mask = torch.ones(T, E, H, dtype=torch.float64)
        mask[0, 1, H - 2:] = 0
        return (torch.randn(T, E, H, obs_dim, generator=g, dtype=torch.float64) * mask[..., None],
                torch.randn(T, E, H, act_dim, generator=g, dtype=torch.float64) * mask[..., None],
                torch.randn(T, E, H, generator=g, dtype=torch.float64) * mask, mask)

    return agent, rollout(), rollout()


def trpo_step(agent, train, valid) -> torch.Tensor:
    """One MAML-TRPO step on this rank's tasks (:func:`distributed.shard`); the new parameters, flat."""
    as_rollout = lambda r: SimpleNamespace(**dict(zip(("obs", "actions", "rewards", "mask"), distributed.shard(r))))
    agent.step(as_rollout(train), as_rollout(valid))
    return torch.cat([p.detach().flatten() for p in agent.policy.parameters()])


def _forked_trpo(local_rank: int, world: int, port: int, out: str) -> None:
    _as_torchrun_rank(local_rank, world, port)
    with distributed.session():
        torch.save(trpo_step(*trpo_problem()), f"{out}.rank{local_rank}")


_FORKED = {"grads": _forked_grads, "trpo": _forked_trpo}


def run_jobs(jobs: list[dict]) -> None:
    # imported once here, inherited by every forked rank (each would import them to plot)
    importlib.import_module("matplotlib").use("Agg")
    importlib.import_module("matplotlib.pyplot")
    importlib.import_module("tqdm.auto")
    for job in jobs:
        kind = next((k for k in _FORKED if k in job), None)
        if kind is not None:
            mp.start_processes(_FORKED[kind], args=(job["world"], job.get("port", 29512), job[kind]),
                               nprocs=job["world"], start_method="fork")
            continue
        mp.start_processes(_forked_rank, args=(job["world"], job.get("port", 29512), job["argv"], job.get("writes")),
                           nprocs=job["world"], start_method="fork")


def main() -> int:
    if "RANK" not in os.environ:
        with open(sys.argv[1]) as f:
            run_jobs(json.load(f))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--fail-step", type=int, default=1)
    p.add_argument("--writes")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    a = p.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    return run_rank(argv, a.writes, None if a.fail_rank is None else (a.fail_rank, a.fail_step))


if __name__ == "__main__":
    sys.exit(main())
