"""Shared test helpers: backends under test and the measured-tolerance rule."""

from __future__ import annotations

import importlib.util
import os

import torch

from fastmeta import _ext

DEVICE = torch.device(os.environ.get("FASTMETA_TEST_DEVICE", "cpu"))
ON_CPU = DEVICE.type == "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Every backend that can run on the test device. On the CPU, Triton runs through the
# interpreter (slow: keep its shapes tiny). conftest skips a backend that is not installed.
FAST_BACKENDS = ["cpp", "triton"] if ON_CPU else ["triton"]
ALL_BACKENDS = ["reference", *FAST_BACKENDS]


def unavailable_reason(backend: str) -> str:
    if backend == "cpp" and not _ext.available():
        return _ext.reason()
    if backend == "triton" and not HAS_TRITON:
        return "triton is not installed"
    return ""


def assert_close_measured(fast, same_dtype_torch, oracle, *, atol, name=""):
    """The DESIGN.md rule: the kernel's error vs a float64 oracle is at most 2x the error of
    plain PyTorch at the same dtype, plus ``atol``."""
    oracle = oracle.double()
    err = (fast.double() - oracle).abs().max().item()
    ref_err = (same_dtype_torch.double() - oracle).abs().max().item()
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.3e} > 2 x PyTorch's {ref_err:.3e} + {atol:.1e}"


def assert_close64(a, b, *, rtol=1e-10, atol=1e-12, name=""):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_matches_oracle(fast, same, oracle, which, dtype, *, atol, rtol64=1e-10, atol64=1e-12):
    """For each ``(index, name)`` in ``which``: ``fast[index]`` has ``dtype`` and matches the
    float64 ``oracle[index]``: to ``rtol64``/``atol64`` in float64, else by the measured rule
    (:func:`assert_close_measured` against ``same``, plain PyTorch at ``dtype``)."""
    for i, what in which:
        assert fast[i].dtype == dtype, f"{what}: dtype {fast[i].dtype}, expected {dtype}"
        if dtype == torch.float64:
            assert_close64(fast[i], oracle[i], rtol=rtol64, atol=atol64, name=what)
        else:
            assert_close_measured(fast[i], same[i], oracle[i], atol=atol, name=what)


def case_id(value):
    """Readable pytest ids: float32, 2x5x3x7."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return None
