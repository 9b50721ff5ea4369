"""learn2learn's vision models and a MAML-PyTorch-style functional ``Learner``, UNMODIFIED:
``fastmeta.MAML(model).meta_loss`` vs the learn2learn-style per-task ``clone()``/``adapt()`` loop (through ``fastmeta.MAML.clone/adapt``,
which runs at learn2learn's speed), second-order MAML, one meta-step (forward + backward).

Method: float64 gate first (meta-gradients of both against each other, relative error
``||a - b|| / ||b||`` per parameter, must be <= 1e-10, on a 3-task batch of the same model,
which meta_loss's default runs in chunks where the model is large: see ``--gate-tasks``);
then float32 timing, the two rows interleaved call by call in the same process and thread
count (median and p20/p80 of the per-call times; also the process CPU time of each call, which
on a shared machine is less disturbed by the other processes than the wall clock). Results: a
table on stdout, JSON lines under
bench/results/ (``dropin-<device>.jsonl``), and with ``--md`` a Markdown table appended there.

    OMP_NUM_THREADS=1 python bench/bench_dropin.py --threads 1 --small   # a quick check
    python bench/bench_dropin.py --threads 1,0 --md bench/results/dropin.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from _dropin_models import (Learner, MiniImagenetCNN, OmniglotCNN, OmniglotFC, clone_adapt_loss, learner_config,
                            mini_embedding)

import fastmeta
from fastmeta.func import auto_task_chunk, task_function


def make_model(name: str, small: bool):
    """-> (model, per-example input shape). Full sizes are learn2learn's examples'."""
    if name == "OmniglotFC":
        return (OmniglotFC(16, 5, (32, 16)), (1, 4, 4)) if small else (OmniglotFC(28 * 28, 5), (1, 28, 28))
    if name in ("OmniglotCNN", "OmniglotCNN-untied"):
        tied = name == "OmniglotCNN"
        if small:
            return OmniglotCNN(5, 8, 2, size=8, tied=tied), (1, 8, 8)
        return OmniglotCNN(5, 64, 4, size=28, tied=tied), (1, 28, 28)
    if name == "MiniImagenetCNN":
        if small:
            return MiniImagenetCNN(5, 8, 4, 3, embedding_size=mini_embedding(8, 16)), (3, 16, 16)
        return MiniImagenetCNN(5, 32, 4, 3), (3, 84, 84)  # learn2learn's maml_miniimagenet: hidden 32
    if name == "Learner-miniimagenet":  # MAML-PyTorch's functional Learner, its mini-ImageNet layers
        return Learner(learner_config("miniimagenet", 5, 8 if small else None)), (3, 84, 84)
    if name == "Learner-omniglot":
        return Learner(learner_config("omniglot", 5, 8 if small else None)), (1, 28, 28)
    raise ValueError(f"unknown model {name!r}")


def episode(T, ways, shots, query, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, ways * shots, *shape, generator=g).to(dtype)
    qx = torch.randn(T, ways * query, *shape, generator=g).to(dtype)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(T, 1)
    qy = torch.arange(ways).repeat_interleave(query).repeat(T, 1)
    return sx, sy, qx, qy


def fastmeta_step(maml, data, steps):
    loss = maml.meta_loss(*data, steps=steps).loss
    return torch.autograd.grad(loss, list(maml.module.parameters()))


def clone_adapt_step(maml, data, steps):
    return torch.autograd.grad(clone_adapt_loss(maml, data, steps), list(maml.module.parameters()))


IMPLS = {"fastmeta meta_loss": fastmeta_step, "clone/adapt loop": clone_adapt_step}


def gate(name, steps, args) -> float:
    """Largest relative meta-gradient difference (float64) between the two rows: per parameter
    ``||a - b|| / max(||b||, 1e-4 ||b_all||)`` (a bias right before BatchNorm has a zero gradient
    up to rounding; the floor keeps its rounding from counting as an error)."""
    torch.manual_seed(0)
    model, shape = make_model(name, args.small)
    model = model.double()
    data = episode(args.gate_tasks, args.ways, args.shots, args.query, shape, torch.float64, seed=1)
    maml = fastmeta.MAML(model, lr=inner_lr(name, args))
    chunk = chunk_of(maml, data, steps)
    if chunk:
        print(f"gate {name} k={steps}: meta_loss runs {args.gate_tasks} tasks in chunks of {chunk}")
    a = fastmeta_step(maml, data, steps)
    b = clone_adapt_step(maml, data, steps)
    floor = 1e-4 * torch.cat([y.flatten() for y in b]).norm()
    return max(((x - y).norm() / torch.maximum(y.norm(), floor)).item() for x, y in zip(a, b))


def inner_lr(name, args) -> float:
    if args.lr is not None:
        return args.lr
    return 0.01 if name == "Learner-miniimagenet" else 0.4


def chunk_of(maml, data, steps):
    """The task chunk meta_loss's default (``task_chunk="auto"``) takes on this batch."""
    fn = maml.task_function()
    return auto_task_chunk(fn, fn.expand(data[0].shape[0]), data[0], data[1], steps)


def time_pair(name, steps, args):
    torch.manual_seed(0)
    model, shape = make_model(name, args.small)
    maml = fastmeta.MAML(model, lr=inner_lr(name, args))
    data = episode(args.T, args.ways, args.shots, args.query, shape, torch.float32, seed=2)
    fns = {k: (lambda f=f: f(maml, data, steps)) for k, f in IMPLS.items()}
    for _ in range(args.warmup):  # warm-up (plans the task function; the heap reaches its peak)
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    t_end = time.perf_counter() + args.budget
    rounds = 0
    while rounds < args.min_rounds or (time.perf_counter() < t_end and rounds < args.max_rounds):
        for k, f in fns.items():
            r = C.time_calls(f, device="cpu", reps=1, cpu_clock=True)
            times[k].extend(r["times_ms"])
            cpu[k].extend(r["cpu_times_ms"])
        rounds += 1
    chunk = chunk_of(maml, data, steps)
    path = task_function(model).path + (f", chunks of {chunk}" if chunk else "")
    return ({k: C.summarize_ms(v) for k, v in times.items()},
            {k: C.summarize_ms(v) for k, v in cpu.items()}, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="OmniglotFC,OmniglotCNN,OmniglotCNN-untied,MiniImagenetCNN,"
                                        "Learner-omniglot,Learner-miniimagenet")
    p.add_argument("--steps", default="1,5")
    p.add_argument("--threads", default="1", help="comma list; 0 = torch's default")
    p.add_argument("--T", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query", type=int, default=1, help="query examples per class (learn2learn's examples: shots)")
    p.add_argument("--lr", type=float, default=None,
                   help="inner lr (default: 0.4 as learn2learn's examples; Learner-miniimagenet 0.01 as "
                        "MAML-PyTorch's mini-ImageNet run, where 0.4 diverges: query loss 240 after 5 steps)")
    p.add_argument("--gate-tasks", type=int, default=3,
                   help="tasks of the float64 gate (3: MiniImagenetCNN's meta_loss then runs in chunks of 2 + 1)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of interleaved rounds per configuration")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed rounds first (MiniImagenetCNN's heap grows for 2-3 steps)")
    p.add_argument("--max-rounds", type=int, default=50)
    p.add_argument("--small", action="store_true", help="tiny model sizes (a quick check)")
    p.add_argument("--md", default=None, help="append a Markdown table to this file")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    rows, records = [], []
    for threads in [int(s) for s in args.threads.split(",")]:
        torch.set_num_threads(threads or default_threads)
        nthr = torch.get_num_threads()
        for name in args.models.split(","):
            for steps in [int(s) for s in args.steps.split(",")]:
                err = gate(name, steps, args)
                ok = err <= 1e-10
                if not ok:
                    print(f"WRONG {name} k={steps}: meta-gradients differ by {err:.2e} (float64)")
                    rows.append([name, str(steps), str(nthr), *["-"] * 6, f"{err:.1e} WRONG"])
                    continue
                stats, cpu, path = time_pair(name, steps, args)
                fm, l2l = stats["fastmeta meta_loss"], stats["clone/adapt loop"]
                speed = l2l["median_ms"] / fm["median_ms"]
                cfm, cl2l = cpu["fastmeta meta_loss"], cpu["clone/adapt loop"]
                cspeed = cl2l["median_ms"] / cfm["median_ms"]
                rows.append([name, str(steps), str(nthr), path,
                             f"{fm['median_ms']:.1f} [{fm['p20_ms']:.1f}-{fm['p80_ms']:.1f}]",
                             f"{l2l['median_ms']:.1f} [{l2l['p20_ms']:.1f}-{l2l['p80_ms']:.1f}]",
                             f"{speed:.2f}x", f"{cfm['median_ms']:.1f} / {cl2l['median_ms']:.1f}",
                             f"{cspeed:.2f}x", f"{err:.1e}"])
                records.append(dict(model=name, steps=steps, n_threads=nthr, T=args.T, ways=args.ways, lr=inner_lr(name, args),
                                    shots=args.shots, query=args.query, small=args.small, path=path,
                                    fastmeta=fm, clone_adapt=l2l, speedup=speed, fastmeta_cpu=cfm,
                                    clone_adapt_cpu=cl2l, cpu_speedup=cspeed, gate_rel_err=err))
                print(" | ".join(rows[-1]), flush=True)
    header = ["model", "k", "threads", "fastmeta path", "meta_loss ms [p20-p80]", "clone/adapt ms [p20-p80]",
              "speedup", "CPU ms meta_loss / clone/adapt", "CPU-time speedup", "f64 grad err"]
    table = C.format_table(header, rows)
    print("\n".join(table))
    if records:
        C.append_jsonl(records, "dropin", torch.device("cpu"))
    if args.md:
        info = C.env_info(torch.device("cpu"))
        with open(args.md, "a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: T={args.T}, "
                    f"{args.ways}-way {args.shots}-shot, {args.query} query/class, second order, float32"
                    f"{' (small sizes)' if args.small else ''}; {info.get('device', '')}, "
                    f"load {info.get('loadavg_1m')}, "
                    f"torch {torch.__version__}, git {info.get('git_sha', '')}\n\n")
            f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
            f.writelines("| " + " | ".join(r) + " |\n" for r in rows)
    return rows



if __name__ == "__main__":
    main()
