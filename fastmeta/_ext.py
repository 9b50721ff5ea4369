"""Lazy loader of the compiled extension ``fastmeta._C``.

Importing ``fastmeta._C`` registers the C++ ops under ``torch.ops.fastmeta_cpp``. This module
never raises: ``load()`` returns the module or ``None`` and remembers why it could not be
loaded (``reason()``); a built ``_C`` that fails to load also warns once. Example::

    from fastmeta import _ext
    if _ext.available():
        torch.ops.fastmeta_cpp.proto_loss_fwd(query, protos, labels, 0, 1.0, 1e-8)
    else:
        print("C++ backend unavailable:", _ext.reason())
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import threading
import warnings
from types import ModuleType

__all__ = ["available", "build_info", "load", "reason"]

_NOT_BUILT = "fastmeta._C not built (FASTMETA_BUILD_EXT=0 or no compiler)"

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": ""}


def _built_files() -> list[str]:
    """Paths of ``_C`` extension files sitting in the package directory."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        names = os.listdir(here)
    except OSError:
        return []
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [os.path.join(here, n) for n in names if n.startswith("_C.") and n.endswith(suffixes)]


def load() -> ModuleType | None:
    """Import ``fastmeta._C`` once; the module, or ``None`` (see :func:`reason`)."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        module, why = None, ""
        try:
            import torch  # noqa: F401  (loads libtorch/libc10 that _C links against)

            module = importlib.import_module("fastmeta._C")
        except (ImportError, OSError) as e:
            built = _built_files()
            if isinstance(e, ModuleNotFoundError) and e.name == "fastmeta._C" and not built:
                why = _NOT_BUILT
            else:
                why = f"fastmeta._C failed to load: {type(e).__name__}: {e}"
                if built:
                    warnings.warn(
                        f"{why} (built file: {built[0]}); the C++ backend is disabled. "
                        "Rebuild with `pip install --no-build-isolation -e .` against the "
                        "installed torch.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        except Exception as e:  # e.g. a registration error raised by the static initialisers
            why = f"fastmeta._C failed to load: {type(e).__name__}: {e}"
            warnings.warn(f"{why}; the C++ backend is disabled.", RuntimeWarning, stacklevel=2)
        _state.update(module=module, reason=why, tried=True)
        return module


_entries: dict = {}


def entry(name: str):
    """``fastmeta._C.<name>`` (a pybind11 entry point such as ``proto_loss_fused`` or
    ``bn_train_double_backward``), or None when the extension is not built or predates it.
    Memoised."""
    fn = _entries.get(name, False)
    if fn is False:
        mod = load()
        fn = _entries[name] = getattr(mod, name, None) if mod is not None else None
    return fn


def available() -> bool:
    """True when ``fastmeta._C`` is importable (its ops are then registered)."""
    return load() is not None


def reason() -> str:
    """Why the extension is unavailable; ``''`` when it is loaded."""
    load()
    return _state["reason"]


def build_info() -> dict:
    """``fastmeta._C.build_info()`` (compiler, openmp, cuda, torch_version, ...), or ``{}``."""
    mod = load()
    if mod is None:
        return {}
    try:
        info = dict(mod.build_info())
    except Exception as e:  # pragma: no cover - defensive
        return {"error": f"{type(e).__name__}: {e}"}
    import torch

    # every op the extension registered (each csrc file registers its own fragment), read from
    # the dispatcher rather than kept as a list that drifts
    prefix = info.get("namespace", "fastmeta_cpp") + "::"
    info["ops"] = sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))
    return info


# Load at import, not on the first op call: that call may be inside a torch.compile'd function,
# and Dynamo cannot trace the lock above ("Unsupported context manager"); loading costs 1-5 ms.
load()
