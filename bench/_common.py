"""Shared benchmark machinery for every ``bench/bench_<op>.py`` (see DESIGN.md, "Conventions").

A benchmark script describes *cases* (a shape, a dtype, a device, a way to draw inputs, a
float64 oracle and the least bytes/FLOPs the op must move/do) and *implementations* (the
fastmeta op per backend, the patterns research code uses, ``torch.compile`` of those), then
calls :func:`run_case` for each case and hands the results to :func:`print_table` and
:func:`save_rows`. Everything here is op-agnostic.

Method (after .library/device/METHOD.md):

* **Correct first.** Before an implementation is timed, its outputs and its gradients
  (w.r.t. ``case.grad_argnums``, against one fixed random cotangent) are compared with a float64
  oracle on freshly drawn inputs: ``err = ||out - ref|| / ||ref||`` per tensor, the row's error
  is the largest. NaN/Inf or ``err > case.tol`` marks the row ``WRONG`` and it is not timed.
* **Passes.** ``fwd`` is the forward of a training step: inputs require grad, the autograd
  graph is recorded (so saved activations count towards memory) and then dropped.
  ``fwd+bwd`` is that forward plus ``torch.autograd.grad`` of the first output w.r.t. the
  inputs in ``grad_argnums`` (fresh gradient tensors each call, no ``.grad`` accumulation),
  with one fixed cotangent: random for a tensor output, 1 for a scalar loss (1024 at fp16, as
  loss scaling does, to keep gradients out of fp16's subnormal range).
* **Timing** (:func:`time_fn`). CUDA: one ``torch.cuda.Event`` pair per repetition, the
  events read after one final synchronize; before every repetition (outside the event pair)
  a buffer twice the L2 size is zeroed so each repetition starts with a cold L2. CPU:
  ``time.perf_counter`` around each call. Both: garbage collection off while timing, warm-up
  calls first (their count and the repetition count adapt to a time budget, so a 12 s
  baseline gets ``min_reps`` repetitions and a 50 us kernel hundreds), median and the
  20th/80th percentiles of the per-call times.
* **Peak memory** (:func:`peak_memory_bytes`): the largest amount of memory live *during*
  one call beyond what was live before it (inputs excluded; outputs, saved activations and
  temporaries included). CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before the call. CPU: torch's
  profiler with ``profile_memory=True`` records every allocation and free of the c10 CPU
  allocator; the peak of their running sum is the number. That profiler only sees
  allocations made on the calling thread, so the measured call runs with
  ``torch.set_num_threads(1)`` (``at::parallel_for`` then runs inline on the calling thread,
  and a C++ kernel's ``at::empty`` workspaces are counted too; per-thread workspaces are then
  counted once, not once per thread). Not counted on CPU: memory that bypasses the c10
  allocator (``malloc``/``std::vector`` inside a kernel, MKL/oneDNN scratch). Both rules
  apply identically to fastmeta and to every baseline.
* **Bandwidth/FLOP rate**: ``GB/s = case.min_bytes[pass] / median`` (each input read once,
  each output written once, i.e. the bytes any implementation must move), likewise
  ``GFLOP/s`` from ``case.flops[pass]``. :func:`measure_ceilings` measures the device's copy
  bandwidth and matmul rate in the same run, for "within N x of the floor" lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

PASSES = ("fwd", "fwd+bwd")

# Sanity bars for ||out - ref|| / ||ref|| against the float64 oracle (METHOD.md: fp32 lands
# far under 1e-3, tf32 near 3e-4, bf16 operands 1e-3..1e-2). The tests enforce the strict
# "<= 2x PyTorch's own error" rule; these only keep a broken kernel out of the timing table.
DEFAULT_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
               "half": "float16", "float": "float32", "double": "float64"}
    dt = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, float16, bfloat16 or float64")
    return dt


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Impl:
    """One implementation of the op under test.

    ``fn(*inputs)`` returns a tensor or a tuple whose first element is the differentiated
    output; other tensor outputs are compared with the oracle's outputs at the same position.
    ``baseline=True`` makes it a column of "speedup vs" in the table. ``skip`` (a reason)
    reports the row as skipped without running it. ``est_bytes(case)`` (optional) estimates the
    call's peak memory so a case that would not fit in free memory is skipped, not run.
    """

    name: str
    fn: Callable[..., Any]
    baseline: bool = False
    skip: str | None = None
    est_bytes: Callable[["Case"], int] | None = None
    note: str = ""


@dataclasses.dataclass
class Case:
    """One shape x dtype x device to run every implementation on.

    ``make_inputs(seed)`` returns the input tuple on ``device`` at ``dtype`` (inputs in
    ``grad_argnums`` are made to require grad by the harness). ``reference(*inputs)`` is the
    oracle, called on float64 copies; ``min_bytes``/``flops`` map a pass to the least bytes
    moved / FLOPs done by any implementation.
    """

    op: str
    name: str
    params: dict
    dtype: torch.dtype
    device: torch.device
    make_inputs: Callable[[int], tuple]
    reference: Callable[..., Any]
    grad_argnums: tuple[int, ...]
    min_bytes: dict[str, int]
    flops: dict[str, int] = dataclasses.field(default_factory=dict)
    tol: float | None = None
    # how many leading outputs the correctness check and the fwd+bwd pass differentiate (one
    # cotangent each): 1 for a loss or a single tensor, all of them for a multi-tensor op
    grad_outputs: int = 1

    @property
    def label(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.op} | {self.name} {shape} | {dtype_name(self.dtype)}"

    def tolerance(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL.get(self.dtype, 1e-3)


@dataclasses.dataclass
class Result:
    case: Case
    pass_name: str
    impl: str
    baseline: bool
    status: str  # "ok" | "WRONG" | "failed" | "skipped"
    message: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    n: int = 0
    peak_bytes: int | None = None
    err: float | None = None
    speedups: dict[str, float | None] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median_ms is not None

    @property
    def gbps(self) -> float | None:
        b = self.case.min_bytes.get(self.pass_name)
        return b / (self.median_ms * 1e-3) / 1e9 if (self.ok and b) else None

    @property
    def gflops(self) -> float | None:
        f = self.case.flops.get(self.pass_name)
        return f / (self.median_ms * 1e-3) / 1e9 if (self.ok and f) else None


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

# name -> (type, help, what the default is when the script gives none)
COMMON_ARGS = {
    "device": (str, "cuda or cpu", "cuda when available, else cpu"),
    "threads": (int, "torch.set_num_threads for the run (1: steadier on a busy machine)", "torch's"),
    "budget": (float, "seconds of timed calls per row", "set by the script per device and --quick"),
    "results-dir": (str, "where the JSON rows go", "bench/results/"),
    "no-save": (None, "print the tables only, save no rows", ""),
    "batch": (int, "episodes per step", ""),
    "ways": (int, "classes per episode", ""),
    "shots": (int, "support examples per class", ""),
    "queries": (int, "query examples per class", ""),
}


def add_common_args(ap: argparse.ArgumentParser, *names: str, **defaults) -> argparse.ArgumentParser:
    """Add the options bench scripts share, each by name (the keys of :data:`COMMON_ARGS`:
    ``device``, ``threads``, ``budget``, ``results-dir``, ``no-save`` and the episode shape
    ``batch``, ``ways``, ``shots``, ``queries``), with this script's defaults as keywords
    (``ways=20``; ``results_dir`` for ``results-dir``). :func:`parse_args` applies ``--threads``
    and resolves ``--device``."""
    unknown = [n for n in names if n not in COMMON_ARGS]
    if unknown:
        raise ValueError(f"unknown common options {unknown}; choose from {list(COMMON_ARGS)}")
    for name in names:
        kind, text, fallback = COMMON_ARGS[name]
        if kind is None:
            ap.add_argument(f"--{name}", action="store_true", help=text)
            continue
        default = defaults.get(name.replace("-", "_"))
        shown = default if default is not None else fallback
        ap.add_argument(f"--{name}", type=kind, default=default,
                        help=f"{text} (default: {shown})" if shown != "" else text)
    return ap


def comma_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (None or "" -> ``[]``)."""
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def timed_backends(backends_for: Callable, op: str, device: torch.device, dtype: torch.dtype,
                   only: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The fastmeta backends of ``op`` a benchmark times (``backends_for`` is
    ``fastmeta.ops.backends_for``): every one that serves ``device``/``dtype`` but
    ``reference``, and Triton on a CPU (the interpreter) only when ``only`` names it; ``only``
    (``--backends``) narrows the list. Returns ``(names, {left-out backend: why})``."""
    names = [b for b in backends_for(op, device, dtype) if b != "reference"]
    left_out = {}
    if device.type == "cpu" and "triton" in names and not (only and "triton" in only):
        names.remove("triton")
        left_out["triton"] = "Triton on the CPU is the interpreter (~1000x slower)"
    if only:
        left_out.update({b: "not in --backends" for b in names if b not in only})
        names = [b for b in names if b in only]
    return names, left_out


def print_banner(title: str, device: torch.device) -> dict:
    """Print ``<title> on <device> | torch | triton | git sha | load`` (and, on a busy CPU,
    :func:`busy_warning`); returns :func:`env_info`."""
    info = env_info(device)
    dirty = "+dirty" if info["git_dirty"] else ""
    print(f"{title} on {info['device']} | torch {info['torch']} | triton {info['triton']} | "
          f"git {info['git_sha'][:12]}{dirty} | load {info['loadavg_1m']} on {info['cpu_count']} CPUs",
          flush=True)
    warning = busy_warning()
    if warning and device.type == "cpu":
        print(warning, flush=True)
    return info


def parse_args(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``ap.parse_args(argv)`` with the common options applied: ``--threads`` (at least 1) set
    with ``torch.set_num_threads``, ``--device`` resolved to a ``torch.device``."""
    args = ap.parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            ap.error(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if "device" in vars(args):
        args.device = resolve_device(args.device)
    return args


# ---------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        base = f"cuda-{torch.cuda.get_device_name(device)}"
    else:
        base = f"cpu-{cpu_model()}-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def mem_available_bytes(device: torch.device) -> int | None:
    """Free memory the next allocations can use (CUDA: mem_get_info; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_sha() -> tuple[str, bool | None]:
    env = os.environ.get("FASTMETA_GIT_SHA")
    if env:
        return env, None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown", None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def busy_warning() -> str:
    """A warning when other processes compete for the CPU (CPU timings are then unreliable:
    an OpenMP team with a descheduled thread can run 10-100x slower)."""
    load, ncpu = _loadavg(), os.cpu_count() or 1
    if load is not None and load > 0.5 * ncpu:
        return (f"WARNING: 1-min load average {load} on {ncpu} CPUs before starting: other "
                f"processes compete for the CPU, CPU timings will be noisy (compare p20/p80; "
                f"--threads 1 is steadier)")
    return ""


def _tf32_matmul() -> bool:
    try:
        from fastmeta.kernels._common import tf32_allowed
    except Exception:  # noqa: BLE001 - no triton: ask torch's legacy flag
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return tf32_allowed()


def env_info(device: torch.device) -> dict:
    """Device name, versions and git sha, as stored with every result row.

    ``FASTMETA_GIT_SHA`` overrides the sha (a copy of the tree without ``.git``, e.g. on a
    lent GPU machine, would otherwise say "unknown").
    """
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        triton_version = "none"
    sha, dirty = _git_sha()
    info = dict(
        device=device_name(device),
        device_type=device.type,
        device_slug=device_slug(device),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        git_sha=sha,
        git_dirty=dirty,
        host=platform.node(),
        loadavg_1m=_loadavg(),
        cpu_count=os.cpu_count(),
        # TF32 on/off for fp32 matmuls (cuBLAS and fastmeta's Triton dots follow it) and for
        # cuDNN convolutions (on by default in torch)
        tf32_matmul=_tf32_matmul(),
        tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count,
                    l2_bytes=getattr(props, "L2_cache_size", None),
                    capability=f"{props.major}.{props.minor}")
    return info


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

_L2_FLUSH: dict[int, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _L2_FLUSH:
        props = torch.cuda.get_device_properties(idx)
        l2 = getattr(props, "L2_cache_size", 0) or (64 << 20)
        _L2_FLUSH[idx] = torch.empty(2 * l2, dtype=torch.int8, device=torch.device("cuda", idx))
    return _L2_FLUSH[idx]


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default method)."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize_ms(times_ms: Sequence[float]) -> dict:
    xs = sorted(times_ms)
    return dict(median_ms=statistics.median(xs), p20_ms=_quantile(xs, 0.2),
                p80_ms=_quantile(xs, 0.8), n=len(xs))


def _one_call_ms(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device | str,
    warmup: int | None = None,
    reps: int | None = None,
    budget_s: float = 1.0,
    min_reps: int = 3,
    max_reps: int = 500,
    flush_l2: bool = True,
) -> dict:
    """Time ``fn()``; returns ``dict(median_ms, p20_ms, p80_ms, n)``.

    ``warmup``/``reps`` None: adaptive. Warm-up runs until it has taken about a tenth of
    ``budget_s`` (at least one call, at most 25) and gives a per-call estimate; then
    ``reps = clamp(budget_s / estimate, min_reps, max_reps)``. A fixed ``warmup``/``reps``
    is used as given (``reps`` still at least 1).
    """
    device = torch.device(device)
    # warm-up (run-time compilation, allocator growth, handle creation stay out of the numbers)
    est = []
    n_warm = 0
    t_start = time.perf_counter()
    while True:
        est.append(_one_call_ms(fn, device))
        n_warm += 1
        if warmup is not None:
            if n_warm >= warmup:
                break
        elif n_warm >= 25 or (time.perf_counter() - t_start) >= 0.1 * budget_s:
            break
    per_call_s = max(min(est[-3:]) * 1e-3, 1e-7)
    if reps is None:
        reps = int(max(min_reps, min(max_reps, budget_s / per_call_s)))
    reps = max(1, reps)
    return summarize_ms(time_calls(fn, device=device, reps=reps, flush_l2=flush_l2)["times_ms"])


def time_calls(
    fn: Callable[[], Any],
    *,
    device: torch.device | str,
    reps: int,
    flush_l2: bool = True,
    cpu_clock: bool = False,
) -> dict:
    """The timed part of :func:`time_fn`: ``reps`` calls of ``fn()`` (no warm-up), garbage
    collection off. Returns ``dict(times_ms=[...], cpu_times_ms=[...])``, one entry per call.

    ``times_ms``: CUDA events around each call (a cold L2 before each with ``flush_l2``), or
    ``time.perf_counter`` on a CPU. ``cpu_times_ms``: with ``cpu_clock`` on a CPU device,
    ``time.process_time`` around each call (the process's CPU time: with one thread, immune
    to other processes on a shared machine); otherwise empty. ``reps`` 0: both empty.
    """
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    flush = _l2_flush_buffer(device) if (is_cuda and flush_l2) else None
    times: list[float] = []
    cpu_times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        if is_cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            torch.cuda.synchronize(device)
            for i in range(reps):
                if flush is not None:
                    flush.zero_()
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        elif cpu_clock:
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                cpu_times.append((time.process_time() - c0) * 1e3)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return dict(times_ms=times, cpu_times_ms=cpu_times)


# ---------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device | str) -> int | None:
    """Peak extra bytes live during one ``fn()`` call (see the module docstring); None if the
    measurement is not possible here."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    if device.type != "cpu":
        return None
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        events = prof.profiler.kineto_results.events()  # raw events: the aggregated
        # FunctionEvent view drops [memory] events that fall inside ops
    except Exception:  # noqa: BLE001 - a profiler API change must not kill the benchmark
        return None
    finally:
        torch.set_num_threads(threads)
    mem = [(e.start_ns(), e.nbytes()) for e in events
           if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    mem.sort(key=lambda x: x[0])
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return int(peak)


_PROFILER_WARMED = False


def warm_profiler() -> None:
    """The first profiler session costs ~1 s of set-up; pay it once, outside any case."""
    global _PROFILER_WARMED
    if not _PROFILER_WARMED:
        _cpu_peak_bytes(lambda: torch.empty(1))
        _PROFILER_WARMED = True


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark of this process to its current RSS
    (``/proc/self/clear_refs``, Linux >= 4.0) and return the current RSS in bytes. Where that
    is not possible, return the peak so far (``ru_maxrss``): growth measured with
    :func:`peak_rss_bytes` is then counted above everything before it.

    For the whole-process view (what ``top`` shows; includes memory outside the c10 allocator)
    of one step, best in a fresh process: ``base = reset_peak_rss(); step();
    peak_rss_bytes() - base``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _status_kb("VmRSS")
        if rss is not None:
            return rss * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def peak_rss_bytes() -> int:
    """The kernel's peak-RSS mark of this process (``VmHWM``, else ``ru_maxrss``), in bytes."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# ceilings (METHOD.md "two numbers first")
# ---------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and matmul rate at ``dtype``.

    CUDA: a 1 GiB device-to-device copy and an 8192^3 matmul (random data, not zeros); CPU:
    a 256 MiB copy and a 2048^3 matmul. Median of several timed runs after a warm-up.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, budget_s=0.5, min_reps=5, max_reps=50,
                flush_l2=False)
    copy_gbps = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9
    del src, dst
    n = 8192 if cuda else 2048
    mm_dtype = dtype if (cuda or dtype in (torch.float32, torch.float64)) else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    t = time_fn(lambda: a @ b, device=device, budget_s=0.5 if cuda else 1.0, min_reps=3,
                max_reps=50, flush_l2=False)
    gflops = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e9
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return dict(copy_GBps=copy_gbps, matmul_GFLOPs=gflops, matmul_dtype=dtype_name(mm_dtype),
                matmul_n=n, copy_bytes=nbytes)


def floor_report(
    results: Sequence[Result], ceilings: dict, impl_prefix: str = "fastmeta"
) -> list[str]:
    """Lines "best <impl_prefix> row is N x the bandwidth floor / M x the compute floor"
    for each (case, pass) of ``results``."""
    lines = []
    for key, rows in _group(results).items():
        case, pass_name = rows[0].case, rows[0].pass_name
        fm = [r for r in rows if r.ok and r.impl.startswith(impl_prefix)]
        nbytes = case.min_bytes.get(pass_name)
        flops = case.flops.get(pass_name)
        if not nbytes:
            continue
        t_bw = nbytes / (ceilings["copy_GBps"] * 1e9) * 1e3
        t_fl = flops / (ceilings["matmul_GFLOPs"] * 1e9) * 1e3 if flops else 0.0
        floor = max(t_bw, t_fl)
        bound = "compute" if t_fl > t_bw else "memory"
        head = (f"{case.label} | {pass_name}: floor {floor:.4g} ms ({bound}-bound; "
                f"{nbytes / 1e6:.3g} MB at {ceilings['copy_GBps']:.0f} GB/s = {t_bw:.4g} ms, "
                f"{(flops or 0) / 1e9:.3g} GFLOP at {ceilings['matmul_GFLOPs']:.0f} GFLOP/s of "
                f"{ceilings.get('matmul_dtype', '')} torch.matmul = {t_fl:.4g} ms)")
        if fm:
            best = min(fm, key=lambda r: r.median_ms)
            head += (f"\n    {best.impl} {best.median_ms:.4g} ms: within "
                     f"{best.median_ms / t_bw:.1f}x of the memory-bandwidth floor, "
                     f"{best.median_ms / max(t_fl, 1e-12):.1f}x of the compute floor")
        lines.append(head)
    return lines


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple | list) else (out,)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        return math.inf
    if not torch.isfinite(out64).all():
        return math.nan
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def _prepare(case: Case, inputs: tuple) -> tuple:
    prepped = []
    for i, x in enumerate(inputs):
        if i in case.grad_argnums:
            x = x.detach().requires_grad_(True)
        prepped.append(x)
    return tuple(prepped)


def _cotangents(ref_outs: Sequence[torch.Tensor], seed: int, dtype: torch.dtype) -> tuple:
    """One float64 cotangent per differentiated output (drawn in order from one generator)."""
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    cots = []
    for out in ref_outs:
        if out.numel() == 1:
            # fp16: scale the loss as fp16 training does, so that gradients of a mean over many
            # elements stay out of fp16's subnormal range (which would swamp the comparison).
            cots.append(torch.full_like(out, 1024.0 if dtype == torch.float16 else 1.0))
        else:
            cots.append(torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device))
    return tuple(cots)


def reference_outputs(case: Case, seed: int) -> tuple[tuple, tuple, tuple]:
    """(inputs at case dtype, float64 reference outputs + gradients, float64 cotangents of the
    first ``case.grad_outputs`` outputs)."""
    inputs = case.make_inputs(seed)
    ref_in = tuple(
        x.detach().to(torch.float64).requires_grad_(i in case.grad_argnums)
        if torch.is_tensor(x) and x.is_floating_point() else x
        for i, x in enumerate(inputs)
    )
    ref_out = _as_tuple(case.reference(*ref_in))
    diff = ref_out[: case.grad_outputs]
    cots = _cotangents(diff, seed, case.dtype)
    grads = torch.autograd.grad(diff, [ref_in[i] for i in case.grad_argnums], cots)
    ref = tuple(o.detach() for o in ref_out if torch.is_tensor(o)) + tuple(grads)
    return inputs, (ref, len(ref_out)), cots


def check_impl(case: Case, impl: Impl, inputs: tuple, ref_pack, cots: tuple) -> tuple[float, str]:
    """Max relative error of ``impl``'s outputs and gradients vs the float64 oracle, and a
    description of the worst tensor."""
    ref, n_out = ref_pack
    ins = _prepare(case, inputs)
    out = _as_tuple(impl.fn(*ins))
    diff = out[: case.grad_outputs]
    grads = torch.autograd.grad(diff, [ins[i] for i in case.grad_argnums],
                                [c.to(o.dtype) for o, c in zip(diff, cots)])
    names = [f"out[{i}]" for i in range(n_out)]
    pairs = []
    for i in range(min(len(out), n_out)):
        if torch.is_tensor(out[i]) and out[i].is_floating_point():
            pairs.append((names[i], out[i], ref[i]))
    for j, g in enumerate(grads):
        pairs.append((f"grad[input {case.grad_argnums[j]}]", g, ref[n_out + j]))
    worst, where = 0.0, ""
    for name, o, r in pairs:
        e = _rel_err(o, r)
        if math.isnan(e) or e > worst:
            worst, where = e, name
            if math.isnan(e):
                break
    return worst, where


# ---------------------------------------------------------------------------------------------
# running a case
# ---------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def make_step(case: Case, impl: Impl, inputs: tuple, pass_name: str, cots: tuple) -> Callable[[], Any]:
    ins = _prepare(case, inputs)
    grad_ins = [ins[i] for i in case.grad_argnums]
    fn = impl.fn
    if pass_name == "fwd":
        return lambda: fn(*ins)
    if pass_name == "fwd+bwd":
        dtype = inputs[case.grad_argnums[0]].dtype if case.grad_argnums else None
        cots_c = [c.to(dtype) for c in cots] if dtype is not None else list(cots)
        n = case.grad_outputs

        def step():
            out = _as_tuple(fn(*ins))
            return torch.autograd.grad(out[:n], grad_ins, cots_c)

        return step
    raise ValueError(f"unknown pass {pass_name!r}; use one of {PASSES}")


def run_case(
    case: Case,
    impls: Sequence[Impl],
    passes: Sequence[str] = PASSES,
    *,
    budget_s: float = 1.0,
    min_reps: int = 3,
    max_reps: int = 500,
    seed: int = 0,
    measure_memory: bool = True,
    log: Callable[[str], None] | None = print,
    deadline: float | None = None,
) -> list[Result]:
    """Check every implementation against the oracle, then time it and measure its peak memory
    for every pass. Never raises for an implementation's failure: the row says what happened.
    ``deadline`` (a ``time.perf_counter()`` value): implementations not started by then are
    reported as skipped."""
    results: list[Result] = []
    say = log or (lambda _msg: None)
    # Correctness uses one draw of inputs, timing another (METHOD.md: fresh inputs per check).
    try:
        chk_inputs, ref_pack, chk_cot = reference_outputs(case, seed=seed + 1000)
    except Exception as exc:  # noqa: BLE001
        for impl in impls:
            for p in passes:
                results.append(Result(case, p, impl.name, impl.baseline, "failed",
                                      f"reference failed: {_first_line(exc)}"))
        return results
    inputs = case.make_inputs(seed)
    free = mem_available_bytes(case.device)
    if measure_memory and case.device.type == "cpu":
        warm_profiler()
    for impl in impls:
        def add(status, msg="", **kw):
            for p in passes:
                results.append(Result(case, p, impl.name, impl.baseline, status, msg, **kw))

        if impl.skip:
            add("skipped", impl.skip)
            continue
        if deadline is not None and time.perf_counter() > deadline:
            add("skipped", "time limit reached")
            continue
        if impl.est_bytes is not None and free is not None:
            need = impl.est_bytes(case)
            if need > 0.7 * free:
                add("skipped", f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
                continue
        say(f"... {case.name} {dtype_name(case.dtype)} {impl.name}: checking")
        try:
            err, where = check_impl(case, impl, chk_inputs, ref_pack, chk_cot)
        except Exception as exc:  # noqa: BLE001
            add("failed", _first_line(exc))
            _free_device(case.device)
            continue
        if math.isnan(err) or err > case.tolerance():
            add("WRONG", f"rel err {err:.3g} in {where} > tol {case.tolerance():.1g}; not timed",
                err=err)
            continue
        cot = chk_cot
        for p in passes:
            try:
                step = make_step(case, impl, inputs, p, cot)
                say(f"... {case.name} {dtype_name(case.dtype)} {impl.name} {p}: timing")
                t = time_fn(step, device=case.device, budget_s=budget_s, min_reps=min_reps,
                            max_reps=max_reps)
                peak = peak_memory_bytes(step, device=case.device) if measure_memory else None
                results.append(Result(case, p, impl.name, impl.baseline, "ok", "",
                                      t["median_ms"], t["p20_ms"], t["p80_ms"], t["n"], peak, err))
            except Exception as exc:  # noqa: BLE001
                results.append(Result(case, p, impl.name, impl.baseline, "failed",
                                      _first_line(exc), err=err))
            finally:
                _free_device(case.device)
    fill_speedups(results)
    return results


def _free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fill_speedups(results: Sequence[Result]) -> None:
    """speedups[b] = median of baseline b / median of the row, within each (case, pass)."""
    for rows in _group(results).values():
        fill_group_speedups(rows)


def fill_group_speedups(rows: Sequence[Any]) -> None:
    """``r.speedups[b]`` = median of baseline row ``b`` / median of ``r``, over rows compared
    with each other (anything with ``impl``, ``baseline``, ``ok``, ``median_ms``, ``speedups``);
    None for a row that did not run."""
    base = {r.impl: r.median_ms for r in rows if r.baseline and r.ok}
    for r in rows:
        r.speedups = {b: (m / r.median_ms if r.ok else None) for b, m in base.items()}


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def _group(results: Sequence[Result]) -> dict[tuple, list[Result]]:
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.case.label, str(r.case.device), r.pass_name), []).append(r)
    return groups


def _fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _fmt_mb(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    mb = nbytes / 2**20
    return f"{mb:.3f}" if mb < 1 else f"{mb:.1f}"


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 1 else f"{x:.3f}" if x < 100 else f"{x:.1f}"


def format_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a text table: the header, a rule, one line per body row; the first column
    left-aligned, the others right-aligned, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *map(line, body)]


def print_table(results: Sequence[Result], baseline_names: Sequence[str] | None = None,
                file=None) -> str:
    """Print one table per (case, pass); returns the text. ``baseline_names``: the speedup
    columns, in this order (default: every baseline present)."""
    out: list[str] = []
    for (_label, dev, pass_name), rows in _group(results).items():
        case = rows[0].case
        present = [r.impl for r in rows if r.baseline]
        names = [b for b in (baseline_names or present) if b in present]
        header = ["impl", "median ms", "p20", "p80", *[f"x {b}" for b in names],
                  "peak MB", "GB/s", "GFLOP/s", "rel err", "n"]
        body = []
        notes = []
        for r in rows:
            if r.ok:
                body.append([
                    r.impl, _fmt_ms(r.median_ms), _fmt_ms(r.p20_ms), _fmt_ms(r.p80_ms),
                    *[_fmt(r.speedups.get(b), ".2f") for b in names],
                    _fmt_mb(r.peak_bytes),
                    _fmt(r.gbps, ".1f"), _fmt(r.gflops, ".1f"), _fmt(r.err, ".1e"), str(r.n),
                ])
            else:
                body.append([r.impl, r.status.upper() if r.status != "WRONG" else "WRONG",
                             *[""] * (len(header) - 2)])
                notes.append(f"  {r.impl}: {r.status}: {r.message}")
        out.append(f"\n== {case.label} | {pass_name} | {dev} ==")
        out.extend(format_table(header, body))
        out.extend(notes)
    text = "\n".join(out)
    print(text, file=file, flush=True)
    return text


def print_summary(results: Sequence[Result], t_start: float, saved_to: Path | None) -> None:
    """The closing lines of an op benchmark: rows, timed, wrong/failed, seconds since ``t_start``
    (a ``time.perf_counter()``), where the rows went; then one line per wrong or failed row."""
    bad = [r for r in results if r.status in ("WRONG", "failed")]
    print(f"\n{len(results)} rows, {sum(r.ok for r in results)} timed, {len(bad)} wrong/failed, "
          f"{time.perf_counter() - t_start:.0f} s" + (f"; rows appended to {saved_to}" if saved_to else ""))
    for r in bad:
        print(f"  {r.status}: {r.case.name} {dtype_name(r.case.dtype)} {r.pass_name} {r.impl}: {r.message}")


def save_rows(results: Sequence[Result], stem: str, *, results_dir: str | Path | None = None,
              extra: dict | None = None) -> Path | None:
    """Append one JSON line per result to ``<results_dir>/<stem>-<device-slug>.jsonl``
    (default ``bench/results/``); returns the path."""
    if not results:
        return None
    records = []
    for r in results:
        row = dict(
            op=r.case.op, case=r.case.name, params=r.case.params,
            dtype=dtype_name(r.case.dtype), pass_=r.pass_name, impl=r.impl, baseline=r.baseline,
            status=r.status, message=r.message, median_ms=r.median_ms, p20_ms=r.p20_ms,
            p80_ms=r.p80_ms, n=r.n,
            peak_mb=(r.peak_bytes / 2**20 if r.peak_bytes is not None else None),
            gbps=r.gbps, gflops=r.gflops, min_bytes=r.case.min_bytes.get(r.pass_name),
            flops=r.case.flops.get(r.pass_name), rel_err=r.err,
            speedup_vs={k: v for k, v in r.speedups.items()},
        )
        row["pass"] = row.pop("pass_")
        records.append(row)
    return append_jsonl(records, stem, results[0].case.device, results_dir=results_dir,
                        extra=extra)


def append_jsonl(records: Sequence[dict], stem: str, device: torch.device, *,
                 results_dir: str | Path | None = None, extra: dict | None = None) -> Path:
    """Append one JSON line per record to ``<results_dir>/<stem>-<device-slug>.jsonl``
    (default ``bench/results/``), each ``{timestamp, bench: stem, **record, **env_info(device),
    **extra}`` (one timestamp for the call); returns the path. A record or ``extra`` naming an
    ``env_info`` key raises TypeError."""
    info = env_info(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{info['device_slug']}.jsonl"
    with open(path, "a") as f:
        for rec in records:
            row = dict(timestamp=stamp, bench=stem, **rec, **info, **(extra or {}))
            f.write(json.dumps(row, default=str) + "\n")
    return path
