"""Benchmark a second-order MAML meta-step: fastmeta against the peers, side by side in one run.

A *meta-step* is: zero the gradients (set to None), the inner loop of ``k`` steps on every
task's support set, the query loss averaged over the ``T`` tasks, and the outer backward that
leaves the meta-gradient in ``.grad`` of the model's parameters. The optimizer step is excluded
for every row. Inner updates are plain SGD with a fixed learning rate, second order throughout.

Rows (each on its own deep copy of one model, so all start from the same parameters):

* ``naive``: per-task Python loop, ``torch.func.functional_call`` +
  ``torch.autograd.grad(create_graph=True)``, ``p - lr * g``; one backward of the mean query
  loss after the loop (every task's graph is alive at once);
* ``higher``: ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)`` per task,
  ``diffopt.step(loss)``, query loss / T backward per task (higher's MAML example);
* ``torchopt``: ``torchopt.MetaSGD(model, lr)`` per task with ``extract_state_dict`` /
  ``recover_state_dict`` and a backward per task (TorchOpt's MAML Omniglot example);
* ``vmap``: ``torch.func.vmap`` over tasks of a functional inner loop with ``torch.func.grad``
  (the functorch MAML Omniglot example), one backward of the mean;
* ``l2l``: ``learn2learn.algorithms.MAML``: ``clone()`` / ``adapt(loss)`` per task, backward per
  task (its examples);
* ``bmm`` (MLP only): a hand-written task-batched MLP (``baddbmm`` on ``[T, ...]`` weights) with
  ``autograd.grad(create_graph=True)``: what one writes by hand without fastmeta;
* ``fastmeta``: ``fastmeta.MAML(model, lr).meta_loss(sx, sy, qx, qy, steps=k, loss_fn)`` then
  ``.loss.backward()``; ``fastmeta chunk=c``: the same with ``task_chunk=c`` (bounded memory);
  ``fastmeta clone/adapt``: fastmeta's learn2learn-compatible API per task (sinusoid only);
  ``fastmeta+cudagraph`` (CUDA only): the fastmeta meta-step captured once in a CUDA graph and
  replayed (inputs copied into static buffers inside the timed region).

Configs: ``sinusoid-k1`` / ``sinusoid-k5``: MLP 1-40-40-1 (ReLU), T=25 tasks, K=10 support and
10 query points, MSE, inner lr 0.01. ``conv4-k1`` / ``conv4-k5`` / ``conv4-k10``: MAML's Conv4
(4 x [conv3x3-64, BatchNorm (batch statistics, as in MAML), ReLU, maxpool 2], Linear to 5) on
28x28 5-way 1-shot with 15 queries per class, T=32, cross-entropy, inner lr 0.4; k = 1, 5, 10
is the memory curve. ``--quick`` runs every config at smaller T / width (labelled in the rows).

Method:

* **Correct first.** Before anything is timed, every row's meta-gradient (and meta-loss) is
  compared with ``naive`` in float64 on a tiny version of each model (MLP 1-8-8-1, T=3, k=2;
  Conv4 width 4, T=2, k=2): relative error above 1e-9 fails the gate. A fastmeta row that
  fails is not timed and the script exits 1 after printing everything; a peer that fails (an
  upstream bug: ``torch.func`` vmap + grad through BatchNorm, see below) is reported loudly and
  still timed, its row marked ``[WRONG grads]``. At full size every row's float32
  meta-gradient is compared with a float64 reference of the same config (naive loop, backward
  per task, same inputs): column ``err vs f64`` (informational: second-order MAML with lr 0.4
  amplifies float32 rounding with k; the autograd peers share one rounding pattern).
* **Each (row, config) runs in a fresh subprocess** (``--threads`` threads): imports, model and
  data, then the same row on a width-2 one-task copy of the model (lazy initialisation of the
  autograd engine, functorch, oneDNN, fastmeta's caches, at negligible memory); then the
  kernel's peak-RSS mark is reset to the current RSS (``/proc/self/clear_refs``), one full
  meta-step runs (``cold ms``) and ``peak RSS`` = ``VmHWM`` - the RSS before it: what the
  meta-step itself took (the issue's numbers are RSS). On CUDA, ``peak MB`` is
  ``torch.cuda.max_memory_allocated()`` over the step instead. Then ``--reps`` timed
  meta-steps: ``time.perf_counter`` on the CPU, CUDA events on the GPU; median and p20/p80.
  With ``--threads 1`` on a CPU the medians are process CPU time (``--clock auto``): on a
  shared machine other processes stretch wall time, not the CPU time a single-threaded step
  consumes; the other clock's median is its own column.
* Speedup ``x B`` = median of row B / median of this row.
* The 1-minute load average is recorded before and after every row: on a shared CPU a busy
  neighbour inflates times (compare p20/p80).

Known upstream mismatch: ``torch.func`` (torch 2.13) gets the second-order meta-gradient of
the functorch MAML example wrong when the model has training-mode BatchNorm: on the tiny Conv4
the meta-gradient differs from the naive loop (and from higher, TorchOpt, learn2learn and
fastmeta, which agree to 1e-16) by 1.8e-2 relative, in float64. Each piece checks out alone
(vmap of grad, vmap of HVPs with batched vectors, first-order grads with batched BatchNorm
weights); ``grad`` (or autograd) over ``vmap`` over ``grad`` through ``batch_norm`` does not.
Without BatchNorm (the MLP) vmap agrees to 1e-16. Its Conv4 rows are timed (its users pay that
cost) and marked ``[WRONG grads]``. ``bench/vmap_batchnorm_repro.py`` reproduces it in 20 lines
(Linear -> batch_norm -> tanh: the gradient of the weight before the norm is off by 33%).
Upstream this is pytorch/functorch issue #534 ("layer_norm and batch_norm backward batching
rule is incorrect for grad_input", open since 2022, found while porting this very example).

Script::

    python bench/bench_maml.py [--quick] [--configs sinusoid-k1,sinusoid-k5,conv4-k5,...]
        [--impls naive,higher,...] [--threads N] [--reps N] [--device cpu|cuda]
        [--time-limit S] [--results-dir DIR] [--no-save] [--gate-only]

prints one table per config, then the issue's targets marked hit/miss, and appends JSON rows
to ``bench/results/maml-<device>.jsonl``. Peers come from ``bash tools/install_peers.sh``
(``make peers``); a missing peer's row says "skipped: not installed".

Files (this one is the command line; the shared harness is ``bench/_common.py``):
``_maml_workload.py`` configs, models, batches; ``_maml_impls.py`` the rows' meta-steps;
``_maml_gate.py`` the float64 gate; ``_maml_child.py`` one row in a fresh process;
``_maml_hvp.py`` the batched-HVP line; ``_maml_rows.py`` rows, table, JSON lines;
``_maml_targets.py`` the issue's targets.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from _maml_child import run_child  # noqa: E402
from _maml_gate import run_gate  # noqa: E402
from _maml_hvp import bench_hvp  # noqa: E402
from _maml_impls import availability, import_l2l_maml, peer_versions  # noqa: E402
from _maml_rows import Row, print_table, save_rows  # noqa: E402
from _maml_targets import evaluate_targets, print_targets  # noqa: E402
from _maml_workload import ALL_IMPLS, CONFIGS, PEERS, config_of, impl_label, impls_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--impls", default=None, help=f"comma list of {', '.join(ALL_IMPLS)}")
    ap.add_argument("--curve-impls", default=None,
                    help="rows of the memory-curve configs conv4-k1/conv4-k10 (default: --impls)")
    ap.add_argument("--quick", action="store_true", help="small meta-batches/width, few reps")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", default=None,
                    help="timed meta-steps per row after the cold one: N for every config, or "
                         "CONFIG=N,... (default: 5 sinusoid, 2 conv4-k5, 2 conv4-k1, 1 conv4-k10; "
                         "--quick: 3). 0: the median is the cold step")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="what the medians measure: wall time, or process CPU time (auto: CPU "
                         "time on a CPU with --threads 1, where other processes' load would "
                         "otherwise inflate wall times; wall time otherwise)")
    ap.add_argument("--f64-ref", choices=("auto", "on", "off"), default="auto",
                    help="float64 reference run per config for the 'err vs f64' column (auto: "
                         "sinusoid, --quick and CUDA; a full-size Conv4 one costs ~2 naive steps)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no new row after this many seconds (rows say 'skipped')")
    ap.add_argument("--child-timeout", type=float, default=900)
    ap.add_argument("--gate-only", action="store_true", help="only the float64 correctness gate")
    ap.add_argument("--no-hvp", action="store_true", help="skip the batched HVP row")
    C.add_common_args(ap, "device", "threads", "results-dir", "no-save", device="cpu")
    args = C.parse_args(ap, argv)

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    device = args.device
    configs = C.comma_list(args.configs)
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    reps_of: dict[str, int] = {}
    for item in C.comma_list(args.reps):
        cfg_name, _, n = item.rpartition("=")
        for c in ([cfg_name] if cfg_name else list(CONFIGS)):
            if c not in CONFIGS:
                raise SystemExit(f"--reps: unknown config {c!r}")
            reps_of[c] = int(n)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    if clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures host CPU time; use --clock wall on CUDA")
    wanted = C.comma_list(args.impls) or ALL_IMPLS
    for w in wanted:
        if w not in ALL_IMPLS:
            raise SystemExit(f"unknown impl {w!r}; choose from {', '.join(ALL_IMPLS)}")
    if "naive" not in wanted:
        wanted = ["naive", *wanted]  # the reference of every check
    curve_wanted = C.comma_list(args.curve_impls) or wanted
    for w in curve_wanted:
        if w not in ALL_IMPLS:
            raise SystemExit(f"unknown impl {w!r}; choose from {', '.join(ALL_IMPLS)}")
    warn = C.busy_warning()
    if warn:
        print(warn, flush=True)
    versions = peer_versions()
    print(f"device: {C.device_name(device)}; torch {torch.__version__}; peers {versions}; "
          f"load {C._loadavg()}", flush=True)
    l2l_note = ""
    try:
        l2l_note = import_l2l_maml()[1]
    except Exception:  # noqa: BLE001
        pass
    if l2l_note:
        print(f"learn2learn: {l2l_note}", flush=True)

    # 1. correctness gate
    print("\n== correctness gate: meta-gradient vs naive, float64, tiny models ==", flush=True)
    gate = run_gate(device, wanted, log=lambda m: print("  " + m, flush=True))
    for model_kind, rows in gate.items():
        for name, (status, err, msg) in rows.items():
            if status != "ok":
                print(f"  gate {model_kind:5s} {name:22s} {status}: {msg}", flush=True)
    gate_bad = [(m, n, s) for m, rows in gate.items() for n, (s, _e, _m) in rows.items()
                if s in ("WRONG", "failed") and n not in PEERS]
    peer_bad = [(m, n, s) for m, rows in gate.items() for n, (s, _e, _m) in rows.items()
                if s in ("WRONG", "failed") and n in PEERS]
    if gate_bad:
        print("\n!!! CORRECTNESS GATE FAILED: "
              + "; ".join(f"{n} on {m}: {s}" for m, n, s in gate_bad)
              + " -- these rows are not timed; exit status 1 !!!", flush=True)
    if peer_bad:
        print("\n!!! PEER MISMATCH: " + "; ".join(f"{n} on {m}: {s}" for m, n, s in peer_bad)
              + " -- a peer's meta-gradient differs from the naive loop (an upstream bug; a "
              "WRONG peer row is still timed and marked [WRONG grads]) !!!", flush=True)
    if args.gate_only:
        return 1 if gate_bad else 0

    # 2. the rows, each in a fresh process
    extra = dict(quick=args.quick, peers=versions, l2l_note=l2l_note, dtype=args.dtype,
                 load_start=C._loadavg(), argv=sys.argv[1:] if argv is None else argv,
                 run_started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    rows_by_cfg: dict[str, list[Row]] = {}
    all_rows: list[Row] = []
    saved = None
    tmp = tempfile.mkdtemp(prefix="bench_maml_")
    for config in configs:
        cfg = config_of(config, args.quick)
        if config in reps_of:
            reps = reps_of[config]
        elif args.quick:
            reps = 3
        else:
            reps = {"conv4-k5": 2, "conv4-k1": 2, "conv4-k10": 1}.get(config, 5)
        here = curve_wanted if config in ("conv4-k1", "conv4-k10") else wanted
        names = [n for n in impls_for(cfg, device) if n in here]
        rows: list[Row] = []
        ref_grad, ref_msg = None, ""
        want_ref = (args.f64_ref == "on" or (args.f64_ref == "auto" and (
            args.quick or cfg["model"] == "mlp" or device.type == "cuda")))
        if not want_ref:
            ref_msg = "no float64 reference (--f64-ref)"
        elif args.dtype != "float64" and not (args.time_limit is not None
                                              and time.perf_counter() - t_start > args.time_limit):
            # the float64 reference of this config (same inputs, rounded to float32 first)
            gpath = os.path.join(tmp, f"{config}-reference.pt")
            print(f"... {config} float64 reference", file=sys.stderr, flush=True)
            res = run_child(dict(cfg=cfg, impl="reference", device=str(device), dtype="float64",
                                 seed=1, threads=args.threads, reps=0, grads_path=gpath,
                                 inputs_dtype=args.dtype), args.child_timeout)
            if res.get("status") == "ok":
                ref_grad = torch.load(gpath)
            else:
                ref_msg = f"float64 reference failed: {res.get('message')}"
                print(ref_msg, flush=True)
        for name in names:
            row = Row(config, cfg, name, baseline=name in PEERS, status="skipped")
            rows.append(row)
            gate_row = gate[cfg["model"]].get(name)
            if gate_row is not None:
                row.gate_err = gate_row[1]
            why = availability(name, device)
            if why:
                row.message = why
                continue
            flagged = ""
            if gate_row is not None and gate_row[0] in ("WRONG", "failed"):
                if not (gate_row[0] == "WRONG" and name in PEERS):
                    row.status, row.message = gate_row[0], f"correctness gate: {gate_row[2]}"
                    continue
                # A peer whose meta-gradient is wrong (an upstream bug) is still timed: its
                # cost is what its users pay. The row says so in its name and message.
                flagged = f"WRONG meta-gradient (correctness gate: {gate_row[2]}); timed anyway"
            if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
                row.message = "--time-limit reached"
                continue
            # a k=10 row whose memory, extrapolated from its smaller-k rows, would not fit
            est = _estimate_mb(rows_by_cfg, config, cfg, name)
            free = C.mem_available_bytes(device)
            if est is not None and free is not None and est * 2**20 > 0.7 * free:
                row.message = (f"needs ~{est / 1024:.1f} GiB (extrapolated from smaller k), "
                               f"{free / 2**30:.1f} GiB free")
                continue
            gpath = os.path.join(tmp, f"{config}-{name.replace(' ', '_').replace('/', '_')}.pt")
            spec = dict(cfg=cfg, impl=name, device=str(device), dtype=args.dtype, seed=1,
                        threads=args.threads, reps=reps, grads_path=gpath)
            print(f"... {config} {impl_label(name, cfg)}", file=sys.stderr, flush=True)
            row.load_before = C._loadavg()
            res = run_child(spec, args.child_timeout)
            row.load_after = C._loadavg()
            if res.get("status") != "ok":
                row.status, row.message = "failed", res.get("message", "")
                continue
            use_cpu = clock == "cpu"
            times = res["cpu_times_ms"] if use_cpu else res["times_ms"]
            cold = res["cold_cpu_ms"] if use_cpu else res["cold_ms"]
            other = res["times_ms"] if use_cpu else res["cpu_times_ms"]
            t = C.summarize_ms(times) if times else dict(median_ms=cold, p20_ms=cold,
                                                         p80_ms=cold, n=0)
            row.other_median_ms = (C.summarize_ms(other)["median_ms"] if other else
                                   (res["cold_ms"] if use_cpu else res["cold_cpu_ms"]))
            row.status = "ok"
            row.wrong = bool(flagged)
            row.message = flagged
            row.median_ms, row.p20_ms, row.p80_ms, row.n = (t["median_ms"], t["p20_ms"],
                                                            t["p80_ms"], t["n"])
            if not res["times_ms"]:
                row.message = "; ".join(
                    x for x in (flagged, "median = the cold step (--reps 0)") if x)
            row.cold_ms, row.rss_peak_mb, row.rss_base_mb = (cold, res["rss_peak_mb"],
                                                             res["rss_base_mb"])
            row.clock = clock
            row.cuda_peak_mb = res.get("cuda_peak_mb")
            if ref_grad is not None:
                row.err_f64 = C._rel_err(torch.load(gpath), ref_grad)
        C.fill_group_speedups(rows)
        print_table(config, rows, device, threads)
        rows_by_cfg[config] = rows
        all_rows.extend(rows)
        if not args.no_save:  # per config: a run cut short keeps what it measured
            saved = save_rows(rows, [], None, device, args.results_dir,
                              dict(extra, load_end=C._loadavg()))

    hvp = None
    if not args.no_hvp:
        hvp = bench_hvp(device, reps=5)
        if hvp.get("status") == "ok":
            print(f"\n== batched HVP, TaskMLP 1-40-40-1, T={hvp['T']}, K=10 ==\n  task_hvp (auto) "
                  f"{hvp['fastmeta_ms']:.3f} ms, double backward (reference) "
                  f"{hvp['reference_ms']:.3f} "
                  f"ms: {hvp['reference_ms'] / hvp['fastmeta_ms']:.2f}x, rel err {hvp['err']:.1e}",
                  flush=True)
        else:
            print(f"\nbatched HVP: {hvp.get('status')}: {hvp.get('message')}", flush=True)

    targets = evaluate_targets(rows_by_cfg, device, args.quick, hvp)
    print_targets(targets)
    extra["load_end"] = C._loadavg()
    if not args.no_save:
        saved = save_rows([], targets, hvp, device, args.results_dir, extra)
    bad = [r for r in all_rows if r.status in ("WRONG", "failed")]
    print(f"\n{len(all_rows)} rows, {sum(r.ok for r in all_rows)} timed, {len(bad)} wrong/failed, "
          f"{time.perf_counter() - t_start:.0f} s, "
          f"load {extra['load_start']} -> {extra['load_end']}"
          + (f"; rows appended to {saved}" if saved else ""), flush=True)
    for r in bad:
        print(f"  {r.status}: {r.config} {r.label}: {r.message}", flush=True)
    return 1 if gate_bad else 0


def _estimate_mb(rows_by_cfg: dict, config: str, cfg: dict, name: str) -> float | None:
    """Peak memory of ``name`` at this config's k, extrapolated linearly in k from the same
    row at the other k of the same model (None when nothing to extrapolate from)."""
    pts = []
    for other, rows in rows_by_cfg.items():
        for r in rows:
            if (r.impl == name and r.ok and r.peak_mb is not None and r.cfg["model"] == cfg["model"]
                    and r.cfg["T"] == cfg["T"] and r.cfg["hidden"] == cfg["hidden"]
                    and r.cfg["k"] != cfg["k"]):
                pts.append((r.cfg["k"], r.peak_mb))
    if not pts:
        return None
    pts.sort()
    if len(pts) == 1:
        k0, m0 = pts[0]
        return m0 * cfg["k"] / k0 if cfg["k"] > k0 else None
    (k0, m0), (k1, m1) = pts[0], pts[-1]
    slope = (m1 - m0) / (k1 - k0) if k1 != k0 else 0.0
    return m1 + slope * (cfg["k"] - k1)


if __name__ == "__main__":
    sys.exit(main())
