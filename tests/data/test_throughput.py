"""Measurements (printed with -s, never asserted): episode sampling speed on 28x28 glyphs and,
with FASTMETA_DATA_FULL=1, the time of a full glyph build."""

import os
import time

import pytest
import torch

from fastmeta.data import EpisodeDataset, episodes, load_glyphs


def rate(fn, seconds=1.0):
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def test_sampler_throughput(small_glyphs):
    n, k, q = 20, 5, 15
    threads = torch.get_num_threads()
    lines = []
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            ep = EpisodeDataset(small_glyphs, "train", n, k, q, seed=0)
            i = iter(range(10**9))
            raw = rate(lambda: ep[next(i)], 0.5)
            it = iter(episodes(small_glyphs, "train", n, k, q, batch_size=1))
            loader = rate(lambda: next(it), 0.5)
            lines.append(f"  torch threads={t}: EpisodeDataset[i] {raw:.0f} episodes/s, "
                         f"episodes() (0 workers, collate + float conversion) {loader:.0f}/s")
    finally:
        torch.set_num_threads(threads)
    it = iter(episodes(small_glyphs, "train", n, k, q, batch_size=1, num_workers=2))
    workers = rate(lambda: next(it), 1.0)
    lines.append(f"  episodes() with 2 workers: {workers:.0f} episodes/s")
    print("\n20-way 5-shot 15-query, 28x28 glyphs, B=1 (load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):\n" + "\n".join(lines))


@pytest.mark.skipif(os.environ.get("FASTMETA_DATA_FULL") != "1",
                    reason="full glyph build (~15-30 s): set FASTMETA_DATA_FULL=1")
def test_full_glyph_build(tmp_path):
    start = time.perf_counter()
    ds = load_glyphs(tmp_path, progress=False)
    built = time.perf_counter() - start
    start = time.perf_counter()
    load_glyphs(tmp_path, progress=False)
    cached = time.perf_counter() - start
    size = (tmp_path / "glyphs-v1.npz").stat().st_size / 2**20
    print(f"\nfull glyph build {built:.1f} s, cached load {cached:.2f} s, file {size:.1f} MiB")
    print(ds)
    for split in ("train", "val", "test"):
        groups = {g: 0 for g in ds.groups(split)}
        for c in ds.classes(split).tolist():
            groups[ds.class_groups[c]] += 1
        print(f"  {split}: {groups}")
    assert ds.num_classes > 2000
