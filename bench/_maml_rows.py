"""The results of bench/bench_maml.py: one :class:`Row` per (config, implementation), the
per-config table (:func:`print_table`, via :func:`_common.format_table`) and the JSON lines
appended to ``bench/results/maml-<device>.jsonl`` (:func:`save_rows`, via
:func:`_common.append_jsonl`: every line carries the run's ``env_info``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import _common as C
from _maml_workload import impl_label

STEM = "maml"


@dataclasses.dataclass
class Row:
    """One implementation on one config: ``status`` "ok" | "WRONG" | "failed" | "skipped"
    (``message`` says why), the medians of the timed meta-steps on ``clock``, the cold step,
    its peak memory (RSS growth, or CUDA's allocator on a GPU), and the speedups over the peer
    rows (:func:`_common.fill_group_speedups`)."""

    config: str
    cfg: dict
    impl: str
    baseline: bool
    status: str
    message: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    n: int = 0
    cold_ms: float | None = None
    rss_peak_mb: float | None = None
    rss_base_mb: float | None = None
    cuda_peak_mb: float | None = None
    err_f64: float | None = None  # float32 meta-gradient vs the float64 reference
    gate_err: float | None = None
    load_before: float | None = None
    load_after: float | None = None
    speedups: dict = dataclasses.field(default_factory=dict)
    wrong: bool = False  # a peer that failed the correctness gate, timed anyway
    clock: str = "wall"  # what median/p20/p80/cold measure: "wall" (perf_counter/CUDA events)
    # or "cpu" (process CPU time: with 1 thread, immune to other processes on a shared CPU)
    other_median_ms: float | None = None  # the median on the other clock

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median_ms is not None

    @property
    def label(self) -> str:
        return impl_label(self.impl, self.cfg) + (" [WRONG grads]" if self.wrong else "")

    @property
    def peak_mb(self) -> float | None:
        return self.cuda_peak_mb if self.cuda_peak_mb is not None else self.rss_peak_mb


def print_table(config: str, rows: list[Row], device: torch.device, threads: int) -> str:
    """Print the table of one config (a title with the shapes, threads, clock and load, then a
    line per row and a note per row that did not run or carries a message); returns it."""
    cfg = rows[0].cfg
    shape = " ".join(f"{k}={v}" for k, v in cfg.items())
    bases = [r.impl for r in rows if r.baseline and r.ok]
    mem = "peak MB (cuda)" if device.type == "cuda" else "peak RSS MB"
    clock = rows[0].clock
    other = "wall ms" if clock == "cpu" else "cpu ms"
    header = ["impl", f"{clock} ms", "p20", "p80", *[f"x {b}" for b in bases], mem, "cold ms",
              other, "err vs f64", "n"]
    body, notes = [], []
    for r in rows:
        if r.ok:
            body.append([r.label, C._fmt_ms(r.median_ms), C._fmt_ms(r.p20_ms), C._fmt_ms(r.p80_ms),
                         *[C._fmt(r.speedups.get(b), ".2f") for b in bases],
                         C._fmt(r.peak_mb, ".1f"), C._fmt_ms(r.cold_ms),
                         C._fmt_ms(r.other_median_ms),
                         C._fmt(r.err_f64, ".1e"), str(r.n)])
            if r.message:
                notes.append(f"  {r.label}: {r.message}")
        else:
            body.append([r.label, r.status.upper(), *[""] * (len(header) - 2)])
            notes.append(f"  {r.label}: {r.status}: {r.message}")
    loads = [x for r in rows for x in (r.load_before, r.load_after) if x is not None]
    load = f"load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    out = [f"\n== maml meta-step | {config}: {shape} | {device.type} {threads} threads | "
           f"{clock} time | {load} ==",
           *C.format_table(header, body), *notes]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def save_rows(rows: list[Row], targets: Sequence[Any], hvp: dict | None, device: torch.device,
              results_dir, extra: dict) -> Path:
    """Append a line per row (``kind`` "meta-step"), one for the HVP result (``kind`` "hvp")
    and one per target (``kind`` "target": ``name``, ``status``, ``detail``); returns the
    path."""
    records = [dict(kind="meta-step", config=r.config, params=r.cfg, impl=r.label,
                    baseline=r.baseline, status=r.status, message=r.message,
                    median_ms=r.median_ms, p20_ms=r.p20_ms, p80_ms=r.p80_ms, n=r.n,
                    cold_ms=r.cold_ms, clock=r.clock, other_clock_median_ms=r.other_median_ms,
                    rss_peak_mb=r.rss_peak_mb, rss_base_mb=r.rss_base_mb,
                    cuda_peak_mb=r.cuda_peak_mb, err_vs_f64=r.err_f64, gate_err_f64=r.gate_err,
                    load_before=r.load_before, load_after=r.load_after, speedup_vs=r.speedups)
               for r in rows]
    if hvp is not None:
        records.append(dict(kind="hvp", **hvp))
    records += [dict(kind="target", target=t.name, status=t.status, detail=t.detail)
                for t in targets]
    return C.append_jsonl(records, STEM, device, results_dir=results_dir, extra=extra)
