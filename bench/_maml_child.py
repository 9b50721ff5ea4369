"""One (row, config) of bench/bench_maml.py in a fresh process, so that its peak memory is its
own: :func:`run_child` starts ``python bench/_maml_child.py SPEC`` and reads back the JSON
line the child prints after ``CHILD_MARK``; :func:`child_main` is what the child does.

In the child: imports, model and data; the same row on a width-2 one-task copy of the model
(lazy initialisation at negligible memory); the peak-RSS mark reset to the current RSS
(:func:`_common.reset_peak_rss`); one full meta-step (``cold_ms``, ``rss_peak_mb`` = peak RSS
- RSS before; on CUDA also ``cuda_peak_mb``); then ``reps`` timed meta-steps on both clocks
(:func:`_common.time_calls`). Its meta-gradient is saved to ``spec["grads_path"]``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import _common as C
from _maml_impls import flat_grads, make_step, run_step
from _maml_workload import build_model, make_batch

CHILD_MARK = "@@BENCH_MAML_CHILD@@"


def child_main(spec: dict) -> dict:
    """Measure ``spec["impl"]`` on ``spec["cfg"]`` in this process (see the module docstring).
    ``spec``: cfg, impl, device, dtype, seed, threads, reps, grads_path, and optionally
    inputs_dtype (draw the inputs at this dtype, then cast: the float64 reference's inputs)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = C.parse_dtype(spec["dtype"])
    cfg, name = spec["cfg"], spec["impl"]
    # built (and the inputs drawn) in float32: a float64 run sees the same values
    model = build_model(cfg).to(device, dtype)
    in_dtype = C.parse_dtype(spec.get("inputs_dtype") or spec["dtype"])
    batch = make_batch(cfg, seed=spec["seed"], dtype=in_dtype, device=device)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
    is_cuda = device.type == "cuda"
    if name != "fastmeta+cudagraph":
        # The same row on a tiny copy of the model (width 2, one task): lazy initialisation
        # (autograd engine, functorch, oneDNN, fastmeta's caches) happens here, at negligible
        # memory, so it stays out of the peak. Not a step on the real batch: its freed memory
        # would stay in the allocator's free lists and hide the real step's growth.
        tiny = dict(cfg, T=1, hidden=2)
        if cfg["model"] == "conv4":
            tiny.update(query=1, chunk=1)
        tiny_model = build_model(tiny).to(device, dtype)
        run_step(make_step(name, tiny_model, tiny, ()), tiny_model,
                 make_batch(tiny, seed=2, dtype=dtype, device=device))
        del tiny_model
    step = make_step(name, model, cfg, batch)
    C.synchronize(device)
    gc.collect()
    rss0 = C.reset_peak_rss()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        alloc0 = torch.cuda.memory_allocated(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = run_step(step, model, batch)
    C.synchronize(device)
    cold_ms = (time.perf_counter() - t0) * 1e3
    cold_cpu_ms = (time.process_time() - c0) * 1e3
    rss1 = C.peak_rss_bytes()
    cuda_peak = (torch.cuda.max_memory_allocated(device) - alloc0) if is_cuda else None
    grads = flat_grads(model)
    if spec.get("grads_path"):
        torch.save(grads, spec["grads_path"])
    timed = C.time_calls(lambda: run_step(step, model, batch), device=device, reps=spec["reps"],
                         flush_l2=False, cpu_clock=True)
    return dict(status="ok", cold_ms=cold_ms, times_ms=timed["times_ms"], cold_cpu_ms=cold_cpu_ms,
                cpu_times_ms=timed["cpu_times_ms"], rss_base_mb=rss0 / 2**20,
                rss_peak_mb=(rss1 - rss0) / 2**20, rss_max_mb=rss1 / 2**20,
                cuda_peak_mb=(cuda_peak / 2**20 if cuda_peak is not None else None),
                loss=float(loss), threads=torch.get_num_threads())


def run_child(spec: dict, timeout: float) -> dict:
    """:func:`child_main` of ``spec`` in a fresh process (``OMP_NUM_THREADS`` = its threads);
    a crash, a timeout or no result line comes back as ``dict(status="failed", message)``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="failed", message=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    why = tail[-1][:240] if tail else "no output"
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode} (out of memory?); {why}"
    return dict(status="failed", message=f"rc {proc.returncode}: {why}")



def _main(argv: list[str]) -> int:
    try:
        res = child_main(json.loads(argv[0]))
    except Exception as exc:  # noqa: BLE001
        res = dict(status="failed", message=C._first_line(exc))
    print(CHILD_MARK + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
