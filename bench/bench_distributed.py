"""Benchmark: meta-steps/s of meta-training on several processes (torch.distributed, torchrun)
against one process, on this machine.

Modes, for each config, interleaved in rounds within one run (so machine load hits all alike):

* ``1p x 1t``: one process, 1 intra-op thread, the whole global batch;
* ``2p x 1t``: ``torchrun --nproc_per_node=2``, 1 thread each, half the batch each
  (:func:`fastmeta.distributed.shard`), gradients averaged (:func:`all_reduce_gradients`, gloo);
* ``1p x 2t``: one process, 2 intra-op threads, the whole batch.

Configs (``--quick``: smaller widths and batches, to check the script runs):

* ``protonet-conv4``: ProtoNet, Conv4-64, 5-way 1-shot, 15 queries per class, 8 episodes per step;
* ``maml-conv4``: second-order MAML, 1 inner step, task-batched Conv4-64 (per-task BatchNorm),
  5-way 1-shot, 15 queries per class, 8 tasks per step.

A *meta-step* is what :class:`fastmeta.train.Trainer` does per step: take this rank's shard of
the global batch, forward, backward, average the gradients over the ranks, Adam step. Each
(round, config, mode) is a fresh ``torchrun`` job (the 1-process modes too, with one process,
so they pay the same launcher): ``--warmup`` steps, then ``--steps`` timed ones; rank 0
reports the median wall time per step (p20/p80) and the median time of the gradient
all-reduce inside it (on rank 0: the communication plus any wait for a slower rank). ``scaling`` = median step of ``1p x 1t`` / median step of the mode (over
all rounds); the issue's target: >= 1.7 for ``2p x 1t`` on ``maml-conv4``.

Run (quiet machine; ~10 min)::

    python bench/bench_distributed.py                 # 3 rounds, both configs, all modes
    python bench/bench_distributed.py --quick --no-save   # a check that it works (~1-2 min)
    python bench/bench_distributed.py --device cuda --modes "1p x 1t,2p x 1t"   # 2 GPUs, NCCL

Rows are appended to ``bench/results/distributed-<device>.jsonl`` (with git sha, torch version,
load average); bench/results/distributed.md holds the numbers and the state of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_jsonl, comma_list, format_table, print_banner, summarize_ms  # noqa: E402

from fastmeta import distributed  # noqa: E402
from fastmeta.learners import MAML, EpisodicLearner, ProtoNet  # noqa: E402
from fastmeta.nn import Conv4, TaskConv4  # noqa: E402

MODES = {"1p x 1t": (1, 1), "2p x 1t": (2, 1), "1p x 2t": (1, 2)}  # name -> (processes, threads each)
CONFIGS = ("protonet-conv4", "maml-conv4")
SIZES = {False: dict(hidden=64, batch=8), True: dict(hidden=16, batch=4)}  # --quick: True


def build(config: str, quick: bool):
    """``(learner, global batch)`` of ``config``: 5-way 1-shot 28x28 episodes, 15 queries per class."""
    s = SIZES[quick]
    torch.manual_seed(0)
    if config == "protonet-conv4":
        learner = ProtoNet(Conv4(1, s["hidden"]))
    else:
        learner = EpisodicLearner(MAML(TaskConv4(1, n_way=5, hidden=s["hidden"], image_size=28), 0.4), steps=1,
                                  loss_fn=F.cross_entropy)
    b, n, q = s["batch"], 5, 15
    batch = (torch.rand(b, n, 1, 28, 28), torch.arange(n).repeat(b, 1),
             torch.rand(b, n * q, 1, 28, 28), torch.arange(n).repeat_interleave(q).repeat(b, 1))
    return learner, batch


def worker(args) -> None:
    """One rank of a timed job (under torchrun); rank 0 prints ``RESULT {json}``."""
    torch.set_num_threads(args.threads)
    with distributed.session():  # nccl on CUDA: this rank's GPU is cuda:LOCAL_RANK
        device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        learner, batch = build(args.config, args.quick)
        learner, batch = learner.to(device), tuple(t.to(device) for t in batch)
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        step_ms, reduce_ms = [], []

        def now():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        for i in range(args.warmup + args.steps):
            t0 = now()
            loss, _ = learner(*distributed.shard(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = now()
            distributed.all_reduce_gradients(learner)
            t2 = now()
            opt.step()
            if distributed.is_active():  # every rank finishes the step before the clock stops
                distributed.any_rank(False)
            t3 = now()
            if i >= args.warmup:
                step_ms.append(1e3 * (t3 - t0))
                reduce_ms.append(1e3 * (t2 - t1))
        if distributed.is_main():
            print("RESULT " + json.dumps(dict(step=summarize_ms(step_ms), reduce_ms=statistics.median(reduce_ms),
                                              world=distributed.world_size(), threads=torch.get_num_threads())),
                  flush=True)


def launch(config: str, mode: str, args) -> dict:
    procs, threads = MODES[mode]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           os.path.abspath(__file__), "--worker", "--config", config, "--threads", str(threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    cmd += ["--quick"] if args.quick else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    load = round(os.getloadavg()[0], 2)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{config} {mode} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]), config=config, mode=mode, loadavg_before=load)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every (config, mode)")
    p.add_argument("--steps", type=int, default=10, help="timed meta-steps per job")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small widths and batches, 1 round, 3 steps")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: one GPU per process (nccl); the 2-process mode needs 2 GPUs")
    # worker side (set by launch)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    configs, modes = comma_list(args.configs), comma_list(args.modes)
    for name, known in (("configs", CONFIGS), ("modes", MODES)):
        bad = [c for c in (configs if name == "configs" else modes) if c not in known]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}; choose from {list(known)}")
    print_banner("bench_distributed", torch.device(args.device))
    rows = []
    for rnd in range(args.rounds):
        for config in configs:
            for mode in modes:
                row = launch(config, mode, args)
                rows.append(dict(row, round=rnd))
                print(f"round {rnd} {config:15s} {mode}: {row['step']['median_ms']:9.1f} ms/step "
                      f"(all-reduce {row['reduce_ms']:.2f} ms), load {row['loadavg_before']}", flush=True)
    body = []
    for config in configs:
        med = {m: statistics.median(r["step"]["median_ms"] for r in rows if r["config"] == config and r["mode"] == m)
               for m in modes}
        for m in modes:
            mine = [r for r in rows if r["config"] == config and r["mode"] == m]
            red = statistics.median(r["reduce_ms"] for r in mine)
            base = med.get("1p x 1t")
            body.append([config, m, f"{med[m]:.1f}", f"{min(r['step']['p20_ms'] for r in mine):.1f}",
                         f"{max(r['step']['p80_ms'] for r in mine):.1f}", f"{1e3 / med[m]:.2f}",
                         f"{base / med[m]:.2f}x" if base else "-", f"{red:.2f}" if MODES[m][0] > 1 else "-"])
    print("\n".join(format_table(["config", "mode", "ms/step", "p20 min", "p80 max", "steps/s", "scaling",
                                  "all-reduce ms"], body)))
    if not args.no_save:
        # a row's own "threads" (per rank) would collide with env_info's (this process's)
        saved = [{("rank_threads" if k == "threads" else k): v for k, v in r.items()} for r in rows]
        path = append_jsonl(saved, "distributed", torch.device(args.device), extra=dict(quick=args.quick))
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
