"""A tiny class-structured image dataset for learner tests (no build, no download)."""

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.data import FewShotDataset


def blob_dataset(classes_per_split=12, per_class=8, size=12, seed=0) -> FewShotDataset:
    """Each class is a random binary pattern; examples are noisy, shifted copies of it."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * classes_per_split
    patterns = (torch.rand(n, 1, size, size, generator=g) > 0.6).float()
    imgs = patterns.repeat_interleave(per_class, 0)
    shifts = torch.randint(-1, 2, (len(imgs), 2), generator=g)
    imgs = torch.stack([im.roll(tuple(s.tolist()), (1, 2)) for im, s in zip(imgs, shifts)])
    imgs = (imgs * 200 + torch.rand(imgs.shape, generator=g) * 55).to(torch.uint8)
    labels = torch.arange(n).repeat_interleave(per_class)
    names = [f"c{i}" for i in range(n)]
    groups = [f"g{i // 4}" for i in range(n)]
    c = classes_per_split
    splits = {"train": list(range(c)), "val": list(range(c, 2 * c)), "test": list(range(2 * c, 3 * c))}
    return FewShotDataset(imgs, labels, names, groups, splits, name="blobs")


class Custom(nn.Module):
    """Its own forward (not a Sequential): takes the traced path (torch.fx, fastmeta/func/_fx.py)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * 1.5)


class FuncOnly(Custom):
    """``Custom`` with a parameter used directly in ``forward`` (``F.linear(x, self.a.weight)``):
    the traced path refuses it, so it takes the torch.func (vmap) path."""

    def forward(self, x):
        return self.b(torch.tanh(F.linear(x, self.a.weight, self.a.bias)) * 1.5)
