"""The few-shot container: every image of a dataset in one uint8 tensor, a class per image,
a name and a group (alphabet, script) per class, and a class-disjoint train/val/test split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

SPLITS = ("train", "val", "test")


class FewShotDataset:
    """Images grouped into classes, with the classes split into meta-train/val/test.

    Args:
        images: uint8 ``[M, C, H, W]`` (any strides; it is never copied here).
        labels: int ``[M]``, the class of each image, in ``0 .. len(class_names)-1``.
        class_names: one unique name per class.
        class_groups: the group of each class (Omniglot alphabet, glyph script, ...).
            Splits are made by group where a dataset defines groups, so no group is in
            two splits.
        splits: split name (``"train"``, ``"val"``, ``"test"``) -> class ids. The splits
            must be disjoint; a class in no split is simply never sampled.
        name: a label for printing.
        info: dataset-specific extras (e.g. the font of each glyph example).

    The examples of class ``c`` are ``images[dataset.examples(c)]``.

    Example::

        >>> ds = fastmeta.data.load_dataset("glyphs")
        >>> ds.classes("train")[:3], ds.groups("test")
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 class_groups: Sequence[str], splits: Mapping[str, Sequence[int] | torch.Tensor],
                 name: str = "", info: dict | None = None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
                   if isinstance(images, torch.Tensor) else type(images).__name__)
            raise ValueError(f"images must be a uint8 tensor [M, C, H, W], got {got}")
        labels = torch.as_tensor(labels).long()
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}] (one per image), "
                             f"got {tuple(labels.shape)}")
        num_classes = len(class_names)
        if len(class_groups) != num_classes:
            raise ValueError(f"class_groups has {len(class_groups)} entries, class_names "
                             f"{num_classes}: need one group per class")
        if len(set(class_names)) != num_classes:
            raise ValueError("class_names must be unique")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.class_groups = list(class_groups)
        self.name = name
        self.info = dict(info or {})
        # Examples of class c are order[offsets[c]:offsets[c+1]]: one sort, no per-class lists.
        self._order = torch.argsort(labels, stable=True)
        self.class_counts = torch.bincount(labels, minlength=num_classes)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.class_counts.cumsum(0)])
        self.splits: dict[str, torch.Tensor] = {}
        owner: dict[int, str] = {}
        for split, ids in splits.items():
            ids = torch.as_tensor(ids, dtype=torch.long).flatten()
            if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
                raise ValueError(f"split {split!r} names class ids outside [0, {num_classes})")
            for c in ids.tolist():
                if c in owner:
                    raise ValueError(f"class {self.class_names[c]!r} is in splits {owner[c]!r} "
                                     f"and {split!r}: splits must be class-disjoint")
                owner[c] = split
            self.splits[split] = ids

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def classes(self, split: str | None = None) -> torch.Tensor:
        """Class ids ``[n]`` of ``split`` (all classes when ``None``)."""
        if split is None:
            return torch.arange(self.num_classes)
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; this dataset has {sorted(self.splits)}")
        return self.splits[split]

    def examples(self, c: int) -> torch.Tensor:
        """Indices into ``images`` of the examples of class ``c``."""
        return self._order[self._offsets[c]: self._offsets[c + 1]]

    def groups(self, split: str | None = None) -> list[str]:
        """Sorted names of the groups (alphabets, scripts) that ``split`` draws from."""
        return sorted({self.class_groups[c] for c in self.classes(split).tolist()})

    def summary(self) -> str:
        c, h, w = self.image_shape
        lines = [f"{self.name or 'FewShotDataset'}: {self.num_classes} classes, {len(self)} "
                 f"images of {c}x{h}x{w}"]
        for split, ids in self.splits.items():
            n = int(self.class_counts[ids].sum()) if ids.numel() else 0
            groups = self.groups(split)
            lines.append(f"  {split:5s}: {ids.numel():5d} classes, {n:6d} images, "
                         f"{len(groups)} groups")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def split_by_fraction(names: Sequence[str], fractions: Sequence[float], seed: int = 0
                      ) -> list[list[str]]:
    """Deal the sorted unique ``names`` into ``len(fractions)`` disjoint lists, in a fixed
    pseudo-random order (a function of ``seed`` only), sized by ``fractions``. The last list
    takes the remainder, so every name lands somewhere."""
    names = sorted(set(names))
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
    total = sum(fractions)
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for i, f in enumerate(fractions):
        stop = len(names) if i == len(fractions) - 1 else min(
            len(names), start + round(len(names) * f / total))
        out.append(sorted(names[j] for j in perm[start:stop]))
        start = stop
    return out
