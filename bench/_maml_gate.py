"""The correctness gate of bench/bench_maml.py: before anything is timed, every row's
meta-gradient and meta-loss on a tiny float64 version of each model (``GATE``) against the
naive per-task loop; relative error above 1e-9 fails the row."""

from __future__ import annotations

import copy
import math

import torch

import _common as C
from _maml_impls import availability, flat_grads, make_naive, make_step, run_step
from _maml_workload import GATE, build_model, impls_for, make_batch


def run_gate(device: torch.device, names: list[str], log=print) -> dict:
    """{model: {impl: (status, rel_err, message)}}; status "ok" | "WRONG" | "failed" |
    "skipped". Every row's meta-gradient and meta-loss vs ``naive`` in float64."""
    out: dict = {}
    for model_kind, cfg in GATE.items():
        rows = {}
        base = build_model(cfg).to(device, torch.float64)
        batch = make_batch(cfg, seed=11, dtype=torch.float64, device=device)
        ref_model = copy.deepcopy(base)
        ref_loss = run_step(make_naive(ref_model, cfg), ref_model, batch)
        ref_grad = flat_grads(ref_model)
        rest = [n for n in impls_for(cfg, device) if n in names and n != "naive"]
        for name in ["reference", *rest]:
            why = availability(name, device)
            if why:
                rows[name] = ("skipped", None, why)
                continue
            model = copy.deepcopy(base)
            try:
                step = make_step(name, model, cfg, batch)
                loss = run_step(step, model, batch)
                grad = flat_grads(model)
                # the l2l/higher rows accumulate per task: compare after the step, then once more
                # to be sure a second call gives the same (no state left behind)
                loss2 = run_step(step, model, batch)
                grad2 = flat_grads(model)
            except Exception as exc:  # noqa: BLE001
                rows[name] = ("failed", None, C._first_line(exc))
                continue
            errs = [C._rel_err(grad, ref_grad), C._rel_err(grad2, ref_grad),
                    C._rel_err(loss.reshape(1), ref_loss.reshape(1)),
                    C._rel_err(loss2.reshape(1), ref_loss.reshape(1))]
            err = math.nan if any(math.isnan(e) for e in errs) else max(errs)
            status = "ok" if err <= 1e-9 else "WRONG"
            rows[name] = (status, err, "" if status == "ok" else
                          f"meta-gradient rel err {err:.3g} vs naive in float64 > 1e-9")
            log(f"gate {model_kind:5s} {name:22s} {status:6s} rel err {err:.2e}")
        out[model_kind] = rows
    return out
