"""The two activation layouts of the task-batched layers (:mod:`fastmeta.nn.task`) and the
checks every layer shares. Public so that the model-level transforms (``fastmeta.func``) that
drive task layers directly use the same layout rules, not copies.

* ``TN``: ``[T, N, *per_sample]`` (what users pass and get back);
* ``NT``: ``[N, T*C, *spatial]`` for per-sample ``[C, *spatial]`` (task-major channels), the
  layout of a run of conv / BN / activation / pool layers, converted only at its ends.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["CHANNELS_LAST_MIN_PIXELS", "NT", "TN", "batched", "check_task_input", "own_params",
           "to_nt", "to_tn"]

# Internal layouts of the activations flowing between task layers.
# Grouped convs on maps of at least this many pixels run channels_last (NHWC): oneDNN's
# convolution and PyTorch's max_pool2d / batch-norm kernels are vectorised over channels there
# (Conv4 second-order meta-step about 20% faster on a 1-thread CPU; max_pool2d alone ~5x).
# Smaller maps (7x7, 3x3) were measured slightly faster NCHW.
CHANNELS_LAST_MIN_PIXELS = 196
TN = 0  # [T, N, *per_sample]
NT = 1  # [N, T*C, *spatial] for per-sample [C, *spatial] (task-major channels)


def to_tn(h: torch.Tensor, layout: int, T: int) -> torch.Tensor:
    """``h`` (in ``layout``) as ``[T, N, ...]``: a view."""
    if layout == TN:
        return h
    # [N, T*C, *sp] -> [N, T, C, *sp] -> [T, N, C, *sp]: a view, no copy.
    return h.unflatten(1, (T, h.shape[1] // T)).transpose(0, 1)


def to_nt(h: torch.Tensor, layout: int, T: int) -> torch.Tensor:
    """``h`` (in ``layout``) as ``[N, T*C, ...]``: one copy from ``TN``."""
    if layout == NT:
        return h
    # [T, N, C, *sp] -> [N, T*C, *sp]: one copy at the entry of a conv/BN run.
    return h.transpose(0, 1).flatten(1, 2)


def check_task_input(x, params) -> int:
    """T of ``x [T, N, *in]``; TypeError/ValueError naming the bad argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [T, N, *in], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [T, N, *in] (at least 2 dims), got {tuple(x.shape)}")
    if params is not None and type(params) is not dict and not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> [T, *shape] tensor or None, got {type(params).__name__}")
    return x.shape[0]


def own_params(mod: nn.Module, params, T: int, prefix: str) -> dict:
    """name -> (tensor, batched) for this module's direct parameters, with validation."""
    if params is None:
        return {n: (p, False) for n, p in mod._parameters.items() if p is not None}
    out = {}
    used = 0
    for n, p in mod._parameters.items():
        if p is None:
            continue
        v = params.get(n)
        if v is None:
            if p.requires_grad:
                raise ValueError(
                    f"params is missing '{prefix}{n}': expected a tensor of shape [T, *{tuple(p.shape)}] = "
                    f"{(T, *p.shape)} (T={T} from x.shape[0])"
                )
            out[n] = (p, False)
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"params['{prefix}{n}'] must be a torch.Tensor, got {type(v).__name__}")
        vs = v.shape
        if len(vs) != p.dim() + 1 or vs[0] != T or vs[1:] != p.shape:
            raise ValueError(
                f"params['{prefix}{n}'] has shape {tuple(v.shape)}, expected [T, *{tuple(p.shape)}] = "
                f"{(T, *p.shape)} (T={T} from x.shape[0])"
            )
        out[n] = (v, True)
        used += 1
    if used != len(params):
        extra = sorted(k for k in params if k not in out)
        known = [f"{prefix}{n}" for n, p in mod._parameters.items() if p is not None]
        raise ValueError(
            f"params has unexpected key(s) {[prefix + k for k in extra]}; this module's parameters are {known}"
        )
    return out


def batched(v, is_batched: bool, T: int) -> torch.Tensor:
    """``v [T, *shape]`` as it is, or a shared ``v [*shape]`` expanded to T tasks (a view)."""
    return v if is_batched else v.expand(T, *v.shape)
