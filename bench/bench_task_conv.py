"""Ablation of TaskConv4's CPU speed-ups on the second-order MAML meta-step.

One meta-step = ``inner_loop`` (k steps, second order) on the support set, the query loss,
``backward``: TaskConv4 (hidden 64, 28x28, 1 channel), 5-way 1-shot (5 support and 75 query
images per task), k=5, lr 0.4. The variants switch off one of the choices in
``fastmeta/nn/task.py`` at a time and run interleaved in one process (round robin), so load
changes on a shared machine hit all of them alike:

* ``default``: channels_last for grouped convs on maps >= 14x14, ``GroupedConvFunction`` (grouped
  double backward in one call), ``MaxPool2dFunction`` (no zeros tensor in the double backward);
* ``nchw``: no channels_last;
* ``torch_conv``: ``F.conv2d``'s own double backward (one conv per task for the weight term);
* ``torch_pool``: ``F.max_pool2d``'s own double backward.

Time is the thread's CPU time (``time.thread_time``) at 1 thread by default; the table has
the median and min per variant and the 1-minute load average at the end.

Usage::

    python bench/bench_task_conv.py [--tasks 32] [--reps 4] [--k 5] [--threads 1]
        [--variants default,nchw,torch_conv,torch_pool]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402
import fastmeta.nn.task as TK  # noqa: E402
from fastmeta.func import inner_loop, task_function, task_losses  # noqa: E402
from fastmeta.nn import TaskConv4  # noqa: E402


class _TorchConv:
    @staticmethod
    def apply(h, w, b, cfg):
        return F.conv2d(h, w, b, *cfg)


class _TorchPool:
    @staticmethod
    def apply(h, *args):
        return F.max_pool2d(h, *args)


def _set(variant: str, saved: dict) -> None:
    TK.CHANNELS_LAST_MIN_PIXELS = 1 << 62 if variant == "nchw" else saved["px"]
    TK.GroupedConvFunction = _TorchConv if variant == "torch_conv" else saved["conv"]
    TK.MaxPool2dFunction = _TorchPool if variant == "torch_pool" else saved["pool"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--variants", default="default,nchw,torch_conv,torch_pool")
    C.add_common_args(ap, "threads", threads=1)
    a = C.parse_args(ap)
    saved = {"px": TK.CHANNELS_LAST_MIN_PIXELS, "conv": TK.GroupedConvFunction, "pool": TK.MaxPool2dFunction}
    T, S, Q = a.tasks, 5, 75
    torch.manual_seed(0)
    model = TaskConv4(1, 5, 64, 28)
    fn = task_function(model)
    sx, sy = torch.randn(T, S, 1, 28, 28), torch.randint(0, 5, (T, S))
    qx, qy = torch.randn(T, Q, 1, 28, 28), torch.randint(0, 5, (T, Q))

    def step():
        for p in model.parameters():
            p.grad = None
        fast = inner_loop(fn, fn.expand(T), sx, sy, a.k, 0.4)
        task_losses(F.cross_entropy, fn(fast, qx), qy).mean().backward()

    variants = a.variants.split(",")
    times = {v: [] for v in variants}
    for rep in range(a.reps + 1):  # rep 0 warms up
        for v in variants:
            _set(v, saved)
            t = time.thread_time()
            step()
            if rep:
                times[v].append(time.thread_time() - t)
    _set("default", saved)
    print(f"TaskConv4 meta-step, T={T}, k={a.k}, {a.threads} thread(s), thread CPU s, "
          f"load {os.getloadavg()[0]:.1f}")
    for v in variants:
        print(f"  {v:11s} median {statistics.median(times[v]):7.3f}  min {min(times[v]):7.3f}")


if __name__ == "__main__":
    main()
