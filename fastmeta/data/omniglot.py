"""Omniglot (Lake et al., Science 2015) from a local copy in its standard layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastmeta.data._io import data_dir, listing_key, load_npz, read_images, save_npz
from fastmeta.data.dataset import FewShotDataset, split_by_fraction

PARTS = ("images_background", "images_evaluation")
LAYOUT = ("ROOT/images_background/<alphabet>/<character>/*.png and "
          "ROOT/images_evaluation/<alphabet>/<character>/*.png (the unzipped "
          "images_background.zip / images_evaluation.zip of github.com/brendenlake/omniglot)")
# Vinyals et al. (2016) / Snell et al. (2017) character counts: train / val / test.
_CHARACTER_SPLIT = (1028, 172, 423)


def _find_root(root: Path) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"Omniglot folder {root} does not exist; expected {LAYOUT}")
    for candidate in (root, root / "omniglot-py", root / "omniglot"):
        if any((candidate / p).is_dir() for p in PARTS):
            return candidate
    raise FileNotFoundError(f"no images_background/ or images_evaluation/ in {root}; "
                            f"expected {LAYOUT}")


def _characters(root: Path) -> list[tuple[str, str, str, list[Path]]]:
    """(part, alphabet, character, sorted png paths) for every character folder."""
    out = []
    for part in PARTS:
        if not (root / part).is_dir():
            continue
        alphabets = sorted(p for p in (root / part).iterdir() if p.is_dir())
        if not alphabets:
            raise ValueError(f"{root / part} has no alphabet folders; expected {LAYOUT}")
        for alphabet in alphabets:
            chars = sorted(p for p in alphabet.iterdir() if p.is_dir())
            if not chars:
                raise ValueError(f"alphabet folder {alphabet} has no character folders; "
                                 f"expected {LAYOUT}")
            for char in chars:
                pngs = sorted(char.glob("*.png"))
                if not pngs:
                    raise ValueError(f"character folder {char} has no .png files; "
                                     f"expected {LAYOUT}")
                out.append((part, alphabet.name, char.name, pngs))
    return out


def load_omniglot(root: str | os.PathLike | None = None, *, image_size: int = 28,
                  rotations: bool = True, split: str = "alphabet", val_fraction: float = 1 / 6,
                  seed: int = 0, cache: bool = True, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> FewShotDataset:
    """Omniglot as a :class:`FewShotDataset`: images uint8 ``[M, 1, S, S]`` (``S =
    image_size``), ink = 255 on 0 (the PNGs' black-on-white, inverted), resized with Lanczos.

    Args:
        root: the folder holding ``images_background/`` and/or ``images_evaluation/``
            (also accepted one level down in ``omniglot-py/``). Default:
            ``<data dir>/omniglot`` (see :func:`fastmeta.data.data_dir`).
        rotations: add each character rotated by 90, 180 and 270 degrees as three more
            classes of the same split (Santoro et al. 2016; Vinyals et al. 2016): 4x classes.
        split: ``"alphabet"`` (Lake's): test = the evaluation alphabets, never seen in
            training; ``val_fraction`` of the background alphabets (a fixed choice for
            ``seed``) is validation, the rest train. ``"character"`` (Vinyals et al. 2016):
            all characters pooled and dealt 1028/172/423 (in proportion) to train/val/test
            in a fixed random order; the published class lists are not bundled, so the
            classes differ from theirs.
        cache: keep the decoded images in ``cache_dir`` (default: the data dir) as a
            compressed ``.npz`` keyed by the folder's file list and ``image_size``.

    Class ``names`` are ``"<alphabet>/<character>"`` (``"@rot90"`` etc. for rotations), groups
    are alphabets; a rotated class stays in the split of its character.

    Raises:
        FileNotFoundError: ``root`` or both image folders missing.
        ValueError: an empty alphabet/character folder, an unreadable PNG, a bad ``split``.
    """
    if split not in ("alphabet", "character"):
        raise ValueError(f"split must be 'alphabet' or 'character', got {split!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = _find_root(Path(root).expanduser() if root is not None else data_dir() / "omniglot")
    chars = _characters(root)
    files = [p for *_, pngs in chars for p in pngs]
    path = data_dir(cache_dir) / f"omniglot-{listing_key(root, files, size=image_size)}.npz"
    arrays = load_npz(path) if cache else None
    if arrays is None or arrays.get("images", np.empty(0)).shape[:1] != (len(files),):
        arrays = dict(images=read_images(files, image_size, "L", invert=True, desc="omniglot",
                                         progress=progress))
        if cache:
            save_npz(path, arrays)
    base = torch.from_numpy(arrays["images"])[:, None]
    base_labels = torch.tensor([c for c, (*_, pngs) in enumerate(chars) for _ in pngs])

    names = [f"{alphabet}/{char}" for _, alphabet, char, _ in chars]
    alphabets = [alphabet for _, alphabet, _, _ in chars]
    if split == "alphabet":
        background = [a for part, a, _, _ in chars if part == PARTS[0]]
        val, train = split_by_fraction(background, [val_fraction, 1 - val_fraction], seed)
        test = {a for part, a, _, _ in chars if part == PARTS[1]}
        which = {**{a: "train" for a in train}, **{a: "val" for a in val},
                 **{a: "test" for a in test}}
        char_split = [which[a] for a in alphabets]
    else:
        parts = split_by_fraction(names, _CHARACTER_SPLIT, seed)
        which = {n: s for s, part in zip(("train", "val", "test"), parts) for n in part}
        char_split = [which[n] for n in names]

    k = 4 if rotations else 1
    images = torch.cat([torch.rot90(base, r, dims=(2, 3)) for r in range(k)])
    labels = torch.cat([base_labels * k + r for r in range(k)])
    class_names = [n + (f"@rot{90 * r}" if r else "") for n in names for r in range(k)]
    class_groups = [a for a in alphabets for _ in range(k)]
    splits = {s: [c * k + r for c, cs in enumerate(char_split) if cs == s for r in range(k)]
              for s in ("train", "val", "test")}
    return FewShotDataset(images, labels, class_names, class_groups, splits, name="omniglot",
                          info=dict(root=str(root), rotations=rotations, split=split))
