"""Helpers shared by the data tests."""

import torch

from fastmeta.data import FewShotDataset


def make_tagged(num_classes=12, base_count=6, splits=None, channels=1, size=8):
    """Class c has ``base_count + c % 3`` examples; pixel (0, 0) holds the class, pixel (0, 1)
    the example's index within its class, pixel (0, 2) the example's global index % 256."""
    counts = [base_count + c % 3 for c in range(num_classes)]
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    # Interleave the classes so the container has to sort them.
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    images = torch.randint(0, 256, (len(labels), channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    seen = [0] * num_classes
    for i, c in enumerate(labels.tolist()):
        images[i, 0, 0, 0] = c
        images[i, 0, 0, 1] = seen[c]
        images[i, 0, 0, 2] = i % 256
        seen[c] += 1
    if splits is None:
        splits = {"train": range(0, 6), "val": range(6, 9), "test": range(9, num_classes)}
    names = [f"class{c}" for c in range(num_classes)]
    groups = [f"group{c // 3}" for c in range(num_classes)]
    return FewShotDataset(images, labels, names, groups, {k: list(v) for k, v in splits.items()},
                          name="tagged")
