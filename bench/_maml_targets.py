"""The targets of bench/bench_maml.py (issue 4: speedups over the peers, memory flat in the
number of inner steps, task_chunk's memory), each read off the measured rows and marked hit,
miss, n/a (a row missing) or info."""

from __future__ import annotations

import dataclasses

import torch

from _maml_rows import Row
from _maml_workload import CONFIGS, SEQUENTIAL, config_of, param_count


@dataclasses.dataclass
class Target:
    name: str
    status: str  # "hit" | "miss" | "n/a" | "info"
    detail: str


def _get(rows_by_cfg: dict, config: str, impl: str) -> Row | None:
    for r in rows_by_cfg.get(config, []):
        if r.impl == impl and r.ok:
            return r
    return None


def evaluate_targets(rows_by_cfg: dict, device: torch.device, quick: bool,
                     hvp: dict | None) -> list[Target]:
    out: list[Target] = []

    def ratio_target(name, config, impl, peer, need):
        a, b = _get(rows_by_cfg, config, impl), _get(rows_by_cfg, config, peer)
        if a is None or b is None:
            miss = impl if a is None else peer
            out.append(Target(name, "n/a", f"{miss} row missing in {config}"))
            return
        x = b.median_ms / a.median_ms
        out.append(Target(name, "hit" if x >= need else "miss",
                          f"{impl} {a.median_ms:.1f} ms vs {peer} {b.median_ms:.1f} ms: {x:.2f}x "
                          f"(need >= {need}x)"))

    gpu = device.type == "cuda"
    seq_need, vmap_need = (10, 2) if gpu else (None, 2)
    for config in ("sinusoid-k5", "sinusoid-k1"):
        if config not in rows_by_cfg:
            continue
        for peer in ("higher", "naive"):
            ratio_target(f"{config}: fastmeta >= 10x {peer}", config, "fastmeta", peer, 10)
        ratio_target(f"{config}: fastmeta >= 2x vmap", config, "fastmeta", "vmap", vmap_need)
    for config in ("conv4-k5",) + (("conv4-k1", "conv4-k10") if gpu else ()):
        if config not in rows_by_cfg:
            continue
        seq = [r for r in (_get(rows_by_cfg, config, p) for p in SEQUENTIAL) if r is not None]
        fm = _get(rows_by_cfg, config, "fastmeta")
        need = seq_need or 1.5
        if fm and seq:
            best = min(seq, key=lambda r: r.median_ms)
            x = best.median_ms / fm.median_ms
            out.append(Target(f"{config}: fastmeta >= {need}x fastest sequential peer",
                              "hit" if x >= need else "miss",
                              f"fastmeta {fm.median_ms:.0f} ms vs {best.impl} "
                              f"{best.median_ms:.0f} ms: "
                              f"{x:.2f}x"))
        else:
            out.append(Target(f"{config}: fastmeta >= {need}x fastest sequential peer", "n/a",
                              "rows missing"))
        ratio_target(f"{config}: fastmeta >= 2x vmap", config, "fastmeta", "vmap", 2)
    # memory flat in k
    m1, m10 = _get(rows_by_cfg, "conv4-k1", "fastmeta"), _get(rows_by_cfg, "conv4-k10", "fastmeta")
    if m1 and m10 and m1.peak_mb is not None and m10.peak_mb is not None:
        cfg = m10.cfg
        iterates_mb = 9 * cfg["T"] * param_count(cfg) * 4 / 2**20
        slack = 16.0  # RSS granularity / allocator noise
        grow = m10.peak_mb - m1.peak_mb
        out.append(Target("conv4: fastmeta memory flat in k (k=1 -> 10 grows <= 9 param iterates)",
                          "hit" if grow <= iterates_mb + slack else "miss",
                          f"{m1.peak_mb:.0f} -> {m10.peak_mb:.0f} MB (+{grow:.0f}); 9 iterates of "
                          f"T x params = {iterates_mb:.0f} MB (+{slack:.0f} MB slack)"))
        for peer in ("vmap", "naive"):
            p = _get(rows_by_cfg, "conv4-k10", peer)
            if p is None or p.peak_mb is None:
                out.append(Target(f"conv4-k10: fastmeta memory <= 0.5x {peer}", "n/a",
                                  f"{peer} row missing"))
                continue
            if p.peak_mb < 1.0:
                out.append(Target(f"conv4-k10: fastmeta memory <= 0.5x {peer}", "n/a",
                                  f"{peer}'s peak {p.peak_mb:.1f} MB is below RSS resolution"))
                continue
            x = m10.peak_mb / p.peak_mb
            out.append(Target(f"conv4-k10: fastmeta memory <= 0.5x {peer}",
                              "hit" if x <= 0.5 else "miss",
                              f"{m10.peak_mb:.0f} MB vs {p.peak_mb:.0f} MB: {x:.2f}x"))
    else:
        out.append(Target("conv4: fastmeta memory flat in k", "n/a", "conv4-k1/k10 rows missing"))
    # task_chunk
    for config in ("conv4-k5", "conv4-k10"):
        ch, hi = _get(rows_by_cfg, config, "fastmeta chunk"), _get(rows_by_cfg, config, "higher")
        if ch is None or hi is None:
            continue
        if ch.peak_mb is not None and hi.peak_mb is not None and hi.peak_mb >= 1.0:
            x = ch.peak_mb / hi.peak_mb
            out.append(Target(f"{config}: task_chunk memory <= 1.5x higher",
                              "hit" if x <= 1.5 else "miss",
                              f"{ch.label} {ch.peak_mb:.0f} MB vs higher {hi.peak_mb:.0f} MB: "
                              f"{x:.2f}x"))
        out.append(Target(f"{config}: task_chunk faster than higher",
                          "hit" if ch.median_ms < hi.median_ms else "miss",
                          f"{ch.median_ms:.0f} ms vs {hi.median_ms:.0f} ms"))
    for config, rows in rows_by_cfg.items():  # what capturing the meta-step adds (CUDA)
        g = _get(rows_by_cfg, config, "fastmeta+cudagraph")
        e = _get(rows_by_cfg, config, "fastmeta")
        if g is not None and e is not None:
            out.append(Target(f"{config}: CUDA graph of the fastmeta meta-step", "info",
                              f"{g.median_ms:.2f} ms replayed vs {e.median_ms:.2f} ms eager: "
                              f"{e.median_ms / g.median_ms:.2f}x"))
    if hvp:
        if hvp.get("status") == "ok":
            x = hvp["reference_ms"] / hvp["fastmeta_ms"]
            out.append(Target("TaskMLP batched HVP >= 2x double backward",
                              "hit" if x >= 2 else "miss",
                              f"task_hvp[{hvp['backend']}] {hvp['fastmeta_ms']:.2f} ms vs double "
                              f"backward {hvp['reference_ms']:.2f} ms: {x:.2f}x (rel err "
                              f"{hvp['err']:.1e})"))
        else:
            out.append(Target("TaskMLP batched HVP >= 2x double backward", "n/a",
                              hvp.get("message", "")))
    if quick:  # a target read off a reduced config says so
        reduced = [c for c in CONFIGS if config_of(c, True) != CONFIGS[c]]
        for t in out:
            if any(t.name.startswith(c) or t.name.startswith(c.split("-")[0] + ":")
                   for c in reduced):
                t.detail += " [--quick shapes: not the issue's config]"
    return out


def print_targets(targets: list[Target]) -> None:
    print("\n== targets (issue 4) ==", flush=True)
    for t in targets:
        print(f"  [{t.status.upper():4s}] {t.name}: {t.detail}", flush=True)

