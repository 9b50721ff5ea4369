"""What per-episode BatchNorm costs: a ProtoNet / MatchingNet training step with the backbone's
BatchNorm per episode (``episode_bn=None``, the default: :mod:`fastmeta.nn.episode`) against
whole-batch BatchNorm (``episode_bn=False``: one plain backbone call, the code before it).

A step = forward, backward and Adam on one fixed batch of ``B`` 5-way 1-shot 15-query glyph-
sized episodes (random 28x28 images; speed does not depend on the pixels), Conv4-64. The two
modes alternate step by step (interleaved, so machine load hits both alike); each step is timed
in wall-clock and in this process's CPU time (``time.process_time``; more robust on a loaded
machine, equal to wall time on a quiet one with one thread).

Usage: ``python bench/bench_episode_bn.py [--batch 8] [--steps 20] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from fastmeta.learners import MatchingNet, ProtoNet  # noqa: E402
from fastmeta.nn import Conv4  # noqa: E402

MODES = {"per-episode": None, "whole-batch": False}


def make_batch(b: int, ways: int = 5, shots: int = 1, queries: int = 15, size: int = 28):
    g = torch.Generator().manual_seed(0)
    sy = torch.arange(ways).repeat_interleave(shots).expand(b, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(b, -1).contiguous()
    return (torch.rand(b, ways * shots, 1, size, size, generator=g), sy,
            torch.rand(b, ways * queries, 1, size, size, generator=g), qy)


def build(learner: str, episode_bn):
    torch.manual_seed(0)
    if learner == "protonet":
        model = ProtoNet(Conv4(1), episode_bn=episode_bn)
    else:
        model = MatchingNet(Conv4(1), episode_bn=episode_bn)
    return model, torch.optim.Adam(model.parameters(), 1e-3)


def step(model, opt, batch) -> float:
    loss, _ = model(*batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode (after 3 warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--learners", default="protonet,matching")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = _common.env_info(torch.device("cpu"))
    print(f"# {info.get('device_name', _common.cpu_model())}, torch {torch.__version__}, "
          f"git {info.get('git_sha')}, {a.threads} thread(s), load {_common._loadavg()}")
    print(f"{'learner':>9} {'B':>3} {'mode':>12} {'wall ms':>9} {'cpu ms':>9} {'cpu ratio':>10}")
    for learner in _common.comma_list(a.learners):
        for b in a.batch:
            batch = make_batch(b)
            runs = {m: build(learner, e) for m, e in MODES.items()}
            wall = {m: [] for m in MODES}
            cpu = {m: [] for m in MODES}
            for i in range(a.steps + 3):
                for m, (model, opt) in runs.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    loss = step(model, opt, batch)
                    t1, c1 = time.perf_counter(), time.process_time()
                    if not loss == loss:
                        raise SystemExit(f"{learner} {m}: loss is NaN")
                    if i >= 3:
                        wall[m].append(1e3 * (t1 - t0))
                        cpu[m].append(1e3 * (c1 - c0))
            base = statistics.median(cpu["whole-batch"])
            for m in MODES:
                w, c = statistics.median(wall[m]), statistics.median(cpu[m])
                print(f"{learner:>9} {b:>3} {m:>12} {w:9.1f} {c:9.1f} {c / base:9.3f}x", flush=True)
    print(f"# load at the end {_common._loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
