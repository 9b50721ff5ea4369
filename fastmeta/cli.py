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
    regression: bool = False  # can train on --dataset sinusoid (MAML family)
    default_batch: int = 1  # --batch when not given (episodes / tasks per training step)


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
    n, heads = _max_way(args), 2
    # every step zeroes and writes one least-used slot per head: a sequence of N*K + 1 steps
    # needs that many slots per head, or the first support examples are erased before the
    # query reads them (32 slots held only 16 of 5-shot's 26 steps)
    slots = max(32, heads * (n * args.shots + 1))
    return MANN(emb, dim, n_way=n, hidden=64, slots=slots, width=16, heads=heads)


def _snail(args, in_channels):
    from fastmeta.learners import SNAIL

    emb, dim = _sequence_embedding(args, in_channels)
    n = _max_way(args)
    # the first block's values hold the label-read init's copy of the n-entry label code
    return SNAIL(emb, dim, n_way=n, seq_len=n * args.shots + 1, filters=32,
                 attention=((32, max(16, n)), (64, 32), (128, 64)))


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


def _gradient_learner(kind: str):
    """``build`` of the MAML family (``kind``: maml, metasgd, anil): TaskMLP 1-40-40-1 on
    sinusoid (Finn et al. 2017), MAML's Conv4 (``--hidden`` channels, BatchNorm with
    per-task statistics) on images, wrapped as an :class:`EpisodicLearner` with
    ``--inner-steps`` for training and ``--test-inner-steps`` for evaluation."""

    def build(args, in_channels):
        import torch.nn.functional as F
        from torch import nn

        from fastmeta.learners import ANIL, MAML, EpisodicLearner, MetaSGD
        from fastmeta.nn import Conv4, TaskConv4, TaskMLP

        regression = args.dataset == "sinusoid"
        lr = args.inner_lr
        if kind == "anil":
            if regression:
                features = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
                head = nn.Linear(40, 1)
            else:
                size = 84 if args.dataset == "miniimagenet" else 28
                features = Conv4(in_channels, args.hidden)
                head = nn.Linear(args.hidden * (size // 16) ** 2, _max_way(args))
            meta = ANIL(features, head, lr, first_order=args.first_order)
        else:
            if regression:
                model = TaskMLP([1, 40, 40, 1])
            else:
                size = 84 if args.dataset == "miniimagenet" else 28
                model = TaskConv4(in_channels, n_way=_max_way(args), hidden=args.hidden, image_size=size)
            cls = MetaSGD if kind == "metasgd" else MAML
            meta = cls(model, lr, first_order=args.first_order)
        return EpisodicLearner(meta, steps=args.inner_steps, test_steps=args.test_inner_steps,
                               loss_fn=F.mse_loss if regression else F.cross_entropy, task_chunk=args.task_chunk)

    return build


# MAML family on images in the demo: Finn et al.'s Omniglot recipe (inner lr 0.4, 1 step in
# training, 3 at test time, K query examples per class in training) with a 32-channel Conv4,
# first order and 8 tasks per step, so that half a CPU minute sees more than a handful of
# meta-steps. Sinusoid: the paper's inner lr 0.01, K=10, 25 tasks, 10 test steps, with a 10x
# meta learning rate (0.01) so that 30 s of training gets somewhere. One intra-op thread: on the
# shared 2-core CPU a second thread made MAML's small per-task convolutions ~20x slower
# (8 vs 173 meta-steps in 30 s) and its test evaluation minutes longer.
_MAML_DEMO = ("--hidden", "32", "--first-order", "--batch", "8", "--train-queries", "1", "--threads", "1")
_MAML_SINUSOID_DEMO = ("--lr", "0.01")

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
    "maml": LearnerSpec(_gradient_learner("maml"), help="Model-Agnostic Meta-Learning (Finn et al. 2017)",
                        demo_args=_MAML_DEMO, regression=True, default_batch=32),
    "metasgd": LearnerSpec(_gradient_learner("metasgd"), help="Meta-SGD: learned per-element inner learning rates (Li et al. 2017)",
                           demo_args=_MAML_DEMO, regression=True, default_batch=32),
    "anil": LearnerSpec(_gradient_learner("anil"), help="ANIL: MAML adapting only the head (Raghu et al. 2020)",
                        demo_args=_MAML_DEMO, regression=True, default_batch=32),
}

# the demo's glyph runs skip the MAML family's extra variants (MAML itself runs there and on sinusoid)
_DEMO_SKIP = ("metasgd", "anil")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("learner", choices=sorted(LEARNERS))
    p.add_argument("--dataset", default="glyphs", choices=["glyphs", "omniglot", "miniimagenet", "sinusoid"],
                   help="sinusoid: regression tasks (maml, metasgd, anil only; reports MSE)")
    p.add_argument("--data-root", default=None, help="dataset folder (omniglot/miniimagenet) or glyph cache folder")
    p.add_argument("--ways", type=int, default=5, help="N of the test (and validation) episodes")
    p.add_argument("--train-ways", type=int, default=None,
                   help="N of the training episodes (ProtoNet trains with more ways than it tests; default --ways)")
    p.add_argument("--shots", type=int, default=None, help="K support examples per class (default 1; sinusoid: "
                   "K support points, default 10)")
    p.add_argument("--queries", type=int, default=None, help="query examples per class (default 15; sinusoid: "
                   "query points per task, default 10)")
    p.add_argument("--train-queries", type=int, default=None,
                   help="query examples per class of the training episodes (default --queries; MAML's "
                        "paper trains with K)")
    p.add_argument("--batch", type=int, default=None,
                   help="episodes (tasks) per training step (default 1; maml/metasgd/anil: the meta-batch, 32, "
                        "sinusoid 25)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (train longer: raise this)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall-clock time")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-halve-every", type=int, default=2000, help="halve the learning rate every N steps (0: never)")
    p.add_argument("--backbone", default="conv4", choices=["conv4", "resnet12"])
    p.add_argument("--metric", default="sqeuclidean", choices=["sqeuclidean", "cosine"])
    p.add_argument("--fce", action="store_true", help="matching: full context embeddings (bidirectional LSTM g, attention LSTM f)")
    g = p.add_argument_group("maml / metasgd / anil")
    g.add_argument("--inner-steps", type=int, default=1, help="inner gradient steps per task in meta-training")
    g.add_argument("--test-inner-steps", type=int, default=None,
                   help="inner steps at validation/test time (default: 3 on images, 10 on sinusoid)")
    g.add_argument("--inner-lr", type=float, default=None,
                   help="inner learning rate (MetaSGD: its initial value; default 0.4 on images, 0.01 on sinusoid)")
    g.add_argument("--first-order", action="store_true", help="first-order MAML (no second-order terms)")
    g.add_argument("--task-chunk", type=int, default=None,
                   help="adapt this many tasks at a time (bounded memory, same gradients)")
    g.add_argument("--hidden", type=int, default=64, help="channels of MAML's Conv4 (the paper: 64)")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-episodes", type=int, default=200)
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--run-dir", default=None, help="default runs/<learner>-<dataset>-<N>w<K>s")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for this run (default: torch's; sinusoid: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")


def build_backbone(name: str, in_channels: int) -> torch.nn.Module:
    from fastmeta.nn import Conv4, ResNet12

    return Conv4(in_channels) if name == "conv4" else ResNet12(in_channels)


def _resolve_defaults(args: argparse.Namespace, spec: LearnerSpec) -> None:
    """Fill the options whose default depends on the learner or the dataset."""
    sinusoid = args.dataset == "sinusoid"
    if sinusoid and not spec.regression:
        raise SystemExit(f"--dataset sinusoid is regression: train maml, metasgd or anil on it, not {args.learner}")
    if args.shots is None:
        args.shots = 10 if sinusoid else 1
    if args.queries is None:
        args.queries = 10 if sinusoid else 15
    if args.batch is None:
        args.batch = 25 if sinusoid and spec.regression else spec.default_batch
    if args.inner_lr is None:
        args.inner_lr = 0.01 if sinusoid else 0.4
    if args.test_inner_steps is None:
        args.test_inner_steps = 10 if sinusoid else 3


def _sinusoid_loader(args, device):
    """``loader(split, ways, n_batches, start, seed, batch)`` of sinusoid meta-batches
    ``(support_x [B,K,1], support_y, query_x [B,Q,1], query_y, None)``: batch ``i`` of a seed
    is a function of ``(seed, i)`` (exact resume); splits differ by their seeds."""
    from fastmeta import data
    from fastmeta.data.episodes import _mix

    tasks = data.SinusoidTasks()
    k = args.shots

    def loader(split, ways, n_batches=None, start=0, seed=args.seed, batch=args.batch, queries=None):
        q = args.queries if queries is None else queries

        def gen():
            i = start
            while n_batches is None or i < start + n_batches:
                b = tasks.sample(batch, k + q, torch.Generator().manual_seed(_mix(seed, i)), device=device)
                yield b.x[:, :k], b.y[:, :k], b.x[:, k:], b.y[:, k:], None
                i += 1

        return gen()

    return loader


def sinusoid_figure(learner, path: Path, k: int = 10, steps=(0, 1, 10), seed: int = 20_000) -> Path:
    """Finn et al. (2017) Fig. 2: one held-out sinusoid, its ``k`` support points, and the
    learner's prediction after each number of inner steps in ``steps``; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    from fastmeta import data

    tasks = data.SinusoidTasks()
    p = next(learner.parameters())
    b = tasks.sample(1, k, torch.Generator().manual_seed(seed), dtype=p.dtype, device=p.device)
    grid = torch.linspace(*tasks.x_range, 200, dtype=p.dtype, device=p.device).view(1, -1, 1)
    meta = learner.meta
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid.flatten().cpu(), tasks.function(grid[0], b.amplitude, b.phase).flatten().cpu(), "r",
            label="ground truth")
    was_training = learner.training
    learner.eval()
    for n, style in zip(steps, (":", "--", "-", "-.")):
        with torch.no_grad():
            pred = meta.predict(meta.adapt_tasks(b.x, b.y, n, F.mse_loss), grid)
        ax.plot(grid.flatten().cpu(), pred.flatten().cpu(), style, label=f"after {n} step{'s' * (n != 1)}")
    learner.train(was_training)
    ax.plot(b.x.flatten().cpu(), b.y.flatten().cpu(), "k^", label=f"{k} support points")
    ax.set_xlabel("x")
    ax.legend(fontsize=8)
    ax.set_title(f"{type(meta).__name__}, K={k}: adaptation to a held-out sinusoid")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_training(args: argparse.Namespace) -> dict:
    """Train ``args.learner`` and evaluate it on the test split; returns the results dict."""
    spec = LEARNERS[args.learner]
    _resolve_defaults(args, spec)
    # sinusoid's 40-unit MLP is far too small for intra-op threads: they only add
    # synchronisation (and on a shared CPU a descheduled thread stalls every op)
    threads = args.threads if args.threads is not None else (1 if args.dataset == "sinusoid" else None)
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_training(args, spec)
    finally:
        torch.set_num_threads(saved)


def _run_training(args: argparse.Namespace, spec: LearnerSpec) -> dict:
    from fastmeta import data
    from fastmeta.train import Trainer, TrainConfig

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    regression = args.dataset == "sinusoid"
    ds = None if regression else data.load_dataset(args.dataset, args.data_root)
    train_ways = args.train_ways or args.ways
    default_dir = (f"runs/{args.learner}-sinusoid-{args.shots}s" if regression
                   else f"runs/{args.learner}-{args.dataset}-{args.ways}w{args.shots}s")
    run_dir = Path(args.run_dir or default_dir)
    learner = spec.build(args, 1 if regression else ds.image_shape[0]).to(device)
    opt = torch.optim.Adam(learner.parameters(), lr=args.lr)
    sched = (torch.optim.lr_scheduler.StepLR(opt, args.lr_halve_every, gamma=0.5)
             if args.lr_halve_every > 0 else None)

    def episode_loader(split, ways, n_batches=None, start=0, seed=args.seed, batch=args.batch, queries=None):
        queries = args.queries if queries is None else queries
        return data.episodes(ds, split, ways, args.shots, queries, batch_size=batch,
                             num_batches=n_batches, start=start, seed=seed, shuffle=spec.shuffle,
                             num_workers=args.workers, device=device)

    loader = _sinusoid_loader(args, device) if regression else episode_loader

    def batches(start_step):
        return iter(loader("train", train_ways, start=start_step, queries=args.train_queries))

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
                      resume=args.resume, progress=not args.no_progress, metric="mse" if regression else "acc")
    trainer = Trainer(learner, opt, batches, step_fn, validate if args.val_episodes > 0 else None, cfg,
                      scheduler=sched, extra_state={"args": {k: v for k, v in vars(args).items()
                                                             if isinstance(v, (str, int, float, bool, type(None)))}})
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0

    n = args.test_episodes
    t0 = time.perf_counter()
    test = loader("test", args.ways, -(-n // eval_batch), seed=20_000 + args.seed, batch=eval_batch)
    result = learner.evaluate(test, episodes=n)
    test_s = time.perf_counter() - t0
    out = dict(learner=args.learner, dataset=args.dataset, ways=args.ways, shots=args.shots,
               steps=trainer.step, train_seconds=round(train_s, 1), test_seconds=round(test_s, 1),
               test_accuracy=result.accuracy, test_ci95=result.ci95, test_episodes=result.episodes,
               run_dir=str(run_dir))
    files = "checkpoint.pt, metrics.csv, learning_curve.png, results.json"
    if regression:
        del out["ways"], out["test_accuracy"]
        out.update(test_mse=result.accuracy, test_inner_steps=args.test_inner_steps)
        out["figure"] = str(sinusoid_figure(learner, run_dir / "adaptation.png", k=args.shots))
        files += ", adaptation.png"
        print(f"{args.learner} on sinusoid, K={args.shots}, {args.test_inner_steps} inner steps, held-out tasks: "
              f"{result}")
    else:
        print(f"{args.learner} on {args.dataset} {args.ways}-way {args.shots}-shot, test scripts/classes: {result}")
    (run_dir / "results.json").write_text(json.dumps(out, indent=2))
    print(f"run folder: {run_dir} ({files})")
    return out


def demo(argv: list[str]) -> int:
    """Train every learner that exists briefly on glyphs (5-way 1-shot) and print its test
    accuracy +- 95% CI next to a pixel nearest-neighbour baseline, on the same episodes; then
    MAML on sinusoid regression (test MSE +- 95% CI and Finn et al.'s adaptation figure)."""
    p = argparse.ArgumentParser(prog="python -m fastmeta demo")
    p.add_argument("--minutes", type=float, default=None,
                   help="training minutes per learner (default: 3 minutes shared by all glyph learners, "
                        "at most 3 each; train longer: --minutes 30)")
    p.add_argument("--sinusoid-minutes", type=float, default=None,
                   help="training minutes of MAML on sinusoid (default 0.5, or --minutes when given)")
    p.add_argument("--shots", type=int, default=1)
    # 300 test episodes per glyph learner: each 600 cost 16-97 s on 2 cores (4 of the demo's
    # 10 minutes); the 95% CI is about 1.4x wider than with 600 and printed with every result
    p.add_argument("--episodes", type=int, default=300, help="test episodes per glyph learner")
    p.add_argument("--sinusoid-tasks", type=int, default=600, help="test tasks of MAML on sinusoid")
    p.add_argument("--learners", default=",".join(n for n in LEARNERS if n not in _DEMO_SKIP),
                   help="comma-separated subset (maml also runs on sinusoid)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--phases", default=None,
                   help="append 'phase<TAB>seconds<TAB>note' rows here (make demo prints them last)")
    a = p.parse_args(argv)
    from fastmeta import data
    from fastmeta.learners import PixelNN

    phases = []

    def phase(name, seconds, note=""):
        phases.append(f"{name}\t{seconds:.0f}\t{note}")

    names = [n for n in a.learners.split(",") if n]
    unknown = set(names) - set(LEARNERS)
    if unknown:
        raise SystemExit(f"unknown learners {sorted(unknown)}; choose from {sorted(LEARNERS)}")
    minutes = a.minutes if a.minutes is not None else min(3.0, 3.0 / max(1, len(names)))
    print(f"fastmeta demo: {', '.join(names)} train {minutes:g} min each on glyphs, 5-way {a.shots}-shot "
          f"(train longer: `make demo DEMO_MINUTES=30` or `python -m fastmeta demo --minutes 30`)")
    t0 = time.perf_counter()
    ds = data.load_dataset("glyphs")
    print(ds.summary())
    phase("glyph dataset (built or loaded)", time.perf_counter() - t0)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        args = build_parser().parse_args([
            "train", name, "--dataset", "glyphs", "--ways", "5", "--shots", str(a.shots),
            "--steps", "1000000", "--minutes", str(minutes), "--val-every", "250", "--val-episodes", "100",
            "--ckpt-every", "250", "--test-episodes", str(a.episodes), "--device", a.device,
            "--run-dir", f"runs/demo-{name}-glyphs-5w{a.shots}s", *LEARNERS[name].demo_args,
        ])
        res = run_training(args)
        _training_phases(phase, f"{name} glyphs", res, time.perf_counter() - t0)
        rows.append((f"{name} ({res['steps']} steps, {res['train_seconds']:.0f} s)",
                     f"{100 * res['test_accuracy']:.2f} +- {100 * res['test_ci95']:.2f}"))
    t0 = time.perf_counter()
    test = data.episodes(ds, "test", 5, a.shots, 15, batch_size=16, num_batches=-(-a.episodes // 16),
                         seed=20_000, device=a.device)
    nn_res = PixelNN().evaluate(test, episodes=a.episodes)
    phase("pixel nearest neighbour: test", time.perf_counter() - t0, f"{a.episodes} episodes")
    rows.append(("pixel nearest neighbour (no training)", f"{100 * nn_res.accuracy:.2f} +- {100 * nn_res.ci95:.2f}"))
    sin = None
    if "maml" in names:
        sin_minutes = a.sinusoid_minutes if a.sinusoid_minutes is not None else (
            a.minutes if a.minutes is not None else 0.5)
        args = build_parser().parse_args([
            "train", "maml", "--dataset", "sinusoid", "--steps", "1000000", "--minutes", str(sin_minutes),
            "--val-every", "500", "--val-episodes", "100", "--ckpt-every", "500",
            "--test-episodes", str(a.sinusoid_tasks), "--device", a.device, "--run-dir", "runs/demo-maml-sinusoid-10s",
            *_MAML_SINUSOID_DEMO,
        ])
        t0 = time.perf_counter()
        sin = run_training(args)
        _training_phases(phase, "maml sinusoid", sin, time.perf_counter() - t0)
    print(f"\nglyphs 5-way {a.shots}-shot on the held-out test scripts {ds.groups('test')}: "
          f"accuracy % +- 95% CI over {a.episodes} episodes")
    w = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"  {r[0]:<{w}}  {r[1]}")
    if sin is not None:
        print(f"\nsinusoid regression (Finn et al. 2017), K={sin['shots']}, held-out tasks: MSE after "
              f"{sin['test_inner_steps']} inner steps +- 95% CI over {sin['test_episodes']} tasks")
        print(f"  maml ({sin['steps']} steps, {sin['train_seconds']:.0f} s)  "
              f"{sin['test_mse']:.3f} +- {sin['test_ci95']:.3f}   adapted curves: {sin['figure']}")
    if a.phases:
        with open(a.phases, "a") as f:
            f.write("".join(row + "\n" for row in phases))
    return 0


def _training_phases(phase, name: str, res: dict, total: float) -> None:
    phase(f"{name}: train + validation", res["train_seconds"], f"{res['steps']} steps")
    phase(f"{name}: test", res["test_seconds"], f"{res['test_episodes']} episodes")
    phase(f"{name}: setup, checkpoint, plots", total - res["train_seconds"] - res["test_seconds"])


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
