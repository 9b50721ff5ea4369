"""Helpers every Triton kernel module of fastmeta shares: the interpreter flag, dtypes,
precision rules, the device's SM count, tile sizes and the program-to-tile map, and the
precise/fast math switch.

Launchers call the Python helpers through this module (``_common.input_precision(...)``, not
a copied name), so the ahead-of-time compile check (``tools/aot_check.py``) can stand a GPU in
for the CPU tensors it launches with by replacing ``input_precision`` and ``sm_count`` here,
in one place.
"""

import functools
import os

import torch
import triton
import triton.language as tl

try:  # the interpreter does not implement libdevice; GPU paths use it through PRECISE
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - every Triton >= 3.0 has it
    libdevice = None

# TRITON_INTERPRET must be set before the first @triton.jit function is defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# libdevice math is available (compiled kernels); the interpreter uses numpy's.
HAS_LIBDEVICE = (not INTERPRET) and libdevice is not None

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 for fp16/bf16/fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_tl(dtype: torch.dtype):
    """``acc_dtype`` as a Triton dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch float dtype."""
    return _TL_DTYPE[dtype]


def tf32_allowed() -> bool:
    """Whether torch's own fp32 CUDA matmuls may use TF32 (new and legacy flag APIs)."""
    for prec in (getattr(torch.backends.cuda.matmul, "fp32_precision", None),
                 getattr(torch.backends, "fp32_precision", None)):
        if prec == "tf32":
            return True
        if prec == "ieee":
            return False
    try:  # torch < 2.9, or both new-API levels "none"
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses mixed legacy/new API reads
        return False


def input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` input precision: "tf32" for fp32 on CUDA when torch allows TF32 (like
    cuBLAS), else "ieee"."""
    if dtype == torch.float32 and device.type == "cuda" and tf32_allowed():
        return "tf32"
    return "ieee"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA device the tensors live on."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def precise(dtype: torch.dtype) -> bool:
    """fp64 kernels use libdevice's correctly rounded exp/log/sqrt on the GPU."""
    return HAS_LIBDEVICE and dtype == torch.float64


def split_f32(x: float):
    """(hi, lo) fp32 values with hi + lo == x to ~48 bits (Triton passes floats as fp32)."""
    x = float(x)
    hi = torch.tensor(x, dtype=torch.float32).item()
    if not (abs(hi) < float("inf")):
        return hi, 0.0
    lo = torch.tensor(x - hi, dtype=torch.float32).item()
    return hi, lo


def last_dim_unit_stride(x: torch.Tensor) -> torch.Tensor:
    """Kernels address rows by stride and the feature dim as contiguous (coalesced loads,
    dot-friendly tiles)."""
    return x if x.size(-1) <= 1 or x.stride(-1) == 1 else x.contiguous()


def pow2_at_least_16(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16 (``tl.dot`` needs >= 16 on a GPU)."""
    return max(16, triton.next_power_of_2(n))


def tile(cap: int, n: int | None = None) -> int:
    """A tile edge: 16 under the interpreter (small tiles keep interpreted kernels fast, and
    tests cover the block boundaries at 16); on a GPU ``cap``, or for a dimension of ``n``
    elements ``n`` rounded up to a power of two within ``[16, cap]``."""
    if INTERPRET:
        return 16
    return cap if n is None else max(16, min(cap, triton.next_power_of_2(n)))


@triton.jit
def program_tile(pid, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile of program ``pid`` on a grid of (batch, block of R rows, block of D columns),
    columns fastest: ``(b as int64, row offsets, column offsets, row mask, column mask)``."""
    num_db = tl.cdiv(D, BLOCK_D)
    num_rb = tl.cdiv(R, BLOCK_R)
    db = pid % num_db
    t = pid // num_db
    rb = t % num_rb
    b = (t // num_rb).to(tl.int64)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, offs_r, offs_d, offs_r < R, offs_d < D


@triton.jit
def exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def log(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def sqrt(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.sqrt_rn(x)
    elif x.dtype == tl.float64:
        return tl.sqrt(x)  # fp64 sqrt is correctly rounded; tl.sqrt_rn takes fp32 only
    else:
        return tl.sqrt_rn(x)
