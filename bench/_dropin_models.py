"""learn2learn's vision models, written the way learn2learn defines them (custom ``forward``s,
``Lambda``/``Flatten`` helpers, BatchNorm with running statistics, OmniglotCNN's body registered
twice), a functional ``Learner`` in the style of the standalone MAML-PyTorch repository, and
learn2learn's clone/adapt training loop (:func:`clone_adapt_loss`), for bench_dropin.py and
tests (test_fx_batched, test_tied_modules, test_dropin). Sizes
(and whether BatchNorm tracks running statistics) are arguments so tests can run them small
and on every task-batched path; the defaults are learn2learn's.

They live here, not in tests/: they are the benchmark's workload, and the tests check fastmeta
on exactly the models the benchmark times; a benchmark importing from tests/ would depend on
test scaffolding."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class Lambda(nn.Module):
    """learn2learn.nn.Lambda."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Flatten(nn.Module):
    """learn2learn.nn.Flatten: ``x.view(x.size(0), -1)``."""

    def forward(self, x):
        return x.view(x.size(0), -1)


class LinearBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(cout, affine=True, momentum=0.999, eps=1e-3, track_running_stats=False)
        self.linear = nn.Linear(cin, cout)
        nn.init.normal_(self.linear.weight, std=0.01)  # learn2learn's fc_init_ draws truncated normals
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.relu(self.normalize(self.linear(x)))


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, max_pool=True, max_pool_factor=1.0, track_running_stats=True):
        super().__init__()
        stride = (int(2 * max_pool_factor), int(2 * max_pool_factor))
        if max_pool:
            self.max_pool = nn.MaxPool2d(kernel_size=stride, stride=stride, ceil_mode=False)
            stride = (1, 1)
        else:
            self.max_pool = lambda x: x
        self.normalize = nn.BatchNorm2d(cout, affine=True, track_running_stats=track_running_stats)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=True)
        nn.init.xavier_uniform_(self.conv.weight, gain=1.0)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    def __init__(self, hidden=64, channels=1, max_pool=False, layers=4, max_pool_factor=1.0,
                 track_running_stats=True):
        core = [ConvBlock(channels if i == 0 else hidden, hidden, max_pool, max_pool_factor, track_running_stats)
                for i in range(layers)]
        super().__init__(*core)


class OmniglotFC(nn.Module):
    def __init__(self, input_size=28 * 28, output_size=5, sizes=(256, 128, 64, 64)):
        super().__init__()
        sizes = list(sizes)
        blocks = [LinearBlock(input_size, sizes[0])] + [LinearBlock(a, b) for a, b in itertools.pairwise(sizes)]
        self.features = nn.Sequential(Flatten(), nn.Sequential(*blocks))
        self.classifier = nn.Linear(sizes[-1], output_size)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.input_size = input_size

    def forward(self, x):
        return self.classifier(self.features(x))


class OmniglotCNN(nn.Module):
    """``tied=True`` (learn2learn): the body is ``self.base`` AND ``self.features[1]``."""

    def __init__(self, output_size=5, hidden_size=64, layers=4, size=28, tied=True, track_running_stats=True):
        super().__init__()
        self.hidden_size, self.size = hidden_size, size
        base = ConvBase(hidden=hidden_size, channels=1, max_pool=False, layers=layers,
                        track_running_stats=track_running_stats)
        if tied:
            self.base = base
        self.features = nn.Sequential(
            Lambda(lambda x: x.view(-1, 1, self.size, self.size)),
            base,
            Lambda(lambda x: x.mean(dim=[2, 3])),
            Flatten(),
        )
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        self.classifier.weight.data.normal_()
        self.classifier.bias.data.mul_(0.0)

    def forward(self, x):
        return self.classifier(self.features(x))


class CNN4Backbone(ConvBase):
    def forward(self, x):
        x = super().forward(x)
        return x.reshape(x.size(0), -1)


class MiniImagenetCNN(nn.Module):
    """learn2learn's CNN4 (``MiniImagenetCNN``): 84x84 images give 5x5 maps (``embedding_size``
    25 * hidden); smaller images need their own ``embedding_size``."""

    def __init__(self, output_size=5, hidden_size=32, layers=4, channels=3, embedding_size=None):
        super().__init__()
        if embedding_size is None:
            embedding_size = 25 * hidden_size
        self.features = CNN4Backbone(hidden=hidden_size, channels=channels, max_pool=True, layers=layers,
                                     max_pool_factor=4 // layers)
        self.classifier = nn.Linear(embedding_size, output_size, bias=True)
        nn.init.xavier_uniform_(self.classifier.weight, gain=1.0)
        nn.init.zeros_(self.classifier.bias)
        self.hidden_size = hidden_size

    def forward(self, x):
        return self.classifier(self.features(x))


def mini_embedding(hidden: int, image_size: int, layers: int = 4) -> int:
    """CNN4's flattened feature size for ``image_size`` (conv pad 1 keeps the size, each 2x2
    max-pool floors it)."""
    s = image_size
    for _ in range(layers):
        s //= 2
    return hidden * s * s


class Learner(nn.Module):
    """The MAML-PyTorch ``Learner`` pattern: a list of ``(name, args)`` layers run by a
    functional forward over ``vars`` (its own ``ParameterList``, or a list of fast weights),
    BatchNorm running statistics as ``requires_grad=False`` Parameters in ``vars_bn``, and
    ``parameters()`` overridden to return ``vars`` only. Layers: ``conv2d [out, in, kh, kw,
    stride, padding]``, ``linear [out, in]``, ``bn [C]``, ``relu [inplace]``, ``max_pool2d
    [kernel, stride, padding]``, ``flatten []``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vars = nn.ParameterList()
        self.vars_bn = nn.ParameterList()
        for name, a in config:
            if name in ("conv2d", "linear"):
                w = nn.Parameter(torch.ones(*(a[:4] if name == "conv2d" else a)))
                nn.init.kaiming_normal_(w)
                self.vars.append(w)
                self.vars.append(nn.Parameter(torch.zeros(a[0])))
            elif name == "bn":
                self.vars.append(nn.Parameter(torch.ones(a[0])))
                self.vars.append(nn.Parameter(torch.zeros(a[0])))
                self.vars_bn.extend([nn.Parameter(torch.zeros(a[0]), requires_grad=False),
                                     nn.Parameter(torch.ones(a[0]), requires_grad=False)])

    def forward(self, x, vars=None, bn_training=True):
        if vars is None:
            vars = self.vars
        idx = bn_idx = 0
        for name, a in self.config:
            if name == "conv2d":
                x = F.conv2d(x, vars[idx], vars[idx + 1], stride=a[4], padding=a[5])
                idx += 2
            elif name == "linear":
                x = F.linear(x, vars[idx], vars[idx + 1])
                idx += 2
            elif name == "bn":
                x = F.batch_norm(x, self.vars_bn[bn_idx], self.vars_bn[bn_idx + 1], weight=vars[idx],
                                 bias=vars[idx + 1], training=bn_training)
                idx += 2
                bn_idx += 2
            elif name == "flatten":
                x = x.view(x.size(0), -1)
            elif name == "relu":
                x = F.relu(x, inplace=a[0])
            elif name == "max_pool2d":
                x = F.max_pool2d(x, a[0], a[1], a[2])
        return x

    def parameters(self):
        return self.vars


def learner_config(dataset: str, n_way: int, hidden: int | None = None) -> list:
    """MAML-PyTorch's layer lists: ``"miniimagenet"`` (84x84x3: four 3x3 convs of 32 channels
    without padding, each ReLU -> BatchNorm -> max-pool, a linear head on 32x5x5) and
    ``"omniglot"`` (28x28x1: four stride-2 convs of 64 channels, ReLU -> BatchNorm, linear on 64).
    ``hidden`` changes the channel count (small test sizes)."""
    if dataset == "miniimagenet":
        c = hidden or 32
        cfg, cin = [], 3
        for i in range(4):
            cfg += [("conv2d", [c, cin, 3, 3, 1, 0]), ("relu", [True]), ("bn", [c]),
                    ("max_pool2d", [2, 2 if i < 3 else 1, 0])]
            cin = c
        return cfg + [("flatten", []), ("linear", [n_way, c * 5 * 5])]
    if dataset == "omniglot":
        c = hidden or 64
        cfg, cin = [], 1
        for k, st in ((3, 2), (3, 2), (3, 2), (2, 1)):
            cfg += [("conv2d", [c, cin, k, k, st, 0]), ("relu", [True]), ("bn", [c])]
            cin = c
        return cfg + [("flatten", []), ("linear", [n_way, c])]
    raise ValueError(f"unknown dataset {dataset!r}")


def clone_adapt_loss(meta, data, steps):
    """Mean query loss of learn2learn's training loop (maml_omniglot.py / maml_miniimagenet.py):
    per task ``clone()``, ``steps`` x ``adapt()`` on the support set, cross-entropy on the query
    set (``data = (sx, sy, qx, qy)``, each ``[T, ...]``)."""
    sx, sy, qx, qy = data
    total = 0
    for t in range(sx.shape[0]):
        learner = meta.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
        total = total + F.cross_entropy(learner(qx[t]), qy[t])
    return total / sx.shape[0]


__all__ = ["ConvBase", "Flatten", "Lambda", "Learner", "MiniImagenetCNN", "OmniglotCNN", "OmniglotFC", "clone_adapt_loss",
           "learner_config", "mini_embedding"]
