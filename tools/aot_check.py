#!/usr/bin/env python3
"""Ahead-of-time compile check of every Triton kernel of fastmeta for NVIDIA GPUs, on a
machine without one (``make aot-check``; CI runs ``--quick``).

The Triton interpreter that the tests use runs kernels as Python: it cannot see what the GPU
compiler rejects (a name bound in one arm of a runtime branch, a tile that needs more shared
memory than the GPU has, a kernel that spills its registers to local memory). This check runs
the real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for sm_90 (H100/H200) and
sm_80 (A100):

* A stand-in Triton driver reports a CUDA target of the chosen arch and turns every launch
  into a no-op, so the REAL launchers of ``fastmeta.kernels`` run on CPU tensors: the JIT
  binder specialises the arguments as on a GPU (dtypes, ints equal to 1 become constexpr,
  16-byte alignment), the launcher's own block sizes / num_warps / num_stages are compiled, the
  grid is evaluated and checked against CUDA's grid limits, and Triton's own shared-memory
  check runs against the arch's limit. Nothing is computed: the outputs are garbage.
* The cases (``tools/aot_cases.py``) call every launcher at the benchmark shapes (imported
  from ``bench/``) and the edge shapes of the tests, in every dtype and precision mode the
  launcher serves (fp32 ieee and tf32, fp16, bf16, fp64) and, in the full set, every autotune
  config.
* ptxas -v's report of each compiled variant (registers, spill store/load bytes, stack frame)
  is captured from the compile itself (cached by kernel hash with Triton's cache).

A variant FAILS when it does not compile, cannot launch (shared memory, threads, grid), or
spills more than its budget (``aot_cases.SPILL_BUDGET``, default 0 bytes). The check
also fails when a ``@triton.jit`` ``*_kernel`` under ``kernels/`` was reached by no case.

    python tools/aot_check.py [--quick] [--arch 90,80] [-j 2] [--only TEXT]
                              [--case-timeout S] [--report FILE] [-v]

Caches (Triton's kernel cache and the ptxas statistics) live in ``$FASTMETA_AOT_CACHE``
(default ``~/.cache/fastmeta/triton-aot``): a rerun without kernel changes takes seconds.

It checks compilation and launch configuration only: wrong results, races and illegal
addresses need a GPU (``bench/device_check.sh``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# Kernels are defined for the GPU only when TRITON_INTERPRET is unset at their definition.
os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FASTMETA_AOT_CACHE",
                            Path.home() / ".cache" / "fastmeta" / "triton-aot"))
os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.compiler  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Per-arch device facts the launchers and Triton's launch checks read.
ARCHS = {
    90: {"name": "H100/H200", "sms": 132, "max_shared_mem": 232448},  # 227 KB opt-in per block
    80: {"name": "A100", "sms": 108, "max_shared_mem": 166912},  # 163 KB opt-in per block
}
MAX_THREADS = 1024
GRID_LIMITS = (2**31 - 1, 65535, 65535)
REGISTER_FILE = 65536  # 32-bit registers per SM (and per block) on sm_80 and sm_90
STACK_LIMIT = 16384  # bytes per thread: local memory is reserved for every resident thread


# ---------------------------------------------------------------------------------------------
# stand-in driver
# ---------------------------------------------------------------------------------------------


class LaunchError(RuntimeError):
    """A launch the GPU would refuse (grid out of range)."""


class _NoLaunch:
    """Triton's launcher for one compiled kernel: checks the grid, then launches nothing."""

    def __init__(self, src, metadata):
        self.name = getattr(getattr(src, "fn", None), "__name__", "?")

    def __call__(self, gx, gy, gz, *_):
        for dim, (n, limit) in enumerate(zip((gx, gy, gz), GRID_LIMITS)):
            if not 0 < n <= limit:
                raise LaunchError(f"{self.name}: grid dimension {dim} = {n} outside 1..{limit}")


class _Utils:
    def __init__(self, arch):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": ARCHS[self.arch]["max_shared_mem"],
                "multiprocessor_count": ARCHS[self.arch]["sms"], "max_num_regs": REGISTER_FILE,
                "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, MAX_THREADS  # module, function, n_regs, n_spills, max threads


class AOTDriver:
    """Just enough of Triton's driver for compile + launch bookkeeping with no GPU.

    The current device is the arch number, so each arch gets its own JIT cache in one
    process."""

    def __init__(self, arch: int):
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(arch)
        self.launcher_cls = _NoLaunch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        # The autotuner "times" each config by one no-op launch (a compile): every config of
        # the pruned list is compiled, the first wins.
        def bench(kernel_call, quantiles=None, **_):
            kernel_call()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def is_active(self):
        return True

    def __getattr__(self, name):
        raise RuntimeError(f"AOT check: Triton asked the stand-in driver for {name!r} (needs a GPU)")


# ---------------------------------------------------------------------------------------------
# recording compiles
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    kernel: str
    arch: int
    desc: str  # dtypes and constexprs
    case: str  # first case that compiled it
    ok: bool
    seconds: float = 0.0
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0
    regs: int = -1
    spill_st: int = 0
    spill_ld: int = 0
    stack: int = 0
    hash: str = ""
    error: str = ""
    problems: list = field(default_factory=list)

    @property
    def spill(self) -> int:
        return self.spill_st + self.spill_ld


_RECORDED: list[Variant] = []
_CURRENT = {"case": "", "arch": 90}


def _parse_ptxas(log: str, kernel_name: str) -> dict | None:
    """Registers/spills/stack of the entry function ``kernel_name`` in a ptxas -v log."""
    at = log.find(f"Compiling entry function '{kernel_name}'")
    if at < 0:
        return None
    part = log[at:]
    nxt = part.find("Compiling entry function", 1)
    part = part if nxt < 0 else part[:nxt]

    def num(pattern):
        m = re.search(pattern, part)
        return int(m.group(1)) if m else 0

    regs = re.search(r"Used (\d+) registers", part)
    return {"regs": int(regs.group(1)) if regs else -1,
            "spill_st": num(r"(\d+) bytes spill stores"), "spill_ld": num(r"(\d+) bytes spill loads"),
            "stack": num(r"(\d+) bytes stack frame")}


def _ptxas_rerun(ptx: str, arch: int, name: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name,
                              "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return _parse_ptxas(out.stderr + out.stdout, name) or {"regs": -1, "spill_st": 0,
                                                             "spill_ld": 0, "stack": 0}


class _StatsCache:
    """ptxas statistics by compiled-kernel hash: a Triton cache hit runs no ptxas."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:  # merge with what other workers saved meanwhile
            merged = json.loads(self.path.read_text())
        except (OSError, ValueError):
            merged = {}
        merged.update(self.data)
        tmp.write_text(json.dumps(merged))
        tmp.replace(self.path)


_STATS: _StatsCache | None = None


def _describe(src) -> str:
    names = src.fn.arg_names
    ptrs = [v.lstrip("*") for v in src.signature.values() if isinstance(v, str) and v.startswith("*")]
    consts = []
    for path, value in sorted(src.constants.items()):
        if not (isinstance(path, tuple) and len(path) == 1):
            continue
        value = getattr(value, "value", value)
        consts.append(f"{names[path[0]]}={value}")
    return f"[{','.join(ptrs)}] " + " ".join(consts)


def _compile_recording(real_compile):
    def compile(src, target=None, options=None, _env_vars=None):
        name = src.fn.__name__
        arch = target.arch if target is not None else _CURRENT["arch"]
        t0 = time.time()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # ptxas -v (and its error dump)
                kernel = real_compile(src, target=target, options=options, _env_vars=_env_vars)
        except Exception as exc:  # noqa: BLE001 - recorded, then re-raised to the case
            _RECORDED.append(Variant(name, arch, _describe(src), _CURRENT["case"], False,
                                     time.time() - t0, error=_short_error(exc)))
            raise
        md = kernel.metadata
        stats = _parse_ptxas(log.getvalue(), md.name) or _STATS.get(kernel.hash)
        if stats is None:
            stats = _ptxas_rerun(kernel.asm["ptx"], arch, md.name)
        _STATS.put(kernel.hash, stats)
        _RECORDED.append(Variant(name, arch, _describe(src), _CURRENT["case"], True,
                                 time.time() - t0, md.num_warps, md.num_stages, md.shared,
                                 hash=kernel.hash, **stats))
        return kernel

    return compile


def _short_error(exc: BaseException) -> str:
    lines = [ln for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
    return "\n".join(lines[-25:])


# ---------------------------------------------------------------------------------------------
# worker: run cases
# ---------------------------------------------------------------------------------------------

_CASES: dict = {}


class _CaseTimeout(Exception):
    pass


def _worker_init(quick: bool, full_autotune: bool):
    global _STATS
    import aot_cases

    _STATS = _StatsCache(CACHE / "ptxas-stats.json")
    knobs.nvidia.dump_ptxas_log = True
    triton.compiler.compile = _compile_recording(triton.compiler.compile)
    driver.set_active(AOTDriver(90))
    aot_cases.stand_in_gpu(lambda: ARCHS[_CURRENT["arch"]]["sms"])
    _CASES.update({c.label: c for c in aot_cases.cases(quick, full_autotune)})


def _run_case(arch: int, label: str, timeout: int) -> tuple[str, list[Variant], float]:
    """Compile one case for one arch; returns (status, new variants, seconds)."""
    _CURRENT.update(case=label, arch=arch)
    driver.set_active(AOTDriver(arch))
    n0 = len(_RECORDED)
    t0 = time.time()

    def alarm(*_):
        raise _CaseTimeout()

    if timeout:
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(timeout)
    try:
        _CASES[label].run()
        status = "ok"
    except _CaseTimeout:
        status = f"TIMEOUT after {timeout}s"
    except Exception as exc:  # noqa: BLE001 - compile errors are recorded per variant
        if len(_RECORDED) > n0 and not _RECORDED[-1].ok:
            status = "compile failed"
        else:
            status = "LAUNCH ERROR " + traceback.format_exception_only(exc)[-1].strip()
    finally:
        if timeout:
            signal.alarm(0)
    _STATS.save()
    return status, _RECORDED[n0:], time.time() - t0


# ---------------------------------------------------------------------------------------------
# parent: schedule, judge, report
# ---------------------------------------------------------------------------------------------


def jit_kernels() -> dict[str, str]:
    """``*_kernel`` JIT functions defined in ``fastmeta.kernels`` modules: name -> module."""
    import importlib
    import pkgutil

    import fastmeta.kernels as pkg

    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastmeta.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__ \
                    and name.endswith("_kernel"):
                out[name] = info.name
    return out


def judge(v: Variant, budgets: dict) -> str:
    if not v.ok:
        return "FAIL"
    v.problems = []
    if v.shared > ARCHS[v.arch]["max_shared_mem"]:
        v.problems.append(f"shared memory {v.shared} > {ARCHS[v.arch]['max_shared_mem']}")
    if v.regs > 0 and v.regs * v.num_warps * 32 > REGISTER_FILE:
        v.problems.append(f"{v.regs} registers x {v.num_warps * 32} threads > {REGISTER_FILE}")
    if v.stack > STACK_LIMIT:
        v.problems.append(f"stack frame {v.stack} B/thread > {STACK_LIMIT}")
    budget = max((n for text, n in budgets.get(v.kernel, {}).items() if text in v.desc), default=0)
    if v.spill > budget:
        v.problems.append(f"spills {v.spill} B > budget {budget} B")
    if v.problems:
        return "FAIL"
    return "SPILL" if v.spill else "OK"


HEADER = (f"{'status':6} {'sm':>3} {'kernel':26} {'regs':>4} {'spill':>6} {'stack':>6} "
          f"{'smem':>6} {'w':>2} {'st':>2} {'sec':>5}  variant")


def fmt(v: Variant, status: str) -> str:
    if not v.ok:
        return f"{status:6} {v.arch:>3} {v.kernel:26} {'':>4} {'':>6} {'':>6} {'':>6} {'':>2} " \
               f"{'':>2} {v.seconds:5.1f}  {v.desc}"
    extra = f"  !! {'; '.join(v.problems)}" if v.problems else ""
    return (f"{status:6} {v.arch:>3} {v.kernel:26} {v.regs:>4} {v.spill:>6} {v.stack:>6} "
            f"{v.shared:>6} {v.num_warps:>2} {v.num_stages:>2} {v.seconds:5.1f}  {v.desc}{extra}")


def write_report(path: Path, variants, statuses, args, seconds, kernels, uncovered):
    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        f"`python tools/aot_check.py {' '.join(sys.argv[1:])}` -- triton {triton.__version__}, "
        f"torch {torch.__version__}, targets "
        + ", ".join(f"sm_{a} ({ARCHS[a]['name']})" for a in args.archs)
        + f", {len(variants)} variants in {seconds:.0f} s on {os.cpu_count()} CPU cores.",
        "",
        "ptxas -v per variant: registers per thread, spill store+load bytes, stack frame bytes "
        "per thread, shared memory bytes per block, num_warps (w), num_stages (st). Nothing here "
        "ran on a GPU: it says the kernels compile and fit, not that they are right or fast.",
        "",
        f"Kernels: {len(kernels)}; reached by no case: {', '.join(uncovered) or 'none'}. "
        f"Variants: {sum(s != 'FAIL' for s in statuses)} compiled and within budget, "
        f"{sum(s == 'SPILL' for s in statuses)} of them with spills inside their budget, "
        f"{sum(s == 'FAIL' for s in statuses)} failed.",
        "",
        "| status | sm | kernel | regs | spill B | stack B | smem B | w | st | variant | first case |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, s in sorted(zip(variants, statuses), key=lambda p: (p[0].kernel, -p[0].arch, p[0].desc)):
        desc = v.desc.replace("|", "/")
        if v.ok:
            lines.append(f"| {s} | {v.arch} | `{v.kernel}` | {v.regs} | {v.spill} | {v.stack} | "
                         f"{v.shared} | {v.num_warps} | {v.num_stages} | {desc} | {v.case} |")
        else:
            lines.append(f"| FAIL | {v.arch} | `{v.kernel}` | | | | | | | {desc} | {v.case} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI set: every kernel and dtype path, fewer shapes, no autotune sweep")
    ap.add_argument("--arch", default="90,80", help="compute capabilities (default 90,80)")
    ap.add_argument("-j", "--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--only", action="append", default=[], help="cases whose label contains TEXT")
    ap.add_argument("--case-timeout", type=int, default=600,
                    help="seconds one case may compile before it counts as failed (default 600)")
    ap.add_argument("--report", type=Path, help="write a markdown table of every variant here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case as it ends")
    args = ap.parse_args(argv)
    args.archs = [int(a) for a in args.arch.split(",") if a.strip()]
    for a in args.archs:
        if a not in ARCHS:
            ap.error(f"--arch {a}: known archs are {sorted(ARCHS)}")

    import aot_cases

    t0 = time.time()
    kernels = jit_kernels()
    labels = [c for c in aot_cases.cases(args.quick, not args.quick)
              if not args.only or any(o in c.label for o in args.only)]
    if not labels:
        ap.error(f"--only {args.only}: no case matches")
    # most expensive first so the workers finish together
    tasks = sorted(((arch, c.label, c.cost) for c in labels for arch in args.archs),
                   key=lambda t: -t[2])
    print(f"fastmeta Triton AOT check: triton {triton.__version__}, torch {torch.__version__}, "
          f"sm_{', sm_'.join(map(str, args.archs))}; {len(kernels)} kernels, {len(labels)} cases "
          f"x {len(args.archs)} archs, {args.jobs} workers, cache {CACHE}", flush=True)
    print(HEADER, flush=True)

    budgets = aot_cases.SPILL_BUDGET
    variants, statuses, bad_cases = [], [], []
    seen = set()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(args.quick, not args.quick)) as pool:
        futs = {pool.submit(_run_case, arch, label, args.case_timeout): (arch, label)
                for arch, label, _ in tasks}
        for fut in cf.as_completed(futs):
            arch, label = futs[fut]
            try:
                status, new, secs = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker died
                status, new, secs = f"WORKER DIED {type(exc).__name__}: {exc}", [], 0.0
            for v in new:
                key = (v.arch, v.kernel, v.hash or v.desc)
                if key in seen:
                    continue
                seen.add(key)
                s = judge(v, budgets)
                variants.append(v)
                statuses.append(s)
                print(fmt(v, s), flush=True)
                if not v.ok:
                    print("       first case: " + v.case)
                    print("\n".join("       | " + ln for ln in v.error.splitlines()), flush=True)
            if status != "ok":
                bad_cases.append((arch, label, status))
                print(f"CASE   sm_{arch} {label}: {status}", flush=True)
            elif args.verbose:
                print(f"case   sm_{arch} {label}: ok ({len(new)} new variants, {secs:.1f} s)",
                      flush=True)

    reached = {v.kernel for v in variants}
    uncovered = sorted(set(kernels) - reached) if not args.only else []
    seconds = time.time() - t0
    n_fail = sum(s == "FAIL" for s in statuses)
    print()
    print(f"kernels reached: {len(reached & set(kernels))}/{len(kernels)}"
          + (f"; NOT REACHED by any case: {', '.join(uncovered)}" if uncovered else ""))
    print(f"variants: {len(variants)} ({sum(s == 'OK' for s in statuses)} OK, "
          f"{sum(s == 'SPILL' for s in statuses)} spilling within budget, {n_fail} FAIL); "
          f"cases not ok: {len(bad_cases)}; {seconds:.0f} s")
    for arch, label, status in bad_cases:
        print(f"  sm_{arch} {label}: {status}")
    if args.report:
        write_report(args.report, variants, statuses, args, seconds, kernels, uncovered)
        print(f"report: {args.report}")
    return 1 if (n_fail or uncovered or bad_cases) else 0


if __name__ == "__main__":
    sys.exit(main())
