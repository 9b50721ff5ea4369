"""Few-shot data: datasets as one uint8 tensor with class-disjoint splits, N-way K-shot
episode batches for DataLoaders, and sinusoid regression tasks.

>>> from fastmeta import data
>>> ds = data.load_dataset("glyphs")          # built once (~30 s), then cached
>>> print(ds)                                  # classes / images / scripts per split
>>> for sx, sy, qx, qy, _ in data.episodes(ds, "train", n_way=5, k_shot=1, n_query=15,
...                                         batch_size=32, num_batches=1000, num_workers=2):
...     ...   # sx [32, 5, 1, 28, 28] float in [0, 1], sy [32, 5] in 0..4, qx [32, 75, ...]

Datasets: ``"glyphs"`` (built offline from matplotlib's fonts, no download), ``"omniglot"``
and ``"miniimagenet"`` (from local files). Nothing is downloaded.

The image readers need Pillow (and the glyphs matplotlib and tqdm); the rest needs torch only.
"""

from __future__ import annotations

import os

from fastmeta.data._io import data_dir
from fastmeta.data.dataset import SPLITS, FewShotDataset, split_by_fraction
from fastmeta.data._episodes import Episode, EpisodeDataset, EpisodeLoader, episodes, stream_seed, to_float
from fastmeta.data.glyphs import load_glyphs, script_split
from fastmeta.data.miniimagenet import load_miniimagenet
from fastmeta.data.omniglot import load_omniglot
from fastmeta.data.sinusoid import SinusoidBatch, SinusoidTasks

_LOADERS = {"glyphs": load_glyphs, "omniglot": load_omniglot, "miniimagenet": load_miniimagenet}


def load_dataset(name: str, root: str | os.PathLike | None = None, **kwargs) -> FewShotDataset:
    """Load a few-shot dataset with its train/val/test split.

    Args:
        name: ``"glyphs"``, ``"omniglot"`` or ``"miniimagenet"`` (case, ``-`` and ``_``
            ignored).
        root: for glyphs, the cache folder; for the others, the dataset's folder. Default:
            :func:`data_dir` (``$FASTMETA_DATA_DIR`` or ``~/.cache/fastmeta``), with
            ``omniglot/`` or ``miniimagenet/`` appended for those.
        **kwargs: passed to :func:`load_glyphs`, :func:`load_omniglot` or
            :func:`load_miniimagenet`.

    Returns:
        A :class:`FewShotDataset`: ``images`` uint8 ``[M, C, H, W]``, ``labels`` ``[M]``,
        ``class_names``, ``class_groups``, ``splits``.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(_LOADERS)}")
    return _LOADERS[key](root, **kwargs)


__all__ = [
    "SPLITS", "Episode", "EpisodeDataset", "EpisodeLoader", "FewShotDataset", "SinusoidBatch",
    "SinusoidTasks", "data_dir", "episodes", "load_dataset", "load_glyphs", "load_miniimagenet",
    "load_omniglot", "script_split", "split_by_fraction", "stream_seed", "to_float",
]
