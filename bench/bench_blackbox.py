"""Black-box learners: training throughput, and how SNAIL scales with the sequence length.

1. **Throughput**: a full training step (forward, backward, Adam) of each learner as the CLI
   builds it (``python -m fastmeta train <name> --ways 5 --shots 1``: ProtoNet Conv4-64;
   MANN and SNAIL Conv4-32 and quarter-width sequence nets; MetaLSTM the paper's 32-channel
   learner, 5 inner steps; MAML second order, the CLI's Conv4 with per-task BatchNorm, one
   inner step; 15 queries per class, ``--batch`` episodes a step) on glyphs 5-way 1-shot, in
   episodes/s, with ProtoNet for reference. The episode batch is drawn once (the sampler is timed in
   ``bench_protonet.py``; it is not the bottleneck).
2. **SNAIL sequence-length scaling**: forward+backward of SNAIL's sequence model (the paper's
   TC/attention stack, attention through ``scaled_dot_product_attention(is_causal=True)``)
   over ``B`` sequences of ``S`` support steps and one query, ``S = 5..500``, the
   cross-entropy at the query step; time (median, p20/p80) and peak memory beyond the
   inputs. The model is rebuilt for each ``S`` (``seq_len = S + 1``: the TC blocks have
   ``ceil(log2(S + 1))`` dense layers, so the channel count grows with ``log S``). The
   embedding is left out (it costs the same per image whatever ``S`` is). For reference the
   same model with the attention written out (``softmax(q k^T / sqrt(d) + mask) v``, the
   ``T x T`` matrix materialised) shows what SDPA saves.

Prints the tables, appends JSON rows to ``bench/results/blackbox-<device>.jsonl`` and saves
the scaling plot as ``bench/results/snail-scaling-<device>.png``.

Usage: ``python bench/bench_blackbox.py [--device cpu|cuda] [--batch 1] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from fastmeta import cli, data  # noqa: E402
from fastmeta.learners import SNAIL  # noqa: E402

LEARNERS = ("protonet", "mann", "snail", "metalstm", "maml")


def throughput(device, ds, batch: int, shots: int, budget: float) -> list[dict]:
    rows = []
    for name in LEARNERS:
        spec = cli.LEARNERS[name]
        args = cli.build_parser().parse_args(["train", name, "--ways", "5", "--shots", str(shots),
                                              "--batch", str(batch), "--device", str(device)])
        cli.resolve_defaults(args, spec)  # the learner's own defaults, as `fastmeta train` fills them
        torch.manual_seed(0)
        learner = spec.build(args, ds.image_shape[0]).to(device)
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        sx, sy, qx, qy, _ = next(iter(data.episodes(ds, "train", 5, shots, args.queries, batch_size=batch,
                                                    shuffle=spec.shuffle, device=device)))

        def step():
            loss, _ = learner(sx, sy, qx, qy, n_way=5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t = _common.time_fn(step, device=device, budget_s=budget, min_reps=5)
        rows.append(dict(bench="blackbox_train_step", learner=name, ways=5, shots=shots, queries=args.queries,
                         batch=batch, params=sum(p.numel() for p in learner.parameters()),
                         episodes_per_s=1000.0 * batch / t["median_ms"], **t))
    return rows


def _naive_sdpa(q, k, v, attn_mask=None, is_causal=False, **_):
    """Attention with the score matrix materialised (the scaling baseline only)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@contextlib.contextmanager
def _attention(impl):
    real = F.scaled_dot_product_attention
    if impl == "naive":
        F.scaled_dot_product_attention = _naive_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def scaling(device, sizes, batch: int, budget: float) -> list[dict]:
    rows = []
    d, n = 64, 5
    for s in sizes:
        torch.manual_seed(0)
        model = SNAIL(torch.nn.Identity(), d, n, seq_len=s + 1).to(device)
        seq = torch.randn(batch, s + 1, d + n, device=device)
        labels = torch.randint(0, n, (batch,), device=device)
        params = [p for p in model.parameters()]

        def fwd_bwd():
            out = model.forward_sequence(seq)[:, -1]
            return torch.autograd.grad(F.cross_entropy(out, labels), params)

        for impl in ("sdpa", "naive"):
            with _attention(impl):
                t = _common.time_fn(fwd_bwd, device=device, budget_s=budget, min_reps=3)
                mem = _common.peak_memory_bytes(fwd_bwd, device=device)
            rows.append(dict(bench="snail_seq_scaling", impl=impl, support=s, seq_len=s + 1, batch=batch,
                             channels=model.head.in_features, peak_bytes=mem, **t))
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for impl, style in (("sdpa", "o-"), ("naive", "s--")):
        pts = [r for r in rows if r["impl"] == impl]
        s = [r["support"] for r in pts]
        ax1.errorbar(s, [r["median_ms"] for r in pts],
                     yerr=[[r["median_ms"] - r["p20_ms"] for r in pts], [r["p80_ms"] - r["median_ms"] for r in pts]],
                     fmt=style, label=f"SNAIL ({'SDPA' if impl == 'sdpa' else 'attention written out'})")
        if all(r["peak_bytes"] for r in pts):
            ax2.plot(s, [r["peak_bytes"] / 2**20 for r in pts], style, label=impl)
    ref = [r for r in rows if r["impl"] == "sdpa"]
    if ref:
        s0, t0 = ref[0]["support"], ref[0]["median_ms"]
        xs = [r["support"] for r in ref]
        ax1.plot(xs, [t0 * x / s0 for x in xs], ":", color="gray", label="linear in S")
    for ax, lab in ((ax1, "forward+backward time (ms)"), (ax2, "peak memory beyond inputs (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("support examples S (sequence length S + 1)")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-batch", type=int, default=4, help="sequences per call (scaling)")
    p.add_argument("--sizes", default="5,10,20,50,100,200,500", help="support sizes S (scaling)")
    p.add_argument("--quick", action="store_true", help="short budget, S = 5,50,500")
    p.add_argument("--skip", choices=["throughput", "scaling"], default=None)
    _common.add_common_args(p, "batch", "shots", "device", "budget", "no-save", batch=1, shots=1, budget=4.0)
    a = _common.parse_args(p, argv)
    if a.quick:
        a.budget, a.sizes = 1.0, "5,50,500"
    device = a.device
    info = _common.print_banner("black-box learners benchmark", device)
    head = f"{_common.device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    rows = []
    if a.skip != "throughput":
        ds = data.load_dataset("glyphs", progress=False)
        tp = throughput(device, ds, a.batch, a.shots, a.budget)
        rows += tp
        print(f"\nTraining step (forward, backward, Adam), glyphs 5-way {a.shots}-shot 15 queries/class, "
              f"B={a.batch} episodes/step, CLI-built learners, {head}")
        print(f"  {'learner':<10}{'params':>10}{'median ms':>11}{'p20':>9}{'p80':>9}{'episodes/s':>12}")
        for r in tp:
            print(f"  {r['learner']:<10}{r['params']:>10,}{r['median_ms']:>11.1f}{r['p20_ms']:>9.1f}"
                  f"{r['p80_ms']:>9.1f}{r['episodes_per_s']:>12.2f}")
    if a.skip != "scaling":
        sizes = [int(x) for x in a.sizes.split(",")]
        sc = scaling(device, sizes, a.seq_batch, a.budget)
        rows += sc
        print(f"\nSNAIL sequence model forward+backward vs support size S ({a.seq_batch} sequences of S + 1 "
              f"steps, embedding 64, 5-way, paper architecture), {head}")
        print(f"  {'S':>5}{'channels':>10}{'impl':>7}{'median ms':>11}{'p20':>9}{'p80':>9}{'ms / step':>11}"
              f"{'peak MiB':>10}")
        for r in sc:
            mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
            print(f"  {r['support']:>5}{r['channels']:>10}{r['impl']:>7}{r['median_ms']:>11.2f}{r['p20_ms']:>9.2f}"
                  f"{r['p80_ms']:>9.2f}{r['median_ms'] / r['seq_len']:>11.3f}{mem:>10}")
        if not a.no_save:
            png = _common.RESULTS_DIR / f"snail-scaling-{info['device_slug']}.png"
            plot(sc, png, f"SNAIL forward+backward vs sequence length, {head}")
            print(f"plot saved to {png}")
    if not a.no_save:
        out = _common.RESULTS_DIR / f"blackbox-{info['device_slug']}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, **info)) + "\n")
        print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
