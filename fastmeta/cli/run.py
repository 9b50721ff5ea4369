"""``python -m fastmeta train``: train one learner through the shared trainer, evaluate it on
the test split, write ``results.json``.

Under ``torchrun`` (see :mod:`fastmeta.distributed`) each rank trains on episodes
``rank::world`` of every global batch (``--batch`` must be a multiple of the world size), the
validation and test episodes are split the same way and gathered, and rank 0 alone writes the
run folder and prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from fastmeta import data, distributed
from fastmeta.cli.recipes import LEARNERS, LearnerSpec, resolve_defaults
from fastmeta.cli.sinusoid import sinusoid_figure, sinusoid_loader
from fastmeta.learners import confidence_interval
from fastmeta.train import Trainer, TrainConfig


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """Run the block with ``threads`` torch intra-op threads (None: leave them), then restore."""
    if threads is not None and threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_training(args: argparse.Namespace) -> dict:
    """Train ``args.learner`` and evaluate it on the test split; returns the results dict."""
    spec = LEARNERS[args.learner]
    resolve_defaults(args, spec)
    # sinusoid's 40-unit MLP is far too small for intra-op threads: they only add
    # synchronisation (and on a shared CPU a descheduled thread stalls every op)
    threads = args.threads if args.threads is not None else (1 if args.dataset == "sinusoid" else None)
    with intra_op_threads(threads):
        return _run_training(args, spec)


def _run_training(args: argparse.Namespace, spec: LearnerSpec) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    regression = args.dataset == "sinusoid"
    ds = None if regression else data.load_dataset(args.dataset, args.data_root)
    train_ways = args.train_ways or args.ways
    default_dir = (f"runs/{args.learner}-sinusoid-{args.shots}s" if regression
                   else f"runs/{args.learner}-{args.dataset}-{args.ways}w{args.shots}s")
    run_dir = Path(args.run_dir or default_dir)
    in_channels = 1 if regression else ds.image_shape[0]
    learner = (spec.build(args, in_channels, ds.classes("train")) if spec.global_labels
               else spec.build(args, in_channels)).to(device)
    opt = torch.optim.Adam(learner.parameters(), lr=args.lr)
    sched = (torch.optim.lr_scheduler.StepLR(opt, args.lr_halve_every, gamma=0.5)
             if args.lr_halve_every > 0 else None)

    def episode_loader(split, ways, n_batches=None, start=0, seed=args.seed, batch=args.batch,
                       queries=None, rank=0, world=1):
        queries = args.queries if queries is None else queries
        return data.episodes(ds, split, ways, args.shots, queries, batch_size=batch,
                             num_batches=n_batches, start=start, seed=seed, shuffle=spec.shuffle,
                             num_workers=args.workers, device=device, rank=rank, world=world)

    loader = sinusoid_loader(args, device) if regression else episode_loader
    try:
        distributed.check_divisible(args.batch, "--batch")
    except ValueError as e:
        raise SystemExit(str(e)) from None

    def batches(start_step):  # this rank's episodes of each global batch (all of them in one process)
        if regression:
            return (distributed.shard(b) for b in loader("train", train_ways, start=start_step,
                                                         queries=args.train_queries))
        # only this rank's episodes are built: those distributed.shard would cut from the batch
        return iter(episode_loader("train", train_ways, start=start_step, queries=args.train_queries,
                                   rank=distributed.rank(), world=distributed.world_size()))

    def step_fn(batch):
        sx, sy, qx, qy, classes = batch
        if spec.global_labels:  # pretraining on dataset class ids (Baseline)
            return learner(sx, sy, qx, qy, n_way=train_ways, classes=classes)
        return learner(sx, sy, qx, qy, n_way=train_ways)

    # validation and test episodes use their own fixed seeds so every evaluation sees the
    # same episodes (comparable across steps and across runs)
    eval_batch = 16

    def evaluate(split, n, seed):
        """Mean +- 95% CI over ``n`` episodes of ``split``; under torchrun the ranks split every batch."""
        batches = loader(split, args.ways, -(-n // eval_batch), seed=seed, batch=eval_batch)
        if not distributed.is_active():
            return learner.evaluate(batches, episodes=n)
        was_training = learner.training
        learner.eval()
        try:
            per_episode = distributed.evaluate(learner.episode_accuracy, batches, n)
        finally:
            learner.train(was_training)
        return confidence_interval(per_episode, "mse" if regression else "accuracy")

    def validate():
        return evaluate("val", args.val_episodes, 10_000 + args.seed)

    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, val_every=args.val_every,
                      ckpt_every=args.ckpt_every, episodes_per_step=args.batch, run_dir=run_dir,
                      resume=args.resume, progress=not args.no_progress, metric="mse" if regression else "acc")
    trainer = Trainer(learner, opt, batches, step_fn, validate if args.val_episodes > 0 else None, cfg,
                      scheduler=sched, extra_state={"args": {k: v for k, v in vars(args).items()
                                                             if isinstance(v, (str, int, float, bool, type(None)))}})
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    t0 = time.perf_counter()
    result = evaluate("test", args.test_episodes, 20_000 + args.seed)
    test_s = time.perf_counter() - t0
    out = dict(learner=args.learner, dataset=args.dataset, ways=args.ways, shots=args.shots,
               steps=trainer.step, train_seconds=round(train_s, 1), test_seconds=round(test_s, 1),
               train_cpu_seconds=round(train_cpu_s, 1),
               test_accuracy=result.mean, test_ci95=result.ci95, test_episodes=result.episodes,
               run_dir=str(run_dir))
    if distributed.world_size() > 1:
        out["world_size"] = distributed.world_size()
    if not distributed.is_main():
        return out
    files = "checkpoint.pt, metrics.csv, learning_curve.png, results.json"
    if regression:
        del out["ways"], out["test_accuracy"]
        out.update(test_mse=result.mean, test_inner_steps=args.test_inner_steps)
        out["figure"] = str(sinusoid_figure(learner, run_dir / "adaptation.png", k=args.shots))
        files += ", adaptation.png"
        print(f"{args.learner} on sinusoid, K={args.shots}, {args.test_inner_steps} inner steps, held-out tasks: "
              f"{result}")
    else:
        print(f"{args.learner} on {args.dataset} {args.ways}-way {args.shots}-shot, test scripts/classes: {result}")
    (run_dir / "results.json").write_text(json.dumps(out, indent=2))
    print(f"run folder: {run_dir} ({files})")
    return out
