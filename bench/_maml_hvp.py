"""The batched-HVP line of bench/bench_maml.py: ``fastmeta.func.task_hvp`` (automatic backend)
against its double-backward reference on a TaskMLP 1-40-40-1 at the sinusoid-k5 meta-batch,
in this process (:func:`_common.time_fn`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import _common as C
from _maml_workload import CONFIGS, make_batch
from fastmeta.func import task_function
from fastmeta.nn import TaskMLP
from fastmeta.func import task_hvp


def bench_hvp(device: torch.device, reps: int) -> dict:
    """``dict(status="ok", backend, fastmeta_ms, reference_ms, err, T)`` (medians, relative
    error of the HVP vs the reference) or ``dict(status="failed", message)``."""
    try:
        torch.manual_seed(0)
        model = TaskMLP([1, 40, 40, 1]).to(device)
        fn = task_function(model)
        cfg = dict(CONFIGS["sinusoid-k5"])
        sx, sy, _qx, _qy = make_batch(cfg, 3, torch.float32, device)
        T = cfg["T"]
        params = {n: p.detach().clone() for n, p in fn.expand(T).items()}
        g = torch.Generator().manual_seed(5)
        v = {n: torch.randn(p.shape, generator=g).to(device) for n, p in params.items()}
        fast = task_hvp(fn, params, sx, sy, v, loss_fn=F.mse_loss)
        ref = task_hvp(fn, params, sx, sy, v, loss_fn=F.mse_loss, backend="reference")
        err = max(C._rel_err(fast[n], ref[n]) for n in ref)
        backend = "auto"
        t_fast = C.time_fn(lambda: task_hvp(fn, params, sx, sy, v, loss_fn=F.mse_loss),
                           device=device, budget_s=0.5, min_reps=reps)
        t_ref = C.time_fn(lambda: task_hvp(fn, params, sx, sy, v, loss_fn=F.mse_loss,
                                           backend="reference"),
                          device=device, budget_s=0.5, min_reps=reps)
        return dict(status="ok", backend=backend, fastmeta_ms=t_fast["median_ms"],
                    reference_ms=t_ref["median_ms"], err=err, T=T)
    except Exception as exc:  # noqa: BLE001
        return dict(status="failed", message=C._first_line(exc))
