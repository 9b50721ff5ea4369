"""The glyph dataset: letter selection, rendering, determinism, caching, script split."""

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_PER_SCRIPT, SMALL_SCRIPTS

from fastmeta.data import EpisodeDataset, load_dataset, load_glyphs, script_split
from fastmeta.data import glyphs as G

TINY = dict(scripts=["Latin", "Armenian"], max_classes_per_script=5)


def test_letter_candidates():
    fonts = G.font_files()
    stems = [p.stem for p in fonts]
    assert not any(s.startswith(("LastResort", "cmex", "cmsy")) for s in stems)
    assert "DejaVuSans" in stems and "STIXGeneral" in stems and "cmr10" in stems
    letters = G.glyph_letters(fonts)
    assert len(letters) > 2000
    assert all(len(fi) >= 4 for fi in letters.values())
    cats = {unicodedata.category(chr(cp)) for cp in letters}
    assert cats <= {"Lu", "Ll", "Lt", "Lo"}
    assert ord("A") in letters and ord("\u0531") in letters  # Latin A, Armenian Ayb
    assert 0x1D44E not in letters and 0x2C7C not in letters  # math italic a, subscript j
    scripts = {G.script_of(chr(cp)) for cp in letters}
    assert {"Latin", "Greek", "Cyrillic", "Arabic", "Hebrew", "Armenian", "Georgian",
            "Canadian Syllabics", "Lao"} <= scripts
    # cm fonts only contribute ASCII letters (their other code points hold TeX glyphs).
    cm = [i for i, p in enumerate(fonts) if p.stem.startswith("cm")]
    assert all(chr(cp).isascii() for cp, fi in letters.items() if set(fi) & set(cm))
    with pytest.raises(ValueError, match="Klingon"):
        G.glyph_letters(fonts, scripts=["Klingon"])


def test_script_names():
    assert G.script_of("A") == "Latin"
    assert G.script_of("\u03b6") == "Greek"
    assert G.script_of("\u1401") == "Canadian Syllabics"
    assert G.script_of("\U00010300") == "Old Italic"
    assert G.script_of("\u05d0") == "Hebrew"


def test_script_split_is_disjoint():
    split = script_split()
    assert set(split) == {"train", "val", "test"}
    sets = [set(v) for v in split.values()]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not sets[i] & sets[j]
    split["train"] += ("Changed",)  # a copy: the table itself is fixed
    assert "Changed" not in script_split()["train"]


def test_small_build_shapes_and_split(small_glyphs):
    ds = small_glyphs
    assert ds.images.dtype == torch.uint8 and ds.image_shape == (1, 28, 28)
    assert torch.equal(ds.class_counts, torch.full((ds.num_classes,), 20))
    assert SMALL_PER_SCRIPT * 4 - 10 <= ds.num_classes <= SMALL_PER_SCRIPT * 4  # minus look-alikes
    assert set(ds.class_groups) == set(SMALL_SCRIPTS)
    assert ds.groups("train") == ["Greek", "Latin"]
    assert ds.groups("val") == ["Georgian"] and ds.groups("test") == ["Armenian"]
    owners = {}
    for split in ("train", "val", "test"):
        for c in ds.classes(split).tolist():
            assert c not in owners
            owners[c] = split
    assert len(owners) == ds.num_classes
    for cp, name, group in zip(ds.info["codepoints"], ds.class_names, ds.class_groups):
        assert group == G.script_of(chr(cp)) and name.startswith(f"U+{cp:04X} ")
    # Examples cycle through the letter's fonts: every class uses at least 4 of them.
    fonts = ds.info["fonts"]
    assert all(len(set(fonts[ds.examples(c)].tolist())) >= 4 for c in range(ds.num_classes))
    meta = ds.info["meta"]
    assert meta["version"] == G.VERSION and meta["config"]["max_classes_per_script"] == 24


def test_rendered_glyphs_have_ink_and_differ(small_glyphs):
    x = small_glyphs.images.float().div(255).flatten(1)
    ink = x.sum(1)
    assert ink.min() > 2, "a blank example"
    assert (x.amax(1) > 0.7).all()
    assert (x[:, :28].sum(1) < ink).all()  # not all ink on the border rows
    # Examples of a class differ (augmentation), and class means differ between classes.
    for c in range(0, small_glyphs.num_classes, 7):
        ex = x[small_glyphs.examples(c)]
        assert torch.cdist(ex, ex).add(torch.eye(len(ex)) * 1e9).min() > 0.5
    means = torch.stack([x[small_glyphs.examples(c)].mean(0)
                         for c in range(small_glyphs.num_classes)])
    d = torch.cdist(means, means) + torch.eye(len(means)) * 1e9
    assert d.min() > 1.0


def test_lookalikes_are_dropped():
    a = np.zeros((64, 64), np.uint8)
    a[10:50, 30:34] = 255
    b = a.copy()
    b[10:14, 20:44] = 255
    renders = {(0x41, 0): a, (0x391, 0): a.copy(), (0x42, 0): b, (0x42, 1): b, (0x392, 1): b}
    letters = {0x41: [0], 0x42: [0, 1], 0x391: [0], 0x392: [1]}
    kept = G._drop_lookalikes(letters, renders)
    assert [cp for cp, _ in kept] == [0x41, 0x42]


def test_build_is_deterministic(small_glyphs):
    a = G.build_glyphs(**TINY, progress=False)
    b = G.build_glyphs(**TINY, progress=False)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert len(a["codepoints"]) == 10 and a["images"].shape == (200, 1, 28, 28)
    # A letter's examples depend on (seed, code point) only, not on the other letters built.
    big = small_glyphs
    cp = int(a["codepoints"][0])
    c = big.info["codepoints"].index(cp)
    assert np.array_equal(a["images"][:20], big.images[big.examples(c)].numpy())
    # Another seed gives other examples of the same letters.
    other = G.build_glyphs(**TINY, seed=1, progress=False)
    assert np.array_equal(other["codepoints"], a["codepoints"])
    assert not np.array_equal(other["images"], a["images"])


def test_cache_is_reused(tmp_path, monkeypatch):
    calls = []
    real_build = G.build_glyphs

    def counting_build(**kw):
        calls.append(kw)
        return real_build(**kw)

    monkeypatch.setattr(G, "build_glyphs", counting_build)
    first = load_glyphs(tmp_path, **TINY, progress=False)
    path = G.glyphs_path(tmp_path, **TINY)
    assert path.parent == tmp_path and path.name.startswith("glyphs-v1-") and path.exists()
    assert first.info["path"] == str(path)
    mtime = path.stat().st_mtime_ns
    second = load_glyphs(tmp_path, **TINY, progress=False)
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    assert torch.equal(first.images, second.images) and first.class_names == second.class_names
    # Another configuration is another file; a corrupt file is rebuilt; so is rebuild=True.
    load_glyphs(tmp_path, **TINY, examples_per_class=4, progress=False)
    assert len(calls) == 2 and len(list(tmp_path.glob("glyphs-v1-*.npz"))) == 2
    path.write_bytes(b"not a zip file")
    third = load_glyphs(tmp_path, **TINY, progress=False)
    assert len(calls) == 3 and torch.equal(third.images, first.images)
    load_glyphs(tmp_path, **TINY, rebuild=True, progress=False)
    assert len(calls) == 4
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_stale_cache_version_is_rebuilt(tmp_path, monkeypatch):
    load_glyphs(tmp_path, **TINY, progress=False)
    path = G.glyphs_path(tmp_path, **TINY)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.asarray(json.dumps({**meta, "version": 0}))
    np.savez_compressed(path, **arrays)
    calls = []
    real_build = G.build_glyphs
    monkeypatch.setattr(G, "build_glyphs", lambda **kw: calls.append(kw) or real_build(**kw))
    ds = load_glyphs(tmp_path, **TINY, progress=False)
    assert len(calls) == 1 and ds.info["meta"]["version"] == G.VERSION


def test_default_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMETA_DATA_DIR", str(tmp_path / "from-env"))
    assert G.glyphs_path() == tmp_path / "from-env" / "glyphs-v1.npz"
    assert G.glyphs_path(tmp_path / "arg") == tmp_path / "arg" / "glyphs-v1.npz"
    monkeypatch.delenv("FASTMETA_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert G.glyphs_path() == tmp_path / "xdg" / "fastmeta" / "glyphs-v1.npz"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert G.glyphs_path() == Path.home() / ".cache" / "fastmeta" / "glyphs-v1.npz"


def test_load_dataset_glyphs_and_episodes(glyph_dir, small_glyphs):
    ds = load_dataset("glyphs", glyph_dir, scripts=SMALL_SCRIPTS,
                      max_classes_per_script=SMALL_PER_SCRIPT, progress=False)
    assert torch.equal(ds.images, small_glyphs.images)
    e = EpisodeDataset(ds, "test", 5, 5, 15, seed=0)[0]
    assert e.support_x.shape == (25, 1, 28, 28) and e.query_x.shape == (75, 1, 28, 28)
    # Images are the dataset's images of the claimed classes.
    for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
        for img, label in zip(x, y):
            members = ds.images[ds.examples(int(e.classes[label]))]
            assert (members == img).flatten(1).all(1).any()
    with pytest.raises(ValueError, match="unknown dataset 'glyph'"):
        load_dataset("glyph")
