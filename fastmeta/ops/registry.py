"""The one backend table: which backend serves which op on which device, dtype and shape.

Every op registers an ordered list of :class:`Backend` entries. A call walks that list and
runs the first backend whose :meth:`Backend.not_supported_reasons` is empty. ``backend=`` on
the public function, or the ``FASTMETA_BACKEND`` environment variable, forces one backend;
when nothing fits, :class:`BackendError` lists every backend's reasons. :func:`select` is
memoised per op (the walk costs about as much as a small op's whole kernel): ops and
task_hvp's strategies call it on every call instead of caching a choice themselves.

Backends:

* ``triton`` -- Triton kernels (``fastmeta.kernels``), CUDA tensors. On a machine without a
  GPU the Triton interpreter (``TRITON_INTERPRET=1``) can run them on CPU tensors, but only
  when forced (it is ~1000x slower than PyTorch), which is how the tests exercise them.
* ``cuda`` -- CUDA C++ kernels in ``fastmeta._C`` (only for ops CUDA C++ serves best).
* ``cpp`` -- C++ CPU kernels in ``fastmeta._C`` (``at::parallel_for``).
* ``composite`` -- plain ATen ops arranged for speed (fewest ops and autograd nodes), for the
  shapes where a fused kernel's fixed costs (custom-op dispatch, a kernel that does not use
  BLAS) make it slower than the PyTorch code it replaces; any device, twice differentiable;
  checked against the same float64 oracle as every other backend.
* ``reference`` -- plain PyTorch; always available, any device, twice differentiable: the
  oracle (used automatically only when nothing before it serves the call).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Hashable, Sequence

import torch

from fastmeta import _ext

# kernel backends, then the model-level strategies of task_hvp (analytic R-op, torch.func)
BACKEND_NAMES = ("triton", "cuda", "cpp", "composite", "reference", "analytic", "func")
ENV_VAR = "FASTMETA_BACKEND"

try:  # the key as os.environ stores it (bytes on POSIX), encoded once
    _ENV_KEY = os.environ.encodekey(ENV_VAR)
except AttributeError:  # pragma: no cover - an os.environ without encodekey
    _ENV_KEY = None


def env_backend() -> str | None:
    """``FASTMETA_BACKEND`` as ``os.environ`` holds it now (None when unset or empty). One dict
    lookup on os.environ's own store (0.04 us) instead of ``os.environ.get``'s key encoding
    (0.66 us): the eager fast paths of the head ops read it on every call."""
    data = getattr(os.environ, "_data", None)
    if _ENV_KEY is not None and type(data) is dict:
        raw = data.get(_ENV_KEY)
        return os.environ.decodevalue(raw) or None if raw else None
    return os.environ.get(ENV_VAR) or None  # pragma: no cover


class BackendError(RuntimeError):
    """No backend can serve a call (or the forced one cannot); the message lists why."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_reason_cache: list[str] = []


def triton_unavailable_reason() -> str:
    """'' when Triton kernels can be launched somewhere on this machine, else why not."""
    if not _triton_reason_cache:
        if importlib.util.find_spec("triton") is None:
            reason = "triton is not installed (pip install 'fastmeta[triton]')"
        elif not (torch.cuda.is_available() or triton_interpreting()):
            reason = "no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU, slowly)"
        else:
            reason = ""
        _triton_reason_cache.append(reason)
    return _triton_reason_cache[0]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to run an op.

    ``devices``: device types served (``"cpu"``, ``"cuda"``); ``dtypes``: floating dtypes
    served; ``available``: returns '' when the backend's code is present on this machine,
    else the reason; ``limits``: extra per-call checks returning reasons (shape limits).
    ``interpreter_cpu``: a Triton backend that may run CPU tensors under TRITON_INTERPRET=1
    when forced. ``slower``: returns '' or why a later backend is faster for this call (a
    measured shape rule); consulted by automatic selection only, never when forced.
    """

    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    available: Callable[[], str]
    limits: Callable[..., list[str]] | None = None
    interpreter_cpu: bool = False
    slower: Callable[..., str] | None = None

    def not_supported_reasons(
        self, tensors: Sequence[torch.Tensor], forced: bool = False, **shape_info
    ) -> list[str]:
        reasons = []
        why = self.available()
        if why:
            return [why]
        device = tensors[0].device.type
        devices = set(self.devices)
        if self.interpreter_cpu and forced and triton_interpreting():
            devices.add("cpu")
        if device not in devices:
            reasons.append(f"device {device} not supported (serves {', '.join(sorted(devices))})")
        dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
        if dtype is not None and dtype not in self.dtypes:
            served = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} not supported ({served})")
        if self.limits is not None:
            reasons.extend(self.limits(*tensors, **shape_info))
        return reasons


def always() -> str:
    """``available`` of a backend that is pure PyTorch (present wherever torch is)."""
    return ""


def _cpp_available() -> str:
    return "" if _ext.available() else _ext.reason()


def _cuda_ext_available() -> str:
    if not _ext.available():
        return _ext.reason()
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _ext.build_info().get("cuda", False):
        return "fastmeta._C was built without CUDA kernels"
    return ""


FLOAT32_64 = frozenset({torch.float32, torch.float64})
ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
ANY_DEVICE = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})


def triton_backend(limits=None) -> Backend:
    return Backend(
        "triton", frozenset({"cuda"}), ALL_FLOATS, triton_unavailable_reason, limits,
        interpreter_cpu=True,
    )


def cpp_backend(limits=None, slower=None) -> Backend:
    return Backend("cpp", frozenset({"cpu"}), FLOAT32_64, _cpp_available, limits, slower=slower)


def cuda_backend(limits=None) -> Backend:
    return Backend("cuda", frozenset({"cuda"}), ALL_FLOATS, _cuda_ext_available, limits)


def composite_backend(limits=None) -> Backend:
    return Backend("composite", ANY_DEVICE, ALL_FLOATS, always, limits)


def reference_backend() -> Backend:
    return Backend("reference", ANY_DEVICE, ALL_FLOATS, always)


_TABLE: dict[str, tuple[Backend, ...]] = {}


@dataclasses.dataclass
class _Memo:
    """What :func:`select` needs to memoise one op: ``key`` (see :func:`register`), the
    ``FASTMETA_BACKEND`` values that force the op, and the choices made so far."""

    key: Callable[..., Hashable]
    env_names: frozenset[str] | None  # None: every backend name, and other values are errors
    chosen: dict = dataclasses.field(default_factory=dict)


_MEMO: dict[str, _Memo] = {}


def _no_key(*tensors, **shape_info) -> Hashable:
    return ()


def shapes_key(*tensors: torch.Tensor, **shape_info) -> Hashable:
    """The default memo key: every tensor's shape and the ``shape_info`` values."""
    return tuple(t.shape for t in tensors), tuple(sorted(shape_info.items()))


def register(
    op: str,
    backends: Sequence[Backend],
    key: Callable[..., Hashable] | None = None,
    env_names: Sequence[str] | None = None,
) -> None:
    """Declare ``op``'s backends in priority order (first that fits wins).

    ``key(*tensors, **shape_info)`` must return a hashable that, together with the forced
    name and the device and dtype of the call, decides every backend's ``limits`` and
    ``slower`` verdict: :func:`select` remembers its answer per key. Default: a constant
    when no backend has ``limits`` or ``slower``, else :func:`shapes_key`. ``env_names``: the
    ``FASTMETA_BACKEND`` values that force this op (default: all its backends, and any other
    value is an error); a value outside an explicit ``env_names`` is ignored by this op (e.g.
    task_hvp's strategies leave ``cpp`` to the kernels they call).
    """
    names = [b.name for b in backends]
    unknown = set(names) - set(BACKEND_NAMES)
    if unknown:
        raise ValueError(f"unknown backend names {sorted(unknown)} for op {op!r}")
    if key is None:
        rules = any(b.limits is not None or b.slower is not None for b in backends)
        key = shapes_key if rules else _no_key
    _TABLE[op] = tuple(backends)
    _MEMO[op] = _Memo(key, None if env_names is None else frozenset(env_names))


def kernel(backend: str, stem: str, name: str) -> Callable:
    """The compiled or Triton entry point ``name`` of op ``stem`` for ``backend``.

    ``cpp``/``cuda`` entry points are torch.library ops registered by ``fastmeta._C`` under
    ``torch.ops.fastmeta_cpp``; ``triton`` ones are launchers in ``fastmeta.kernels.<stem>``.
    """
    if backend in ("cpp", "cuda"):
        if _ext.load() is None:
            raise BackendError(f"backend {backend!r}: {_ext.reason()}")
        return getattr(torch.ops.fastmeta_cpp, name)
    if backend == "triton":
        return getattr(importlib.import_module(f"fastmeta.kernels.{stem}"), name)
    raise ValueError(f"backend {backend!r} has no compiled entry points")


def ops() -> list[str]:
    return sorted(_TABLE)


def select(op: str, tensors: Sequence[torch.Tensor], backend: str | None = None, **shape_info) -> str:
    """Name of the backend that runs this call of ``op``.

    ``backend`` (or ``FASTMETA_BACKEND`` when ``backend`` is None) forces one backend; an
    unknown name raises ``ValueError``; a forced backend that cannot serve the call, or no
    backend at all, raises :class:`BackendError` listing every reason. ``tensors[0]`` gives
    the device, the first floating tensor the dtype; ``shape_info`` goes to the backends'
    ``limits``/``slower`` rules. Answers are memoised (see :func:`register`); errors are not.
    Backend availability is read once per memo key: it does not change within a process.
    """
    memo = _MEMO.get(op)
    if memo is None or torch.compiler.is_compiling():
        # (a table entry made without register(), or torch.compile tracing the walk, where a
        # memo dict would become a guard): not memoised
        return _walk(op, _entries(op), _forced(backend, memo), backend is not None, tensors, shape_info)
    forced = _forced(backend, memo)
    t0 = tensors[0]
    dtype = t0.dtype if t0.is_floating_point() else next(
        (t.dtype for t in tensors if t.is_floating_point()), None)
    key = (forced, t0.device, dtype, memo.key(*tensors, **shape_info))
    name = memo.chosen.get(key)
    if name is None:
        name = _walk(op, _entries(op), forced, backend is not None, tensors, shape_info)
        memo.chosen[key] = name
    return name


def _entries(op: str) -> tuple[Backend, ...]:
    entries = _TABLE.get(op)
    if entries is None:
        raise KeyError(f"op {op!r} has no backends registered; known ops: {ops()}")
    return entries


def _forced(backend, memo: _Memo | None) -> str | None:
    """The backend name forced by ``backend=`` or, failing that, by FASTMETA_BACKEND (when it
    names one this op takes from the environment)."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        return backend
    if memo is not None and memo.env_names is not None and not memo.env_names:
        return None
    env = env_backend()
    if env is not None and memo is not None and memo.env_names is not None and env not in memo.env_names:
        return None
    return env


def _walk(op, entries, forced, by_argument: bool, tensors, shape_info) -> str:
    if forced is not None:
        by_name = {b.name: b for b in entries}
        if forced not in by_name:
            source = "backend=" if by_argument else f"{ENV_VAR}="
            raise ValueError(
                f"{source}{forced!r} is not a backend of {op}; choose one of {list(by_name)}"
            )
        reasons = by_name[forced].not_supported_reasons(tensors, forced=True, **shape_info)
        if reasons:
            raise BackendError(f"{op}: backend {forced!r} cannot run this call: " + "; ".join(reasons))
        return forced
    all_reasons = []
    for b in entries:
        reasons = b.not_supported_reasons(tensors, **shape_info)
        if not reasons and b.slower is not None:
            why = b.slower(*tensors, **shape_info)
            reasons = [why] if why else []
        if not reasons:
            return b.name
        all_reasons.append(f"  {b.name}: " + "; ".join(reasons))
    raise BackendError(f"{op}: no backend can run this call:\n" + "\n".join(all_reasons))


def backends_for(op: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of ``op``'s backends that would accept a ``dtype`` call on ``device`` now."""
    dev = torch.device(device).type
    out = []
    for b in _TABLE[op]:
        if b.available():
            continue
        if dev not in b.devices or dtype not in b.dtypes:
            continue
        out.append(b.name)
    return out


def table() -> list[dict]:
    """Rows of the backend table: op, backend, devices, dtypes, available, why not."""
    rows = []
    for op in ops():
        for b in _TABLE[op]:
            why = b.available()
            rows.append(
                dict(
                    op=op,
                    backend=b.name,
                    devices=",".join(sorted(b.devices)),
                    dtypes=",".join(sorted(str(d).replace("torch.", "") for d in b.dtypes)),
                    available=not why,
                    why_not=why,
                )
            )
    return rows


def format_table() -> str:
    rows = table()
    lines = [
        f"fastmeta backends (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
        f"forced: {env_backend() or 'none'})",
        f"  C++ extension: {'built' if _ext.available() else 'not available: ' + _ext.reason()}",
        f"  Triton: {triton_unavailable_reason() or 'available'}"
        + (" (interpreter mode)" if triton_interpreting() else ""),
        "",
    ]
    header = ("op", "backend", "devices", "dtypes", "status")
    body = [
        (r["op"], r["backend"], r["devices"], r["dtypes"], "ok" if r["available"] else "unavailable: " + r["why_not"])
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(4)]
    for r in [header, *body]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return "\n".join(lines)
