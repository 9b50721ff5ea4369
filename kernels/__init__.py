"""Triton kernels of fastmeta, installed as the package ``fastmeta.kernels``.

One module per op stem (``prototypes.py``, ``proto_loss.py``, ...), each holding the
``@triton.jit`` kernels (``_<stem>_..._kernel``) and the Python launchers that
``fastmeta.ops.registry`` calls by name. Launchers take tensors on the kernel device (CUDA,
or the CPU under ``TRITON_INTERPRET=1``) and do no validation: the op contract files
``fastmeta/ops/_<stem>.py`` check inputs first.

This package imports nothing at import time, so ``import fastmeta`` works without Triton.
"""
