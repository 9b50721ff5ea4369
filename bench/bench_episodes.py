"""Episode sampling throughput on 28x28 glyphs, and (``--build``) the time of a full glyph build.

Rows (episodes/s, from the per-call median of :func:`_common.time_fn`), 20-way 5-shot 15-query
by default, B=1:

* ``EpisodeDataset[i]``: one episode as uint8 tensors (the index gather alone);
* ``episodes() 0 workers``: the loader as training uses it (collate + float conversion), in
  the calling process, at 1 torch thread and at this process's thread count;
* ``episodes() N workers``: the same through a ``DataLoader`` with ``--workers`` processes.

The dataset is a small glyph build (4 scripts, 24 classes each) made in a temporary folder:
sampling cost depends on the episode's shape, not on how many classes the dataset has.
``--build`` also times a full glyph build into a temporary folder and its cached reload.

Usage: ``python bench/bench_episodes.py [--ways 20] [--shots 5] [--queries 15] [--workers 2]
[--build] [--no-save]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from fastmeta.data import EpisodeDataset, episodes, load_glyphs  # noqa: E402

SMALL_SCRIPTS = ["Latin", "Greek", "Georgian", "Armenian"]


def sampler_rows(ds, n: int, k: int, q: int, workers: int, budget: float) -> list[dict]:
    rows = []
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            ep = EpisodeDataset(ds, "train", n, k, q, seed=0)
            i = iter(range(10**9))
            rows.append(dict(impl="EpisodeDataset[i]", threads=t,
                             **_common.time_fn(lambda: ep[next(i)], device="cpu", budget_s=budget)))
            it = iter(episodes(ds, "train", n, k, q, batch_size=1))
            rows.append(dict(impl="episodes() 0 workers", threads=t,
                             **_common.time_fn(lambda: next(it), device="cpu", budget_s=budget)))
    finally:
        torch.set_num_threads(threads)
    if workers > 0:
        it = iter(episodes(ds, "train", n, k, q, batch_size=1, num_workers=workers))
        rows.append(dict(impl=f"episodes() {workers} workers", threads=threads,
                         **_common.time_fn(lambda: next(it), device="cpu", budget_s=budget,
                                           warmup=2 * workers + 1)))
    for r in rows:
        r["episodes_per_s"] = 1000.0 / r["median_ms"]
    return rows


def build_row(folder: Path) -> dict:
    start = time.perf_counter()
    ds = load_glyphs(folder, progress=False)
    built = time.perf_counter() - start
    start = time.perf_counter()
    load_glyphs(folder, progress=False)
    cached = time.perf_counter() - start
    size = (folder / "glyphs-v1.npz").stat().st_size / 2**20
    return dict(impl="full glyph build", build_s=built, cached_load_s=cached, file_mib=size,
                classes=ds.num_classes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the last row (0: skip)")
    p.add_argument("--build", action="store_true", help="also time a full glyph build (~15-30 s)")
    _common.add_common_args(p, "ways", "shots", "queries", "budget", "no-save", ways=20, shots=5, queries=15,
                            budget=1.0)
    a = _common.parse_args(p, argv)
    _common.print_banner("episode sampler benchmark", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_glyphs(Path(tmp) / "small", scripts=SMALL_SCRIPTS, max_classes_per_script=24,
                         progress=False)
        rows = sampler_rows(ds, a.ways, a.shots, a.queries, a.workers, a.budget)
        if a.build:
            rows.append(build_row(Path(tmp) / "full"))

    print(f"{a.ways}-way {a.shots}-shot {a.queries}-query, 28x28 glyphs, B=1, "
          f"{_common.device_name(torch.device('cpu'))}, torch {torch.__version__}")
    print(f"  {'impl':<24}{'threads':>8}{'median ms':>11}{'p20':>9}{'p80':>9}{'episodes/s':>12}")
    for r in rows:
        if "median_ms" in r:
            print(f"  {r['impl']:<24}{r['threads']:>8}{r['median_ms']:>11.3f}{r['p20_ms']:>9.3f}"
                  f"{r['p80_ms']:>9.3f}{r['episodes_per_s']:>12.0f}")
        else:
            print(f"  full glyph build {r['build_s']:.1f} s ({r['classes']} classes, "
                  f"{r['file_mib']:.1f} MiB), cached load {r['cached_load_s']:.2f} s")
    if not a.no_save:
        info = _common.env_info(torch.device("cpu"))
        out = _common.RESULTS_DIR / f"episodes-{info['device_slug']}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for r in rows:
                row = {**info, **r}  # the row's own thread count wins over the process's
                row.update(bench="episodes", ways=a.ways, shots=a.shots, queries=a.queries, batch=1)
                f.write(json.dumps(row, default=str) + "\n")
        print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
