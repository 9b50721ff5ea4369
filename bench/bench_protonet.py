"""ProtoNet training throughput: the fused head vs the naive broadcast head, and the sampler.

A full training step (forward, backward, Adam) of ProtoNet with a Conv4 backbone on 28x28
glyphs, B episodes of 20-way 5-shot 15-query (the paper's Omniglot setup), in episodes/s:

* ``fastmeta``: :class:`fastmeta.learners.ProtoNet` (``ops.prototypes`` + fused ``ops.proto_loss``)
* ``naive head``: the same learner and backbone with the head of public ProtoNet code
  (mean over the reshaped support, ``((x[:,:,None]-y[:,None])**2).sum(-1)``, cross-entropy)
* ``sampler``: :func:`fastmeta.data.episodes` alone (uint8 gather + float conversion), to
  show data loading is not the bottleneck.

Usage: ``python bench/bench_protonet.py [--device cpu|cuda] [--batch 1] [--ways 20]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from fastmeta import data  # noqa: E402
from fastmeta.learners import ProtoNet  # noqa: E402
from fastmeta.nn import Conv4  # noqa: E402


class NaiveHeadProtoNet(ProtoNet):
    """ProtoNet with the head as written in public ProtoNet code (class-major support)."""

    def forward(self, support_x, support_y, query_x, query_y, n_way=None, reduction="mean"):
        zs, zq = self.embed(support_x, query_x)
        b, s, d = zs.shape
        n_way = int(support_y.max()) + 1 if n_way is None else n_way
        protos = zs.view(b, n_way, s // n_way, d).mean(2)  # support sorted by class
        dists = ((zq[:, :, None] - protos[:, None]) ** 2).sum(-1)
        loss = F.cross_entropy(-dists.flatten(0, 1), query_y.flatten())
        acc = (dists.argmin(-1) == query_y).float().mean()
        return loss, acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_common_args(p, "batch", "ways", "shots", "queries", "device", "budget", "no-save",
                            batch=1, ways=20, shots=5, queries=15, budget=10.0)
    a = _common.parse_args(p, argv)
    device = a.device
    _common.print_banner("ProtoNet training step", device)
    ds = data.load_dataset("glyphs", progress=False)

    def loader():
        return iter(data.episodes(ds, "train", a.ways, a.shots, a.queries, batch_size=a.batch, device=device))

    # the sampler alone
    it = loader()
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        next(it)
        n += 1
    sampler_eps = n * a.batch / (time.perf_counter() - t0)

    rows = [("sampler only", None, sampler_eps)]
    batch = next(loader())
    for name, cls in (("fastmeta", ProtoNet), ("naive head", NaiveHeadProtoNet)):
        torch.manual_seed(0)
        learner = cls(Conv4(1)).to(device)
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        sx, sy, qx, qy, _ = batch

        def step():
            loss, _ = learner(sx, sy, qx, qy, n_way=a.ways)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t = _common.time_fn(step, device=device, budget_s=a.budget, min_reps=5)
        rows.append((name, t, 1000.0 * a.batch / t["median_ms"]))

    title = (f"ProtoNet training step, Conv4, {a.ways}-way {a.shots}-shot {a.queries}-query 28x28, "
             f"B={a.batch}, {_common.device_name(device)}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads")
    print(title)
    print(f"  {'impl':<14}{'median ms':>11}{'p20':>9}{'p80':>9}{'episodes/s':>12}")
    for name, t, eps in rows:
        if t is None:
            print(f"  {name:<14}{'':>11}{'':>9}{'':>9}{eps:>12.1f}")
        else:
            print(f"  {name:<14}{t['median_ms']:>11.2f}{t['p20_ms']:>9.2f}{t['p80_ms']:>9.2f}{eps:>12.2f}")
    fused, naive = rows[1][2], rows[2][2]
    print(f"  fused head speedup over naive head: {fused / naive:.2f}x; sampler is "
          f"{sampler_eps / fused:.0f}x faster than a fused training step")
    if not a.no_save:
        info = _common.env_info(device)
        out = _common.RESULTS_DIR / f"protonet-{info['device_slug']}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for name, t, eps in rows:
                f.write(json.dumps(dict(bench="protonet_train_step", impl=name, episodes_per_s=eps,
                                        median_ms=t and t["median_ms"], ways=a.ways, shots=a.shots,
                                        queries=a.queries, batch=a.batch, **info)) + "\n")
        print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
