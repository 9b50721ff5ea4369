"""Command line: ``python -m fastmeta train <learner> ...`` and ``python -m fastmeta demo``.

Every learner trains through the shared :class:`fastmeta.train.Trainer` (progress bar,
validation, exact resume, metrics CSV, learning-curve PNG).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch



@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """How the CLI builds a learner: ``build(args, in_channels) -> FewShotLearner``;
    ``shuffle``: sequence learners need episodes whose support/query order is shuffled."""

    build: Callable[[argparse.Namespace, int], torch.nn.Module]
    shuffle: bool = False
    help: str = ""
    demo_args: tuple[str, ...] = ()  # extra `train` arguments the demo uses


def _protonet(args, in_channels):
    from fastmeta.learners import ProtoNet

    return ProtoNet(build_backbone(args.backbone, in_channels), metric=args.metric)


def _max_way(args) -> int:
    return max(args.ways, args.train_ways or args.ways)


def _sequence_embedding(args, in_channels, hidden=32):
    """The image embedding of the sequence learners and its width: Conv4 (``hidden`` channels)
    with a global average pool (on 28x28 inputs the pool sees 1x1, i.e. plain Conv4), or
    ResNet-12."""
    from torch import nn

    from fastmeta.nn import Conv4, ResNet12

    if args.backbone == "resnet12":
        return ResNet12(in_channels), 640
    conv = Conv4(in_channels, hidden)
    return nn.Sequential(*list(conv)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten()), conv.hidden


# MANN and SNAIL from the CLI are about a quarter of the papers' widths (Conv4-32 embedding;
# MANN controller 64, 32 slots of 16, 2 heads; SNAIL 32 filters, attention (32,16), (64,32),
# (128,64)): sized for CPU training budgets, where they leave the loss plateau at chance in
# fewer episodes and run ~2x more episodes/s. The papers' sizes are the constructors' defaults.
def _mann(args, in_channels):
    from fastmeta.learners import MANN

    emb, dim = _sequence_embedding(args, in_channels)
    return MANN(emb, dim, n_way=_max_way(args), hidden=64, slots=32, width=16, heads=2)


def _snail(args, in_channels):
    from fastmeta.learners import SNAIL

    emb, dim = _sequence_embedding(args, in_channels)
    n = _max_way(args)
    return SNAIL(emb, dim, n_way=n, seq_len=n * args.shots + 1, filters=32,
                 attention=((32, 16), (64, 32), (128, 64)))


def _metalstm(args, in_channels):
    from fastmeta.learners import MetaLSTM

    return MetaLSTM(in_channels, n_way=_max_way(args))


def _matching(args, in_channels):
    from fastmeta.learners import MatchingNet

    backbone = build_backbone(args.backbone, in_channels)
    fce = getattr(args, "fce", False)
    dim = None
    if fce:  # the FCE LSTMs are as wide as the embedding: one dummy image gives its width
        size = 84 if args.dataset == "miniimagenet" else 28
        was_training = backbone.training
        with torch.no_grad():
            dim = backbone.eval()(torch.zeros(1, in_channels, size, size)).flatten(1).shape[1]
        backbone.train(was_training)
    return MatchingNet(backbone, fce=fce, embed_dim=dim)


# name -> spec; every learner the CLI and the demo know
LEARNERS: dict[str, LearnerSpec] = {
    "protonet": LearnerSpec(_protonet, help="Prototypical Networks (Snell et al. 2017)",
                            demo_args=("--train-ways", "20")),
    "matching": LearnerSpec(_matching, help="Matching Networks (Vinyals et al. 2016); --fce for full context embeddings"),
    "mann": LearnerSpec(_mann, shuffle=True, help="Memory-Augmented Neural Network (Santoro et al. 2016)",
                        demo_args=("--lr", "3e-3", "--batch", "8")),
    "snail": LearnerSpec(_snail, shuffle=True, help="Simple Neural Attentive Meta-Learner (Mishra et al. 2018)",
                         demo_args=("--lr", "3e-3", "--batch", "8")),
    "metalstm": LearnerSpec(_metalstm, help="Meta-learner LSTM (Ravi & Larochelle 2017)"),
}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("learner", choices=sorted(LEARNERS))
    p.add_argument("--dataset", default="glyphs", choices=["glyphs", "omniglot", "miniimagenet"])
    p.add_argument("--data-root", default=None, help="dataset folder (omniglot/miniimagenet) or glyph cache folder")
    p.add_argument("--ways", type=int, default=5, help="N of the test (and validation) episodes")
    p.add_argument("--train-ways", type=int, default=None,
                   help="N of the training episodes (ProtoNet trains with more ways than it tests; default --ways)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15, help="query examples per class")
    p.add_argument("--batch", type=int, default=1, help="episodes per training step")
    p.add_argument("--steps", type=int, default=2000, help="training steps (train longer: raise this)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall-clock time")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-halve-every", type=int, default=2000, help="halve the learning rate every N steps (0: never)")
    p.add_argument("--backbone", default="conv4", choices=["conv4", "resnet12"])
    p.add_argument("--metric", default="sqeuclidean", choices=["sqeuclidean", "cosine"])
    p.add_argument("--fce", action="store_true", help="matching: full context embeddings (bidirectional LSTM g, attention LSTM f)")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-episodes", type=int, default=200)
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--run-dir", default=None, help="default runs/<learner>-<dataset>-<N>w<K>s")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")


def build_backbone(name: str, in_channels: int) -> torch.nn.Module:
    from fastmeta.nn import Conv4, ResNet12

    return Conv4(in_channels) if name == "conv4" else ResNet12(in_channels)


def run_training(args: argparse.Namespace) -> dict:
    """Train ``args.learner`` and evaluate it on the test split; returns the results dict."""
    from fastmeta import data
    from fastmeta.train import Trainer, TrainConfig

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ds = data.load_dataset(args.dataset, args.data_root)
    train_ways = args.train_ways or args.ways
    run_dir = Path(args.run_dir or f"runs/{args.learner}-{args.dataset}-{args.ways}w{args.shots}s")
    spec = LEARNERS[args.learner]
    learner = spec.build(args, ds.image_shape[0]).to(device)
    opt = torch.optim.Adam(learner.parameters(), lr=args.lr)
    sched = (torch.optim.lr_scheduler.StepLR(opt, args.lr_halve_every, gamma=0.5)
             if args.lr_halve_every > 0 else None)

    def loader(split, ways, n_batches=None, start=0, seed=args.seed, batch=args.batch):
        return data.episodes(ds, split, ways, args.shots, args.queries, batch_size=batch,
                             num_batches=n_batches, start=start, seed=seed, shuffle=spec.shuffle,
                             num_workers=args.workers, device=device)

    def batches(start_step):
        return iter(loader("train", train_ways, start=start_step))

    def step_fn(batch):
        sx, sy, qx, qy, _ = batch
        return learner(sx, sy, qx, qy, n_way=train_ways)

    # validation and test episodes use their own fixed seeds so every evaluation sees the
    # same episodes (comparable across steps and across runs)
    eval_batch = 16

    def validate():
        n = args.val_episodes
        return learner.evaluate(loader("val", args.ways, -(-n // eval_batch), seed=10_000 + args.seed,
                                       batch=eval_batch), episodes=n)

    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, val_every=args.val_every,
                      ckpt_every=args.ckpt_every, episodes_per_step=args.batch, run_dir=run_dir,
                      resume=args.resume, progress=not args.no_progress)
    trainer = Trainer(learner, opt, batches, step_fn, validate if args.val_episodes > 0 else None, cfg,
                      scheduler=sched, extra_state={"args": {k: v for k, v in vars(args).items()
                                                             if isinstance(v, (str, int, float, bool, type(None)))}})
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0

    n = args.test_episodes
    test = loader("test", args.ways, -(-n // eval_batch), seed=20_000 + args.seed, batch=eval_batch)
    result = learner.evaluate(test, episodes=n)
    out = dict(learner=args.learner, dataset=args.dataset, ways=args.ways, shots=args.shots,
               steps=trainer.step, train_seconds=round(train_s, 1),
               test_accuracy=result.accuracy, test_ci95=result.ci95, test_episodes=result.episodes,
               run_dir=str(run_dir))
    (run_dir / "results.json").write_text(json.dumps(out, indent=2))
    print(f"{args.learner} on {args.dataset} {args.ways}-way {args.shots}-shot, test scripts/classes: {result}")
    print(f"run folder: {run_dir} (checkpoint.pt, metrics.csv, learning_curve.png, results.json)")
    return out


def demo(argv: list[str]) -> int:
    """Train every learner that exists briefly on glyphs (5-way 1-shot) and print its test
    accuracy +- 95% CI next to a pixel nearest-neighbour baseline, on the same episodes."""
    p = argparse.ArgumentParser(prog="python -m fastmeta demo")
    p.add_argument("--minutes", type=float, default=None,
                   help="training minutes per learner (default: 4 minutes shared by all learners, "
                        "at most 3 each; train longer: --minutes 30)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--episodes", type=int, default=600, help="test episodes")
    p.add_argument("--learners", default=",".join(LEARNERS), help="comma-separated subset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    from fastmeta import data
    from fastmeta.learners import PixelNN

    names = [n for n in a.learners.split(",") if n]
    unknown = set(names) - set(LEARNERS)
    if unknown:
        raise SystemExit(f"unknown learners {sorted(unknown)}; choose from {sorted(LEARNERS)}")
    minutes = a.minutes if a.minutes is not None else min(3.0, 4.0 / len(names))
    print(f"fastmeta demo: {', '.join(names)} train {minutes:g} min each on glyphs, 5-way {a.shots}-shot "
          f"(train longer: `make demo DEMO_MINUTES=30` or `python -m fastmeta demo --minutes 30`)")
    ds = data.load_dataset("glyphs")
    print(ds.summary())
    rows = []
    for name in names:
        args = build_parser().parse_args([
            "train", name, "--dataset", "glyphs", "--ways", "5", "--shots", str(a.shots),
            "--steps", "1000000", "--minutes", str(minutes), "--val-every", "250", "--val-episodes", "100",
            "--ckpt-every", "250", "--test-episodes", str(a.episodes), "--device", a.device,
            "--run-dir", f"runs/demo-{name}-glyphs-5w{a.shots}s", *LEARNERS[name].demo_args,
        ])
        res = run_training(args)
        rows.append((f"{name} ({res['steps']} steps, {res['train_seconds']:.0f} s)",
                     f"{100 * res['test_accuracy']:.2f} +- {100 * res['test_ci95']:.2f}"))
    test = data.episodes(ds, "test", 5, a.shots, 15, batch_size=16, num_batches=-(-a.episodes // 16),
                         seed=20_000, device=a.device)
    nn_res = PixelNN().evaluate(test, episodes=a.episodes)
    rows.append(("pixel nearest neighbour (no training)", f"{100 * nn_res.accuracy:.2f} +- {100 * nn_res.ci95:.2f}"))
    print(f"\nglyphs 5-way {a.shots}-shot on the held-out test scripts {ds.groups('test')}: "
          f"accuracy % +- 95% CI over {a.episodes} episodes")
    w = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"  {r[0]:<{w}}  {r[1]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmeta", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="train a learner"))
    sub.add_parser("demo", help="short training runs of every learner + baselines", add_help=False)
    sub.add_parser("backends", help="print the backend table")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        return demo(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        import fastmeta

        fastmeta.backends()
        return 0
    run_training(args)
    return 0
