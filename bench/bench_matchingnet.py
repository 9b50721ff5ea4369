"""MatchingNet training throughput: the fused cosine-attention head vs the eager head.

A full training step (forward, backward, Adam) of MatchingNet with a Conv4 backbone on 28x28
glyphs, B episodes of 5-way 1-shot 15-query (the paper's Omniglot setup), in episodes/s,
without and with full context embeddings (FCE):

* ``fused``: :class:`fastmeta.learners.MatchingNet` (head = ``ops.matching_loss``)
* ``eager head``: the same learner and backbone with the head of public Matching Networks
  code: normalise, bmm, softmax over the support, bmm with the one-hot labels, log, NLL.

The backbone (and with FCE the LSTMs) dominates a step at these shapes, so the head's share
bounds the speedup; ``bench/bench_matching.py`` times the op alone. The implementations are
timed in interleaved rounds (a few steps of each, round after round) so that on a shared
machine they see the same load; a row's median/p20/p80 are over its per-round medians.

Accuracy (glyphs 5-way 1/5-shot, +- 95% CI) comes from the CLI, e.g.
``python -m fastmeta train matching --shots 1 [--fce] --minutes 1.5``.

Usage: ``python bench/bench_matchingnet.py [--device cpu|cuda] [--batch 1] [--shots 1]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from fastmeta import data  # noqa: E402
from fastmeta.learners import MatchingNet  # noqa: E402
from fastmeta.nn import Conv4  # noqa: E402


class EagerHeadMatchingNet(MatchingNet):
    """MatchingNet with the head as written in public Matching Networks code."""

    def forward(self, support_x, support_y, query_x, query_y, n_way=None, reduction="mean"):
        zs, zq = self.embed(support_x, query_x)
        n_way = int(support_y.max()) + 1 if n_way is None else n_way
        sim = self.scale * torch.bmm(F.normalize(zq, dim=-1), F.normalize(zs, dim=-1).transpose(1, 2))
        attn = sim.softmax(-1)  # [B,Q,S]
        probs = torch.bmm(attn, F.one_hot(support_y, n_way).to(attn.dtype))  # [B,Q,N]
        logp = torch.log(probs.clamp_min(1e-12))
        loss = F.nll_loss(logp.flatten(0, 1), query_y.flatten())
        acc = (probs.argmax(-1) == query_y).float().mean()
        return loss, acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: from --budget)")
    p.add_argument("--no-fce", action="store_true", help="skip the FCE rows")
    _common.add_common_args(p, "batch", "ways", "shots", "queries", "device", "threads", "budget", "no-save",
                            batch=1, ways=5, shots=1, queries=15, budget=10.0)
    a = _common.parse_args(p, argv)
    device = a.device
    _common.print_banner("Matching Networks training step", device)
    ds = data.load_dataset("glyphs", progress=False)
    sx, sy, qx, qy, _ = next(iter(data.episodes(ds, "train", a.ways, a.shots, a.queries,
                                                batch_size=a.batch, device=device)))
    dim = Conv4(1).eval()(sx[0, :1]).shape[1]

    def make_step(cls, fce):
        torch.manual_seed(0)
        learner = cls(Conv4(1), fce=fce, embed_dim=dim).to(device)
        opt = torch.optim.Adam(learner.parameters(), 1e-3)

        def step():
            loss, _ = learner(sx, sy, qx, qy, n_way=a.ways)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    impls = [(fce, name, make_step(cls, fce)) for fce in ((False,) if a.no_fce else (False, True))
             for name, cls in (("fused", MatchingNet), ("eager head", EagerHeadMatchingNet))]
    est = [_common.time_fn(step, device=device, warmup=2, reps=3)["median_ms"] for _, _, step in impls]
    rounds = a.rounds or max(5, int(a.budget * 1000 / (5 * max(est))))
    per_round = [[] for _ in impls]
    for _ in range(rounds):
        for i, (_, _, step) in enumerate(impls):
            per_round[i].append(_common.time_fn(step, device=device, warmup=1, reps=5)["median_ms"])
    rows = []
    for (fce, name, _), ms in zip(impls, per_round):
        t = _common.summarize_ms(ms)
        rows.append((fce, name, t, 1000.0 * a.batch / t["median_ms"]))

    title = (f"MatchingNet training step, Conv4, {a.ways}-way {a.shots}-shot {a.queries}-query 28x28 glyphs, "
             f"B={a.batch}, {_common.device_name(device)}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {rounds} interleaved rounds of 5 steps")
    print(title)
    print(f"  {'fce':<6}{'head':<12}{'median ms':>11}{'p20':>9}{'p80':>9}{'episodes/s':>12}")
    for fce, name, t, eps in rows:
        print(f"  {str(fce):<6}{name:<12}{t['median_ms']:>11.2f}{t['p20_ms']:>9.2f}{t['p80_ms']:>9.2f}{eps:>12.2f}")
    for i in range(0, len(rows), 2):
        print(f"  fce={rows[i][0]}: fused head speedup over eager head: {rows[i][3] / rows[i + 1][3]:.2f}x")
    if not a.no_save:
        info = _common.env_info(device)
        out = _common.RESULTS_DIR / f"matchingnet-{info['device_slug']}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for fce, name, t, eps in rows:
                f.write(json.dumps(dict(bench="matchingnet_train_step", impl=name, fce=fce, episodes_per_s=eps,
                                        median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                                        ways=a.ways, shots=a.shots, queries=a.queries, batch=a.batch, rounds=rounds,
                                        **info)) + "\n")
        print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
