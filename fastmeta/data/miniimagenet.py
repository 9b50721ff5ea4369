"""mini-ImageNet (Vinyals et al. 2016, Ravi & Larochelle 2017 split) from local files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from fastmeta.data._io import data_dir, listing_key, load_npz, read_images, save_npz
from fastmeta.data.dataset import SPLITS, FewShotDataset

PICKLE = "mini-imagenet-cache-{}.pkl"
LAYOUT = ("either ROOT/mini-imagenet-cache-{train,val,test}.pkl (dicts with 'image_data' "
          "uint8 [n, 84, 84, 3] and 'class_dict' {class name: [row indices]}) or "
          "ROOT/{train,val,test}/<class>/*.jpg (any .jpg/.jpeg/.png)")
_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def _load_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    try:
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
        except UnicodeDecodeError:  # written by Python 2
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            ImportError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable pickle ({e}); expected {LAYOUT}") from e
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} holds {keys}, expected a dict with 'image_data' and "
                         f"'class_dict'")
    images, class_dict = data["image_data"], data["class_dict"]
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[3] == 3):
        got = (f"{images.dtype} array {images.shape}" if isinstance(images, np.ndarray)
               else type(images).__name__)
        raise ValueError(f"{path}: 'image_data' must be a uint8 array [n, H, W, 3], got {got}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(f"{path}: 'class_dict' must be a non-empty dict {{name: [indices]}}")
    for name, idx in class_dict.items():
        idx = np.asarray(idx)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer) \
                or idx.min() < 0 or idx.max() >= len(images):
            raise ValueError(f"{path}: class_dict[{name!r}] must be a non-empty list of row "
                             f"indices in [0, {len(images)})")
    return images, {str(k): list(map(int, v)) for k, v in class_dict.items()}


def _from_pickles(root: Path) -> tuple[torch.Tensor, list[int], list[str], dict]:
    parts = {s: _load_pickle(root / PICKLE.format(s)) for s in SPLITS}
    shapes = {a.shape[1:] for a, _ in parts.values()}
    if len(shapes) != 1:
        raise ValueError(f"the pickles hold images of different shapes {sorted(shapes)}")
    rows = [(s, name, i) for s, (_, cd) in parts.items() for name, idx in cd.items() for i in idx]
    h, w, c = shapes.pop()
    images = torch.empty(len(rows), c, h, w, dtype=torch.uint8)
    labels, names, splits, start = [], [], {s: [] for s in SPLITS}, 0
    for s in SPLITS:
        data, class_dict = parts.pop(s)
        for name, idx in class_dict.items():
            splits[s].append(len(names))
            labels += [len(names)] * len(idx)
            names.append(name)
            images[start: start + len(idx)] = torch.from_numpy(data[idx]).permute(0, 3, 1, 2)
            start += len(idx)
        del data
    return images, labels, names, splits


def _class_folders(root: Path) -> list[tuple[str, str, list[Path]]]:
    out = []
    for s in SPLITS:
        classes = sorted(p for p in (root / s).iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{root / s} has no class folders; expected {LAYOUT}")
        for folder in classes:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _EXTENSIONS)
            if not files:
                raise ValueError(f"class folder {folder} has no .jpg/.jpeg/.png images")
            out.append((s, folder.name, files))
    return out


def load_miniimagenet(root: str | os.PathLike | None = None, *, image_size: int = 84,
                      cache: bool = True, cache_dir: str | os.PathLike | None = None,
                      progress: bool = True) -> FewShotDataset:
    """mini-ImageNet as a :class:`FewShotDataset`: images uint8 ``[M, 3, H, W]`` RGB; 64 / 16
    / 20 classes of 600 images in the standard train / val / test split (the split comes
    from the files).

    Args:
        root: a folder with the three pickles ``mini-imagenet-cache-{train,val,test}.pkl``
            (used as they are: 84x84) or with ``train/``, ``val/``, ``test/`` folders of class
            folders of images (resized to ``image_size``, Lanczos). Default:
            ``<data dir>/miniimagenet``. Pickles execute code when loaded: only use files
            you trust.
        cache: for the folder layout, keep the decoded images in ``cache_dir`` (default:
            the data dir) as an uncompressed ``.npz`` keyed by the file list and size.

    Class names are the folder names / ``class_dict`` keys (wnids); each class is its own
    group (mini-ImageNet defines no coarser grouping).

    Raises:
        FileNotFoundError: ``root`` missing, or neither layout complete (the message lists
            what is missing).
        ValueError: malformed pickles, empty class folders, unreadable images.
    """
    root = Path(root).expanduser() if root is not None else data_dir() / "miniimagenet"
    if not root.is_dir():
        raise FileNotFoundError(f"mini-ImageNet folder {root} does not exist; expected {LAYOUT}")
    pickles = [root / PICKLE.format(s) for s in SPLITS]
    folders = [root / s for s in SPLITS]
    if any(p.is_file() for p in pickles):
        missing = [p.name for p in pickles if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{root} has some mini-ImageNet pickles but not {missing}; "
                                    f"expected {LAYOUT}")
        images, labels, names, splits = _from_pickles(root)
        layout = "pickle"
    elif any(p.is_dir() for p in folders):
        missing = [p.name + "/" for p in folders if not p.is_dir()]
        if missing:
            raise FileNotFoundError(f"{root} has some split folders but not {missing}; "
                                    f"expected {LAYOUT}")
        classes = _class_folders(root)
        files = [f for *_, fs in classes for f in fs]
        path = data_dir(cache_dir) / (f"miniimagenet-"
                                      f"{listing_key(root, files, size=image_size)}.npz")
        arrays = load_npz(path) if cache else None
        if arrays is None or arrays.get("images", np.empty(0)).shape[:1] != (len(files),):
            arrays = dict(images=read_images(files, image_size, "RGB", desc="mini-imagenet",
                                             progress=progress))
            if cache:
                save_npz(path, arrays, compress=False)  # JPEG photos barely compress
        images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2)
        labels = [c for c, (*_, fs) in enumerate(classes) for _ in fs]
        names = [name for _, name, _ in classes]
        splits = {s: [c for c, (cs, _, _) in enumerate(classes) if cs == s] for s in SPLITS}
        layout = "folders"
    else:
        raise FileNotFoundError(f"no mini-ImageNet files in {root}; expected {LAYOUT}")
    return FewShotDataset(images, torch.tensor(labels), names, names, splits,
                          name="miniimagenet", info=dict(root=str(root), layout=layout))
