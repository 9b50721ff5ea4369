"""Input validation shared by the ops: clear ValueError/TypeError naming the argument.

Value checks that need the data (label ranges, empty classes, NaN) synchronise with the
device and are skipped while ``torch.compile`` traces (they would break the graph); shape,
dtype and device checks always run.
"""

from __future__ import annotations

import math

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def float_tensor(name: str, t, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")
    return t


def label_tensor(name: str, t, shape: tuple[int, ...], shape_doc: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(shape)}, got {tuple(t.shape)}")
    return t.long()


def same_dtype(**named: torch.Tensor) -> None:
    items = list(named.items())
    (n0, t0) = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {n0} has dtype {t0.dtype}; they must match")


def same_device(**named: torch.Tensor) -> None:
    items = list(named.items())
    (n0, t0) = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; all inputs must be on one device")


def dim_match(what: str, **sizes: int) -> None:
    vals = list(sizes.items())
    if len({v for _, v in vals}) > 1:
        desc = ", ".join(f"{k}={v}" for k, v in vals)
        raise ValueError(f"mismatched {what}: {desc}")


def nonempty(**sizes: int) -> None:
    for name, v in sizes.items():
        if v == 0:
            raise ValueError(f"empty input: {name} is 0; every dimension must be at least 1")


def query_pair(query, name: str, other, rows: str) -> None:
    """``query [B, Q, D]`` against ``<name> [B, <rows>, D]`` (support set, prototypes): both
    floating, one dtype, one device, the same B and D, no empty dimension."""
    float_tensor("query", query, 3, "[B, Q, D]")
    float_tensor(name, other, 3, f"[B, {rows}, D]")
    same_dtype(query=query, **{name: other})
    same_device(query=query, **{name: other})
    dim_match("episode count B", query_B=query.shape[0], **{f"{name}_B": other.shape[0]})
    dim_match("feature size D", query_D=query.shape[2], **{f"{name}_D": other.shape[2]})
    nonempty(B=query.shape[0], Q=query.shape[1], **{rows: other.shape[1]}, D=query.shape[2])


def int_at_least(name: str, v, lo: int, what: str) -> int:
    """An ``int`` (``bool`` is not one) ``>= lo``; ``what`` describes it in the TypeError."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be {what}, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def n_way_value(n_way) -> int:
    return int_at_least("n_way", n_way, 1, "a positive int")


def labels_in_range(name: str, labels: torch.Tensor, n: int, what: str) -> None:
    if _compiling() or labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {n - 1}] ({what} = {n}), found label {bad}")


def every_class_present(labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Per-episode counts [B, n_way]; raises if a class of some episode has no example."""
    counts = torch.zeros(labels.shape[0], n_way, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    if not _compiling():
        empty = (counts == 0).nonzero()
        if len(empty):
            b, c = (int(x) for x in empty[0])
            raise ValueError(
                f"support_labels: class {c} of episode {b} has no support example "
                f"(each of the n_way={n_way} classes needs at least one); "
                f"{len(empty)} empty (episode, class) pairs in total"
            )
    return counts


def finite(name: str, t: torch.Tensor) -> None:
    if _compiling():
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def metric_code(metric, metrics: dict[str, int]) -> int:
    if not isinstance(metric, str) or metric not in metrics:
        raise ValueError(f"metric must be one of {sorted(metrics)}, got {metric!r}")
    return metrics[metric]


def scalar(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def reduction_value(reduction) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def steps_value(steps, name: str = "steps") -> int:
    """A number of inner gradient steps (MAML learners, inner_loop)."""
    return int_at_least(name, steps, 0, "an int >= 0")


def lr_value(name: str, lr, param: torch.Tensor | None = None, pname: str = "", one_of: str = ""):
    """One learning rate: a finite python number (-> ``float``) or a floating tensor (returned
    as given). ``one_of``: ``lr`` is the single rate of a call that also accepts a container
    (``one_of`` names it), so a tensor must hold one element. ``param``: a tensor ``lr`` must
    broadcast to ``param``'s shape (``[]``, ``[*shape]`` or ``[T, *shape]`` for a ``[T, *shape]``
    parameter named ``params[pname]``). Shapes and dtypes only, no tensor ops: inner_update
    calls this for every tensor of every inner step.
    """
    if isinstance(lr, torch.Tensor):
        if one_of and lr.numel() != 1:
            raise ValueError(
                f"{name} given as one tensor must be a scalar (0-d), got shape {tuple(lr.shape)}; "
                f"pass {one_of} for per-tensor or per-element learning rates"
            )
        if lr.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor (or a float), got dtype {lr.dtype}")
        if param is not None:
            shape, pshape = lr.shape, param.shape
            if len(shape) > len(pshape) or not all(
                a == 1 or a == b for a, b in zip(reversed(shape), reversed(pshape))
            ):
                raise ValueError(
                    f"{name} has shape {tuple(shape)}, which does not broadcast to "
                    f"params[{pname}]'s shape {tuple(pshape)} (expected [] per tensor, "
                    "[*shape] per element shared by the tasks, or [T, *shape] per task)"
                )
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        hint = f"; or pass {one_of}" if one_of else ""
        raise TypeError(
            f"{name} must be a float or a floating tensor, got {type(lr).__name__}{hint}"
        )
    lr = float(lr)
    if not math.isfinite(lr):
        raise ValueError(f"{name} must be finite, got {lr}")
    return lr
