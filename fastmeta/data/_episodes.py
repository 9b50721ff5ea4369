"""N-way K-shot episodes: a map-style dataset indexed by episode number, and a loader that
batches episodes, runs DataLoader workers and converts uint8 images to float per batch.

Episode ``i`` of a seed is a pure function of ``(seed, i)`` (its own ``torch.Generator``),
so it is the same whatever the number of workers, the batch size or the start step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastmeta.data.dataset import FewShotDataset

_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, index: int) -> int:
    """The generator seed of item ``index`` of stream ``seed``: splitmix64 of
    ``seed * 2**32 + index``, a bijection, so seeds are distinct for every seed and index
    below 2**32 and neighbouring ones are uncorrelated."""
    z = ((seed << 32) + index + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class Episode(NamedTuple):
    """One episode, or a batch of ``B`` episodes (a leading ``B`` on every field).

    Fields (unbatched shapes; ``S = N*K`` support, ``Q = N*n_query`` query examples):
        support_x: ``[S, C, H, W]`` uint8 from the dataset, float after :func:`episodes`.
        support_y: ``[S]`` int64 labels in ``0..N-1``, ``K`` of each.
        query_x: ``[Q, C, H, W]``.
        query_y: ``[Q]`` int64 labels in ``0..N-1``, ``n_query`` of each.
        classes: ``[N]`` int64 dataset class ids: label ``j`` is class ``classes[j]``.

    Unpacks like a tuple: ``sx, sy, qx, qy, classes = episode`` or ``episode[:4]``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class EpisodeDataset(Dataset):
    """Map-style dataset of N-way K-shot episodes from one split: item ``i`` is episode ``i``.

    Args:
        dataset: a :class:`FewShotDataset`.
        split: ``"train"``, ``"val"`` or ``"test"`` (or ``None`` for all classes).
        n_way: classes per episode ``N``.
        k_shot: support examples per class ``K``.
        n_query: query examples per class ``Q`` (may be 0).
        seed: episode ``i`` is a function of ``(seed, i)`` alone.
        num_episodes: ``len()`` of the dataset; ``None`` for an endless stream (index it with
            any ``i >= 0``; ``len()`` then raises ``TypeError``).
        shuffle: shuffle the order of support and of query examples within each episode
            (sequence models such as MANN or SNAIL must not see labels in sorted order).
            Without it, the support is class-major: labels ``[0]*K + [1]*K + ...``.

    Items are :class:`Episode` tuples of uint8 images (unbatched shapes). Batch them with a
    ``torch.utils.data.DataLoader(batch_size=B)`` or use :func:`episodes`.

    Raises:
        ValueError: the split has fewer than ``n_way`` classes, or one of its classes has
            fewer than ``k_shot + n_query`` examples.
    """

    def __init__(self, dataset: FewShotDataset, split: str | None, n_way: int, k_shot: int,
                 n_query: int, seed: int = 0, num_episodes: int | None = None,
                 shuffle: bool = False):
        self.n_way = _check_int("n_way", n_way, 1)
        self.k_shot = _check_int("k_shot", k_shot, 1)
        self.n_query = _check_int("n_query", n_query, 0)
        self.seed = _check_int("seed", seed, 0)
        if num_episodes is not None:
            _check_int("num_episodes", num_episodes, 0)
        self.num_episodes = num_episodes
        self.shuffle = bool(shuffle)
        self.dataset, self.split = dataset, split
        self.classes = dataset.classes(split)
        where = f"split {split!r} of {dataset.name or 'the dataset'}"
        if self.classes.numel() < n_way:
            raise ValueError(f"{where} has {self.classes.numel()} classes, fewer than "
                             f"n_way={n_way}")
        need = k_shot + n_query
        self.counts = dataset.class_counts[self.classes]
        small = (self.counts < need).nonzero().flatten().tolist()
        if small:
            shown = ", ".join(f"{dataset.class_names[int(self.classes[j])]!r} "
                              f"({int(self.counts[j])})" for j in small[:5])
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise ValueError(f"{where}: {len(small)} classes have fewer than k_shot + n_query = "
                             f"{need} examples: {shown}{more}")
        self.offsets = dataset._offsets[self.classes]
        self._max_count = int(self.counts.max())

    def __len__(self) -> int:
        if self.num_episodes is None:
            raise TypeError("this EpisodeDataset is an endless stream (num_episodes=None)")
        return self.num_episodes

    def __getitem__(self, index: int) -> Episode:
        index = int(index)
        if index < 0 or (self.num_episodes is not None and index >= self.num_episodes):
            raise IndexError(f"episode {index} out of range [0, {self.num_episodes})")
        g = torch.Generator().manual_seed(stream_seed(self.seed, index))
        n, k = self.n_way, self.k_shot
        ways = torch.randperm(self.classes.numel(), generator=g)[:n]
        # K+Q distinct examples per class in one call: sort random keys, classes with fewer
        # examples than the largest one get keys > 1 on their padding so it sorts last.
        counts = self.counts[ways]
        keys = torch.rand(n, self._max_count, generator=g)
        keys.masked_fill_(torch.arange(self._max_count) >= counts[:, None], 2.0)
        pick = keys.argsort(dim=1, stable=True)[:, : k + self.n_query]
        idx = self.dataset._order[self.offsets[ways][:, None] + pick]  # [N, K+Q]
        s_idx, q_idx = idx[:, :k].flatten(), idx[:, k:].flatten()
        s_y = torch.arange(n).repeat_interleave(k)
        q_y = torch.arange(n).repeat_interleave(self.n_query)
        if self.shuffle:
            ps = torch.randperm(s_y.numel(), generator=g)
            pq = torch.randperm(q_y.numel(), generator=g)
            s_idx, s_y, q_idx, q_y = s_idx[ps], s_y[ps], q_idx[pq], q_y[pq]
        return Episode(self._gather(s_idx), s_y, self._gather(q_idx), q_y, self.classes[ways])

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        images = self.dataset.images
        if images.device.type != "cpu":
            return images[idx.to(images.device)]
        # numpy's single-threaded gather: torch's indexing of a few hundred small images
        # is 5x slower, and 100x slower when its OpenMP threads compete for busy cores.
        return torch.from_numpy(images.numpy()[idx.numpy()])


def to_float(x: torch.Tensor, normalize: tuple[Sequence[float], Sequence[float]] | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images ``[..., C, H, W]`` -> ``dtype`` in ``[0, 1]``, then ``(x - mean) / std``
    per channel when ``normalize=(mean, std)`` (each a length-C sequence, in [0, 1] units)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {x.dtype}")
    if normalize is not None:
        mean, std = (torch.as_tensor(v, dtype=dtype).flatten() for v in normalize)
        if mean.numel() not in (1, x.shape[-3]) or std.shape != mean.shape:
            raise ValueError(f"normalize must be (mean, std) with 1 or {x.shape[-3]} values "
                             f"each, got {normalize!r}")
    if x.device.type == "cpu" and dtype in _NUMPY_FLOATS:
        # numpy: single-threaded, so a batch of small images does not pay for (or, on busy
        # cores, stall on) waking torch's OpenMP threads; the same IEEE results.
        np_dtype = _NUMPY_FLOATS[dtype]
        out = x.numpy().astype(np_dtype) / np_dtype(255)
        if normalize is not None:
            out -= mean.numpy().reshape(-1, 1, 1)
            out /= std.numpy().reshape(-1, 1, 1)
        return torch.from_numpy(out)
    out = x.to(dtype).div_(255)
    if normalize is not None:
        out = out.sub_(mean.to(x.device).view(-1, 1, 1)).div_(std.to(x.device).view(-1, 1, 1))
    return out


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if tensors[0].device.type != "cpu":
        return torch.stack(tensors)
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))  # see to_float


class _Indices:
    """Episode indices ``start, start+1, ...`` (``stop=None``: endless), for the sampler;
    with ``world > 1``, only this rank's share of every global batch of ``batch_size``:
    episodes ``j*batch_size + rank + k*world`` of batch ``j`` (``distributed.shard``'s
    ``rank::world``), so ``start``/``stop`` stay global episode numbers (multiples of it)."""

    def __init__(self, start: int, stop: int | None, batch_size: int = 1, rank: int = 0,
                 world: int = 1):
        self.start, self.stop = start, stop
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def __iter__(self) -> Iterator[int]:
        every = iter(range(self.start, self.stop)) if self.stop is not None \
            else itertools.count(self.start)
        if self.world == 1:
            return every
        return (i for i in every if (i % self.batch_size) % self.world == self.rank)

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("endless episode stream has no length")
        return max(0, self.stop - self.start) // self.world


class _Collate:
    """Stack episodes into a batch (the default collate), and convert its images to float
    right there when the batch stays on the CPU: in a worker process (single-threaded) rather
    than in the main process, whose threads the model needs. Batches bound for a GPU stay
    uint8 until they are there (4x less to copy)."""

    def __init__(self, convert: bool, normalize, dtype: torch.dtype):
        self.convert, self.normalize, self.dtype = convert, normalize, dtype

    def __call__(self, items: list[Episode]) -> Episode:
        batch = Episode(*(_stack(field) for field in zip(*items)))
        if self.convert:
            batch = batch._replace(support_x=to_float(batch.support_x, self.normalize, self.dtype),
                                   query_x=to_float(batch.query_x, self.normalize, self.dtype))
        return batch


class EpisodeLoader:
    """Iterable of batched :class:`Episode` s with float images on ``device``; see
    :func:`episodes`. ``len()`` is the number of batches when the stream is finite."""

    def __init__(self, episode_dataset: EpisodeDataset, batch_size: int, start: int,
                 num_batches: int | None, num_workers: int, pin_memory: bool | None,
                 device, normalize, dtype: torch.dtype, rank: int = 0, world: int = 1):
        self.episode_dataset = episode_dataset
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if pin_memory is None:
            pin_memory = self.device.type == "cuda"
        stop = None if num_batches is None else (start + num_batches) * batch_size
        self.num_batches = num_batches
        self.normalize, self.dtype = normalize, dtype
        c = episode_dataset.dataset.image_shape[0]
        to_float(torch.zeros(1, c, 1, 1, dtype=torch.uint8), normalize, dtype)  # fail early
        self.on_cpu = self.device.type == "cpu"
        self.loader = DataLoader(
            episode_dataset, batch_size=batch_size // world,
            sampler=_Indices(start * batch_size, stop, batch_size, rank, world),
            num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
            collate_fn=_Collate(self.on_cpu, normalize, dtype),
        )

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("endless episode stream has no length (num_batches=None)")
        return self.num_batches

    def __iter__(self) -> Iterator[Episode]:
        if self.on_cpu:
            yield from self.loader
            return
        non_blocking = self.loader.pin_memory
        for sx, sy, qx, qy, classes in self.loader:
            sx, sy, qx, qy = (t.to(self.device, non_blocking=non_blocking)
                              for t in (sx, sy, qx, qy))
            yield Episode(to_float(sx, self.normalize, self.dtype), sy,
                          to_float(qx, self.normalize, self.dtype), qy, classes)


def episodes(dataset: FewShotDataset, split: str | None, n_way: int, k_shot: int,
             n_query: int = 15, *, batch_size: int = 1, num_batches: int | None = None,
             start: int = 0, seed: int = 0, shuffle: bool = False, num_workers: int = 0,
             pin_memory: bool | None = None, device: torch.device | str | None = None,
             normalize: tuple[Sequence[float], Sequence[float]] | None = None,
             dtype: torch.dtype = torch.float32, rank: int = 0, world: int = 1) -> EpisodeLoader:
    """Batches of ``batch_size`` N-way K-shot episodes from ``split`` of ``dataset``.

    Each batch is an :class:`Episode` with

    - ``support_x`` ``[B, N*K, C, H, W]`` float in ``[0, 1]`` (or normalised), on ``device``
    - ``support_y`` ``[B, N*K]`` int64 in ``0..N-1``
    - ``query_x``   ``[B, N*Q, C, H, W]``
    - ``query_y``   ``[B, N*Q]`` int64 in ``0..N-1``
    - ``classes``   ``[B, N]`` dataset class ids (on the CPU).

    Batch ``j`` holds episodes ``j*B .. j*B+B-1`` of ``seed``: the same whatever
    ``num_workers``, so ``episodes(..., start=step)`` resumes a run exactly.

    Args:
        n_query: query examples per class.
        num_batches: batches to yield; ``None`` for an endless stream (training).
        start: index of the first batch.
        shuffle: shuffle example order within each episode (see :class:`EpisodeDataset`).
        num_workers: DataLoader worker processes (kept alive between iterations).
        pin_memory: pin batches for fast host-to-GPU copies; default: when ``device`` is CUDA.
        device: where the batches go. For a GPU, uint8 batches are copied (4x less than
            float) and converted there; for the CPU, the worker that builds a batch converts it.
        normalize: ``(mean, std)`` per channel, in ``[0, 1]`` units.
        rank, world: build only this rank's share of every batch: episodes ``rank::world`` of
            it (``batch_size // world`` episodes, the batch ``fastmeta.distributed.shard``
            would cut from the whole one; ``batch_size`` must be a multiple of ``world``).

    Example::

        >>> ds = fastmeta.data.load_dataset("glyphs")
        >>> for sx, sy, qx, qy, _ in episodes(ds, "train", 5, 1, 15, batch_size=32,
        ...                                   num_batches=100, num_workers=2, device="cuda"):
        ...     loss, acc = learner(sx, sy, qx, qy)
    """
    ep = EpisodeDataset(dataset, split, n_way, k_shot, n_query, seed=seed, shuffle=shuffle)
    _check_int("batch_size", batch_size, 1)
    _check_int("start", start, 0)
    _check_int("num_workers", num_workers, 0)
    if num_batches is not None:
        _check_int("num_batches", num_batches, 0)
    _check_int("world", world, 1)
    _check_int("rank", rank, 0)
    if rank >= world or batch_size % world:
        raise ValueError(f"need 0 <= rank < world and batch_size a multiple of world, got rank="
                         f"{rank}, world={world}, batch_size={batch_size}")
    return EpisodeLoader(ep, batch_size, start, num_batches, num_workers, pin_memory, device,
                         normalize, dtype, rank, world)
