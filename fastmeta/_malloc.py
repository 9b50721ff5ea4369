"""glibc malloc settings for the task-batched CPU path (Linux only, once per process).

Task-batched activations are large: ``[N, T*C, H, W]`` for T=32 tasks is 8 MB at Omniglot
sizes and 144 MB at mini-ImageNet's 84x84. glibc serves blocks above its mmap threshold with a
fresh ``mmap`` (and returns them with ``munmap``), and gives the top of its heap back to the
system once more than the trim threshold is free there. Either way the next step's tensors land
on fresh pages, and every 4 KB page is zero-filled by the kernel on first touch. Measured on
the 2-core CPU VM (1 thread): one second-order MAML meta-step of learn2learn's OmniglotCNN at
T=32 took ~33,000 minor page faults (0.03-0.3 s of system time on a ~0.4 s step) and of
MiniImagenetCNN ~1.2 million (2 s of system time on a 4 s step); the per-task clone/adapt
loop, whose tensors are 32x smaller, took none. ``bench/results/dropin.md`` has the numbers.

:func:`tune` keeps freed memory in the heap: ``M_MMAP_MAX = 0`` (large blocks come from the
heap too) and ``M_TRIM_THRESHOLD = 1 GiB`` (less than that free at the heap's top stays
mapped). The price: the process keeps up to its peak heap resident instead of returning it
between steps (what PyTorch's CUDA caching allocator does on a GPU). It is called at the first
task-batched call on a CPU tensor (:class:`fastmeta.nn.TaskModule`, the traced path), and does
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
TRIM_THRESHOLD = 1 << 30

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


def applied() -> bool:
    """Whether :func:`tune` has changed the settings in this process."""
    return _state["applied"]


__all__ = ["applied", "tune"]
