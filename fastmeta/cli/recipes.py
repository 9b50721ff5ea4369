"""What ``python -m fastmeta train`` can build: every learner's recipe (``LEARNERS``), the
``train`` arguments and the defaults that depend on the learner or the dataset."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.learners import ANIL, MAML, MANN, SNAIL, EpisodicLearner, MatchingNet, MetaLSTM, MetaSGD, ProtoNet
from fastmeta.learners import Baseline, Reptile, iMAML
from fastmeta.nn import Conv4, ResNet12, TaskConv4, TaskMLP


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
    # pretrains on dataset class ids: built as build(args, in_channels, train_classes) and
    # trained on learner(..., classes=batch.classes)
    global_labels: bool = False


def _task_chunk(text: str):
    """``--task-chunk``: ``auto``, ``all`` (None) or a number of tasks >= 1."""
    if text in ("auto", "all"):
        return None if text == "all" else text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'all' or a number of tasks >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'all' or a number of tasks >= 1, got {text!r}")
    return n


def _protonet(args, in_channels):
    return ProtoNet(build_backbone(args.backbone, in_channels), metric=args.metric)


def _baseline(head: str):
    """``build`` of Baseline (``head="linear"``) and Baseline++ (``"cosine"``, scale 10, learned):
    the ``--backbone`` and a head over the training split's classes ``train_classes``."""

    def build(args, in_channels, train_classes):
        backbone = build_backbone(args.backbone, in_channels)
        size = 84 if args.dataset == "miniimagenet" else 28
        was_training = backbone.training
        with torch.no_grad():  # the embedding width from one dummy image
            dim = backbone.eval()(torch.zeros(1, in_channels, size, size)).flatten(1).shape[1]
        backbone.train(was_training)
        return Baseline(backbone, dim, train_classes, head=head, learn_scale=head == "cosine")

    return build


def _max_way(args) -> int:
    return max(args.ways, args.train_ways or args.ways)


def _sequence_embedding(args, in_channels, hidden=32):
    """The image embedding of the sequence learners and its width: Conv4 (``hidden`` channels)
    with a global average pool (on 28x28 inputs the pool sees 1x1, i.e. plain Conv4), or
    ResNet-12."""


    if args.backbone == "resnet12":
        return ResNet12(in_channels), 640
    conv = Conv4(in_channels, hidden)
    return nn.Sequential(*list(conv)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten()), conv.hidden


# MANN and SNAIL from the CLI are about a quarter of the papers' widths (Conv4-32 embedding;
# MANN controller 64, 32 slots of 16, 2 heads; SNAIL 32 filters, attention (32,16), (64,32),
# (128,64)): sized for CPU training budgets, where they leave the loss plateau at chance in
# fewer episodes and run ~2x more episodes/s. The papers' sizes are the constructors' defaults.
def _mann(args, in_channels):
    emb, dim = _sequence_embedding(args, in_channels)
    n, heads = _max_way(args), 2
    # every step zeroes and writes one least-used slot per head: a sequence of N*K + 1 steps
    # needs that many slots per head, or the first support examples are erased before the
    # query reads them (32 slots held only 16 of 5-shot's 26 steps)
    slots = max(32, heads * (n * args.shots + 1))
    return MANN(emb, dim, n_way=n, hidden=64, slots=slots, width=16, heads=heads)


def _snail(args, in_channels):
    emb, dim = _sequence_embedding(args, in_channels)
    n = _max_way(args)
    # the first block's values hold the label-read init's copy of the n-entry label code
    return SNAIL(emb, dim, n_way=n, seq_len=n * args.shots + 1, filters=32,
                 attention=((32, max(16, n)), (64, 32), (128, 64)))


def _metalstm(args, in_channels):
    return MetaLSTM(in_channels, n_way=_max_way(args))


def _matching(args, in_channels):
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


def _reptile_imaml(kind: str):
    """``build`` of Reptile and iMAML (``kind``: reptile, imaml): MAML's models (TaskMLP
    1-40-40-1 on sinusoid, Conv4 on images), ``--inner-steps`` SGD steps per task, wrapped as
    an :class:`EpisodicLearner`. iMAML: ``--lam`` (2, the authors' Omniglot example; 0.5 on
    sinusoid) and ``--cg-steps`` (5)."""

    def build(args, in_channels):
        regression = args.dataset == "sinusoid"
        if regression:
            model = TaskMLP([1, 40, 40, 1])
        else:
            size = 84 if args.dataset == "miniimagenet" else 28
            model = TaskConv4(in_channels, n_way=_max_way(args), hidden=args.hidden, image_size=size)
        if kind == "reptile":
            meta = Reptile(model, args.inner_lr, steps=args.inner_steps)
        else:
            meta = iMAML(model, args.inner_lr, lam=args.lam, steps=args.inner_steps, cg_steps=args.cg_steps)
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
MAML_DEMO = ("--hidden", "32", "--first-order", "--batch", "8", "--train-queries", "1", "--threads", "1")
MAML_SINUSOID_DEMO = ("--lr", "0.01")

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
                        demo_args=MAML_DEMO, regression=True, default_batch=32),
    "metasgd": LearnerSpec(_gradient_learner("metasgd"), help="Meta-SGD: learned per-element inner learning rates (Li et al. 2017)",
                           demo_args=MAML_DEMO, regression=True, default_batch=32),
    "anil": LearnerSpec(_gradient_learner("anil"), help="ANIL: MAML adapting only the head (Raghu et al. 2020)",
                        demo_args=MAML_DEMO, regression=True, default_batch=32),
    "reptile": LearnerSpec(_reptile_imaml("reptile"), help="Reptile (Nichol, Achiam & Schulman 2018)",
                           demo_args=MAML_DEMO, regression=True, default_batch=32),
    "imaml": LearnerSpec(_reptile_imaml("imaml"), help="iMAML: implicit meta-gradients (Rajeswaran et al. 2019)",
                         demo_args=MAML_DEMO, regression=True, default_batch=32),
    "baseline": LearnerSpec(_baseline("linear"), global_labels=True, default_batch=4,
                            help="Baseline: pretrained classifier, linear head fitted per episode (Chen et al. 2019)"),
    "baseline++": LearnerSpec(_baseline("cosine"), global_labels=True, default_batch=4,
                              help="Baseline++: pretrained cosine classifier, cosine head per episode (Chen et al. 2019)"),
}

# the demo's glyph runs skip MAML's two variants (MAML itself runs there and on sinusoid; Reptile and iMAML
# run on glyphs)
DEMO_SKIP = ("metasgd", "anil")


def add_train_args(p: argparse.ArgumentParser) -> None:
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
    g = p.add_argument_group("maml / metasgd / anil / reptile / imaml")
    g.add_argument("--inner-steps", type=int, default=None,
                   help="inner gradient steps per task in meta-training (default 1; imaml on sinusoid: 10)")
    g.add_argument("--test-inner-steps", type=int, default=None,
                   help="inner steps at validation/test time (default: 3 on images, 10 on sinusoid)")
    g.add_argument("--inner-lr", type=float, default=None,
                   help="inner learning rate (MetaSGD: its initial value; default 0.4 on images, 0.01 on sinusoid, "
                        "imaml on sinusoid 0.05)")
    g.add_argument("--first-order", action="store_true", help="first-order MAML (no second-order terms)")
    g.add_argument("--task-chunk", type=_task_chunk, default="auto",
                   help="adapt this many tasks at a time (bounded memory, same gradients); 'all': every task "
                        "at once; 'auto' (default): MAML chunks large models on the CPU")
    g.add_argument("--hidden", type=int, default=64, help="channels of MAML's Conv4 (the paper: 64)")
    g.add_argument("--lam", type=float, default=None,
                   help="imaml: proximal regularisation lambda (default 2; sinusoid 0.5)")
    g.add_argument("--cg-steps", type=int, default=5, help="imaml: conjugate-gradient steps (default 5)")
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
    return Conv4(in_channels) if name == "conv4" else ResNet12(in_channels)


def resolve_defaults(args: argparse.Namespace, spec: LearnerSpec) -> None:
    """Fill the options whose default depends on the learner or the dataset."""
    sinusoid = args.dataset == "sinusoid"
    if sinusoid and not spec.regression:
        raise SystemExit(f"--dataset sinusoid is regression: train maml, metasgd, anil, reptile or imaml on it, "
                         f"not {args.learner}")
    if args.shots is None:
        args.shots = 10 if sinusoid else 1
    if args.queries is None:
        args.queries = 10 if sinusoid else 15
    if args.batch is None:
        args.batch = 25 if sinusoid and spec.regression else spec.default_batch
    # iMAML's implicit gradient holds at the inner optimum: on sinusoid it needs the proximal
    # problem solved (10 steps of 0.05; lam 0.5 lets phi move): with MAML's 1 step of 0.01 and
    # lam 2 it did not learn and its support curvature grew until the inner descent diverged
    # (bench/results/pretraining.md, "iMAML on sinusoid")
    imaml_sin = sinusoid and args.learner == "imaml"
    if args.inner_steps is None:
        args.inner_steps = 10 if imaml_sin else 1
    if args.lam is None:
        args.lam = 0.5 if sinusoid else 2.0
    if args.inner_lr is None:
        args.inner_lr = 0.05 if imaml_sin else 0.01 if sinusoid else 0.4
    if args.test_inner_steps is None:
        args.test_inner_steps = 10 if sinusoid else 3


def train_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fastmeta train`` (what follows ``train`` on the command line)."""
    p = argparse.ArgumentParser(prog="python -m fastmeta train")
    add_train_args(p)
    return p
