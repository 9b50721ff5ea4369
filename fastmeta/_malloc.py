"""glibc malloc settings for the task-batched CPU path (Linux only, once per process).

Task-batched activations are large: ``[N, T*C, H, W]`` for T=32 tasks is 8 MB at Omniglot
sizes and 144 MB at mini-ImageNet's 84x84. glibc serves blocks above its mmap threshold with a
fresh ``mmap`` (and returns them with ``munmap``), and gives the top of its heap back to the
system once more than the trim threshold is free there. Either way the next step's tensors land
on fresh pages, and every 4 KB page is zero-filled by the kernel on first touch (the page
faults measured per meta-step: ``bench/results/design_notes.md``, ``bench/results/dropin.md``).

:func:`tune` keeps freed memory in the heap: ``M_MMAP_MAX = 0`` (large blocks come from the
heap too) and no automatic trimming of the heap's top (``M_TRIM_THRESHOLD`` = the largest
size; ``malloc_trim(0)`` still returns it on request). The price: the process keeps its peak
heap resident instead of returning it between steps (what PyTorch's CUDA caching allocator
does on a GPU). A finite threshold is not enough: a MiniImagenetCNN meta-step frees more than
the 1 GiB used before at once, and each step then faulted its pages in again (measured:
``bench/results/design_notes.md``). It is called at the first
task-batched call on a CPU tensor (:func:`tune_for`, called by :class:`fastmeta.nn.TaskModule`
and the traced path), and does
nothing when the environment sets ``FASTMETA_MALLOC_TUNING=0``, when the C library is not
glibc, or when the user already set any of glibc's own ``MALLOC_*_`` variables or
``GLIBC_TUNABLES`` (their settings win).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = -1  # mallopt's int; glibc reads it as size_t: SIZE_MAX, never trim

_state = {"done": False, "applied": False}


def tune() -> bool:
    """Apply the settings once per process; True if they are in effect (see the module doc)."""
    if _state["done"]:
        return _state["applied"]
    _state["done"] = True
    if os.environ.get("FASTMETA_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    env = os.environ
    if "GLIBC_TUNABLES" in env or any(k.startswith("MALLOC_") and k.endswith("_") for k in env):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl etc. have no mallopt semantics to rely on)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and ok
    _state["applied"] = ok
    return ok


def tune_for(x) -> None:
    """:func:`tune` at the first task-batched call on a CPU tensor ``x`` (the hot-path entry:
    after the first call this is one flag test)."""
    if not _state["done"] and x.device.type == "cpu":
        tune()


def applied() -> bool:
    """Whether :func:`tune` has changed the settings in this process."""
    return _state["applied"]


__all__ = ["applied", "tune", "tune_for"]
