"""Meta-training on several processes: torch.distributed, launched by ``torchrun``.

A meta-batch is a set of independent tasks, so ranks split it: rank ``r`` of ``W`` takes the
episodes ``r, r+W, r+2W, ...`` of the global batch (:func:`shard`; their union is the batch one
process would have used), computes its loss and gradients, and :func:`all_reduce_gradients`
averages the gradients (and BatchNorm running statistics) so every rank takes the same
optimizer step. Per-task BatchNorm statistics (fastmeta's task layers) are never synchronised:
each task is on one rank, so they are what one process computes. An ``nn.BatchNorm`` that
normalises over all the episodes of one forward pass (ProtoNet's Conv4) sees the rank's ``B/W``
episodes, as one process run with ``--batch B/W`` would.

The gradients are averaged explicitly after ``backward()`` (flat buckets, one ``all_reduce``
each) rather than by ``DistributedDataParallel``: several learners compute their gradients inside
the forward (MAML with ``task_chunk``, Reptile, iMAML) and that is the one code path that serves
them all; DDP's overlap of communication and backward can still be used around a learner whose
backward is an ordinary one.

Launch (one machine, 2 processes; several machines: add ``--nnodes`` and ``--rdzv-*``)::

    torchrun --nproc_per_node=2 -m fastmeta train maml --batch 32

Backend: ``gloo`` on the CPU, ``nccl`` when CUDA is available (each rank then uses
``cuda:LOCAL_RANK``); ``FASTMETA_DIST_BACKEND`` overrides it. Collectives time out after
``FASTMETA_DIST_TIMEOUT`` seconds (default 600), so a rank left alone by a dead peer ends
instead of hanging (torchrun normally ends the job first).

Example: MAML in your own script (run it with ``torchrun --nproc_per_node=N script.py``)::

    from fastmeta import distributed
    with distributed.session():                      # init from torchrun's env (or 1 process)
        maml = fastmeta.MAML(model, lr=0.4)
        distributed.broadcast_module(maml)           # every rank starts from rank 0's weights
        opt = torch.optim.Adam(maml.parameters(), 1e-3)
        for batch in loader:                         # the same global batch on every rank
            sx, sy, qx, qy = distributed.shard(batch[:4])   # this rank's tasks
            res = maml.meta_loss(sx, sy, qx, qy, steps=1)
            opt.zero_grad(); res.loss.backward()
            distributed.all_reduce_gradients(maml)   # mean over ranks = the global batch's
            opt.step()
        if distributed.is_main(): torch.save(maml.state_dict(), "maml.pt")

Every function works without a process group too (one process: ``shard`` returns its input,
the reductions return at once), so the same script runs with or without torchrun.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

BACKEND_ENV = "FASTMETA_DIST_BACKEND"
TIMEOUT_ENV = "FASTMETA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
BACKENDS = ("gloo", "nccl", "mpi", "ucc")


# ---- the process group ------------------------------------------------------------------------


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def is_active() -> bool:
    """Whether a default process group exists (then the functions below talk to the other ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0, the one rank that writes files (checkpoints, CSV, plots, results)."""
    return rank() == 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def init(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Create the default process group from torchrun's environment; returns whether one exists.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ...; default ``$FASTMETA_DIST_BACKEND``, else ``nccl``
            when CUDA is available, else ``gloo``.
        timeout_s: seconds a collective waits for the other ranks before raising; default
            ``$FASTMETA_DIST_TIMEOUT``, else 600.

    Not launched by torchrun: does nothing and returns False. Already initialised: returns
    True. Under torchrun, SIGTERM (what torchrun sends its workers on Ctrl-C or when a peer
    dies) raises ``KeyboardInterrupt``, so the trainer's interrupt handling runs.

    Raises:
        ValueError: unknown ``backend`` or a ``timeout_s`` that is not a positive number.
    """
    if is_active():
        return True
    if not launched():
        return False
    backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or ${BACKEND_ENV}), got {backend!r}")
    raw = timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        timeout = float(raw)
    except (TypeError, ValueError):
        timeout = float("nan")
    if not timeout > 0:
        raise ValueError(f"timeout_s (argument or ${TIMEOUT_ENV}) must be a number of seconds > 0, got {raw!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    signal.signal(signal.SIGTERM, _interrupt)
    return True


def shutdown(synchronize: bool = False) -> None:
    """Destroy the default process group (if any). ``synchronize``: first wait at a barrier
    until every rank is here -- a gloo rank that tears its group down while the other still
    talks to it can die in C++ ("terminate called without an active exception", SIGABRT; seen
    in bench_distributed on a quiet machine after the last step). Not after an error: a rank
    that failed must not wait for ranks that may never arrive."""
    if is_active():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(backend: str | None = None, timeout_s: float | None = None) -> Iterator[bool]:
    """``with session(): ...``: :func:`init` on entry (yields whether a group exists),
    :func:`shutdown` on exit."""
    active = init(backend, timeout_s)
    finished = False
    try:
        yield active
        finished = True
    finally:
        if active:
            shutdown(synchronize=finished)


# ---- splitting the meta-batch -----------------------------------------------------------------


def shard(batch, rank_: int | None = None, world: int | None = None):
    """This rank's part of a batch of tasks: every tensor ``t`` (leading dim ``B``) becomes
    ``t[rank::world]``, recursively through tuples, lists, dicts (a task dict of
    :mod:`fastmeta.rl`) and named tuples (an :class:`fastmeta.data.Episode`); ``None`` stays
    ``None``. The union over ranks is the
    whole batch; rank ``r`` gets ``len(range(r, B, world))`` tasks (0 when ``B <= r``).

    Args:
        batch: a tensor ``[B, ...]`` or a (named) tuple / list / dict of them (and ``None``).
        rank_, world: default this process's rank and the world size (0 and 1 without a group).

    Raises:
        TypeError: something other than a tensor, tuple, list, dict or None.
        ValueError: tensors disagree on ``B``, or ``rank_`` is not in ``[0, world)``.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank_ must be in [0, world={w}), got {r}")
    sizes = set()

    def cut(x):
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                raise ValueError("shard: a 0-dim tensor has no batch dimension to split")
            sizes.add(x.shape[0])
            return x[r::w]
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(cut(v) for v in x))
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v) for v in x)
        raise TypeError(f"shard: batch must hold tensors [B, ...], tuples, lists, dicts or None, got "
                        f"{type(x).__name__}")

    out = cut(batch)
    if len(sizes) > 1:
        raise ValueError(f"shard: the tensors of a batch must share the leading dim B, got {sorted(sizes)}")
    return out


def check_divisible(n: int, what: str = "batch") -> None:
    """Raise ``ValueError`` unless ``n`` splits evenly over the ranks (equal shards make the
    mean of the ranks' mean losses the global batch's mean)."""
    w = world_size()
    if n % w:
        raise ValueError(f"{what} = {n} must be a multiple of the world size {w} (each rank takes {what}/{w})")


# ---- reductions ---------------------------------------------------------------------------------


def _buckets(tensors: list[torch.Tensor], cap: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of same-dtype, same-device tensors of at most ``cap`` elements (a
    larger tensor is a group of its own)."""
    group: list[torch.Tensor] = []
    n = 0
    for t in tensors:
        if group and (n + t.numel() > cap or t.dtype != group[0].dtype or t.device != group[0].device):
            yield group
            group, n = [], 0
        group.append(t)
        n += t.numel()
    if group:
        yield group


def all_reduce_mean_(tensors: Iterable[torch.Tensor], bucket_mb: float = 25.0) -> None:
    """Replace every tensor by its mean over the ranks, in place; the tensors are packed into
    flat buckets of about ``bucket_mb`` MB, one ``all_reduce`` per bucket. No group: nothing."""
    if not is_active():
        return
    tensors = list(tensors)
    w = world_size()
    cap = max(1, int(bucket_mb * 2**20) // 4)  # elements (of 4 bytes: float32)
    for group in _buckets(tensors, cap):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= w
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def all_reduce_gradients(module_or_params, buffers: bool = True, bucket_mb: float = 25.0) -> None:
    """Average the ``.grad`` of every parameter over the ranks, in place (call it after
    ``backward()``, before ``optimizer.step()``); with ``buffers`` and a module, also its
    floating-point buffers (BatchNorm running statistics), so every rank keeps the same model.

    A parameter whose ``.grad`` is None on some ranks but not on others gets a zero gradient
    on those (it is averaged as 0); None everywhere stays None. No group: nothing.
    """
    if not is_active():
        return
    module = module_or_params if isinstance(module_or_params, nn.Module) else None
    params = list(module.parameters() if module is not None else module_or_params)
    params = [p for p in params if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                       device=params[0].device if params else "cpu")
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
    tensors = [p.grad for p in params if p.grad is not None]
    if buffers and module is not None:
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    all_reduce_mean_(tensors, bucket_mb)


def mean_over_ranks(values) -> torch.Tensor:
    """The mean over the ranks of ``values`` (numbers or a tensor), as a float64 CPU tensor."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().clone().cpu()
    if not is_active():
        return t
    on = _collective_device()
    t = t.to(on)
    dist.all_reduce(t)
    return (t / world_size()).cpu()


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is true on at least one rank (every rank gets the same
    answer; one collective for all of them)."""
    if not is_active():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([int(bool(f)) for f in flags], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """Inside the block, under a process group, SIGINT and SIGTERM (what torchrun forwards on
    Ctrl-C) set a flag instead of raising, so that the ranks can agree (:func:`any_rank`) to
    stop at the same step and rank 0 can save a consistent checkpoint; a second signal raises
    ``KeyboardInterrupt`` at once. Yields ``interrupted() -> bool``. Without a group (or off the
    main thread) nothing changes and ``interrupted()`` is always False."""
    if not is_active() or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    received: list[int] = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt(f"signal {signum} (twice)")
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(received)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (``[n_r, ...]``, ``n_r`` may differ) concatenated in rank order, on
    every rank (as CPU tensors). No group: ``t``."""
    if not is_active():
        return t
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module``, in place."""
    if not is_active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


# ---- evaluation ---------------------------------------------------------------------------------


def evaluate(episode_metric: Callable[..., torch.Tensor], batches: Iterable, episodes: int) -> torch.Tensor:
    """Score ``episodes`` episodes with the ranks splitting every batch; every rank returns
    all of them, in the order one process would have scored them.

    Args:
        episode_metric: ``(support_x, support_y, query_x, query_y) -> [b]`` per-episode values
            (a learner's ``episode_accuracy``); called on this rank's :func:`shard` of each
            batch (skipped when the shard is empty).
        batches: iterable of ``(support_x, support_y, query_x, query_y, ...)`` batches, the
            same on every rank.
        episodes: how many episodes to score (the first ``episodes`` of the stream).

    Returns:
        ``[episodes]`` float64 CPU tensor (pass it to
        :func:`fastmeta.learners.confidence_interval` for mean +- 95% CI).

    Raises:
        ValueError: ``episodes < 1``, or the batches run out before ``episodes`` episodes.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an int >= 1, got {episodes!r}")
    r, w = rank(), world_size()
    mine: list[tuple[int, torch.Tensor]] = []  # (global index of the shard's first episode, values)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            b = min(batch[0].shape[0], episodes - seen)
            part = shard(tuple(t[:b] for t in batch[:4]), r, w)
            if part[0].shape[0]:
                mine.append((seen, episode_metric(*part).detach().double().cpu()))
            seen += b
            if seen >= episodes:
                break
    if seen < episodes:
        raise ValueError(f"the episode source ran out after {seen} of {episodes} episodes")
    parts = [mine]
    if is_active():
        parts = [None] * w
        dist.all_gather_object(parts, mine)
    out = torch.full((episodes,), float("nan"), dtype=torch.float64)
    for src, items in enumerate(parts):
        for start, values in items:
            out[start + src: start + src + w * len(values): w] = values
    return out
