"""Per-call cost of small op calls: what a call pays besides its arithmetic (argument checks,
backend selection through ``fastmeta.ops.registry``, the autograd wrapper), at shapes where
that cost is most of the call.

Cases (float32, CPU, 1 thread unless ``--threads``):

* ``inner_update`` on the sinusoid MLP 1-40-40-1 (6 tensors, T = 25), float lr: ``nograd``
  (nothing requires grad: how ``inner_loop``'s forward calls it), ``graph`` (the gradients
  require grad: the eager autograd path of second-order MAML), ``metasgd fwd+bwd``
  (per-element lr tensors requiring grad, forward and the lr gradient);
* ``prototypes`` ``[2, 10, 16]`` -> 5 classes and ``proto_loss`` of ``[2, 15, 16]`` queries;
* ``task_hvp`` on the sinusoid MLP (T = 4, N = 10, analytic).

Each case is timed in blocks of ``--calls`` calls (process CPU time, so other processes on a
shared machine inflate it little at 1 thread); the table gives the median, p20 and p80 per
call over ``--blocks`` blocks.

``--against REV`` also times the tree of git revision ``REV`` (``git archive`` into a temporary
folder, this tree's built ``fastmeta/_C`` copied in), alternating fresh processes ``--rounds``
times (this tree, REV, this tree, ...), and prints the ratio REV / this tree per case: what
a change to the dispatch path did, measured interleaved in one run.

Script::

    python bench/bench_dispatch.py [--against REV] [--rounds 3] [--threads 1] [--calls 200]
        [--blocks 15] [--json]

Results: ``bench/results/dispatch.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

MLP = [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]


def cases() -> dict:
    """name -> zero-argument callable doing one call (inputs built once, here)."""
    import fastmeta

    T = 25
    ps = [torch.randn(T, *s) for s in MLP]
    gs = [torch.randn(T, *s) for s in MLP]
    gs_graph = [g.clone().requires_grad_() for g in gs]
    lrs = [torch.full(s, 0.1, requires_grad=True) for s in MLP]

    def metasgd():
        out = fastmeta.ops.inner_update(ps, gs, lrs)
        torch.autograd.grad(out, lrs, grad_outputs=gs)

    support, labels = torch.randn(2, 10, 16), torch.arange(10).remainder(5).expand(2, 10)
    query, protos, qlabels = torch.randn(2, 15, 16), torch.randn(2, 5, 16), torch.randint(0, 5, (2, 15))
    mlp = fastmeta.nn.TaskMLP([1, 40, 40, 1], "relu")
    p = fastmeta.func.task_function(mlp).expand(4)
    v = {k: torch.randn_like(t) for k, t in p.items()}
    x, y = torch.randn(4, 10, 1), torch.randn(4, 10, 1)
    return {
        "inner_update nograd": lambda: fastmeta.ops.inner_update(ps, gs, 0.4),
        "inner_update graph": lambda: fastmeta.ops.inner_update(ps, gs_graph, 0.4),
        "inner_update metasgd fwd+bwd": metasgd,
        "prototypes": lambda: fastmeta.ops.prototypes(support, labels, 5),
        "proto_loss": lambda: fastmeta.ops.proto_loss(query, protos, qlabels),
        "task_hvp analytic": lambda: fastmeta.func.task_hvp(mlp, p, x, y, v, loss_fn=F.mse_loss),
    }


def measure(calls: int, blocks: int) -> dict:
    """name -> per-call microseconds of every block (process CPU time)."""
    out = {}
    for name, call in cases().items():
        for _ in range(20):
            call()

        def block():
            for _ in range(calls):
                call()

        times = C.time_calls(block, device="cpu", reps=blocks, cpu_clock=True)["cpu_times_ms"]
        out[name] = [t * 1e3 / calls for t in times]
    return out


def _archive(rev: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="fastmeta-dispatch-"))
    tar = subprocess.run(["git", "archive", rev], cwd=C.REPO_ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)
    for so in (C.REPO_ROOT / "fastmeta").glob("_C*.so"):
        shutil.copy(so, root / "fastmeta" / so.name)
    return root


def _child(tree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--json", "--threads", str(args.threads),
           "--calls", str(args.calls), "--blocks", str(args.blocks)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if res.returncode != 0:
        raise SystemExit(f"timing {tree} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _row(name, times):
    xs = sorted(times)
    return [name, f"{statistics.median(xs):.1f}", f"{C._quantile(xs, 0.2):.1f}", f"{C._quantile(xs, 0.8):.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", help="git revision to compare with (interleaved processes)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations with --against")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed block")
    ap.add_argument("--blocks", type=int, default=15, help="timed blocks per case")
    ap.add_argument("--json", action="store_true", help="print one JSON line (used by --against)")
    C.add_common_args(ap, "threads", threads=1)
    args = C.parse_args(ap)
    if args.json:
        print(json.dumps(measure(args.calls, args.blocks)))
        return
    if not args.against:
        print(f"per-call CPU time, us ({args.threads} thread(s), {args.calls} calls x {args.blocks} blocks)")
        rows = [_row(n, t) for n, t in measure(args.calls, args.blocks).items()]
        print("\n".join(C.format_table(["case", "median us", "p20", "p80"], rows)))
        return
    other = _archive(args.against)
    here = C.REPO_ROOT
    runs = {"here": {}, "rev": {}}
    try:
        for _ in range(args.rounds):
            for label, tree in (("here", here), ("rev", other)):
                for name, times in _child(tree, args).items():
                    runs[label].setdefault(name, []).extend(times)
    finally:
        shutil.rmtree(other, ignore_errors=True)
    sha, dirty = C._git_sha()
    print(f"per-call CPU time, us: this tree ({sha[:10]}{' + uncommitted' if dirty else ''}) vs "
          f"{args.against}, {args.rounds} interleaved rounds, {args.threads} thread(s), "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for name in runs["here"]:
        a, b = statistics.median(runs["here"][name]), statistics.median(runs["rev"].get(name, [float("nan")]))
        rows.append([name, f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}"])
    print("\n".join(C.format_table(["case", "this tree", args.against, "ratio (rev / this)"], rows)))


if __name__ == "__main__":
    main()
