""""glyphs": an Omniglot-like dataset built offline from the fonts that ship with matplotlib.

A class is one Unicode letter; its group (the Omniglot "alphabet") is its script. An example
is a 28x28 grayscale rendering of the letter in one of the fonts that have it, with a random
stroke-width change, affine distortion (rotation, shear, scale, translation) and a small
smooth elastic wobble, ink = 255 on 0 like inverted Omniglot.

Which letters (see :func:`glyph_letters`):

- Unicode category ``Lu/Ll/Lt/Lo`` in the font's cmap, present and not blank in
  ``>= min_fonts`` fonts (LastResortHE is skipped: it maps every code point to a
  placeholder box; so are cmex10/cmsy10, whose letter code points hold TeX symbols; the
  other Computer Modern fonts contribute only ASCII letters for the same reason);
- no compatibility variants (``NFKC(ch) != ch``: mathematical alphanumerics, superscripts,
  Kelvin sign, Arabic isolated forms, ...) except Arabic initial/medial/final forms, which
  are distinct shapes; no modifier letters (``Lm``: tone marks, spacing diacritics);
- no look-alikes: a letter that renders (almost) identically to a letter with a lower code
  point in some font (Greek capital alpha = Latin A = Cyrillic A, Latin l = Arabic alef =
  Latin I in a sans font, Greek vowels that differ only by the direction of a breathing
  mark) is dropped, so no two classes share an image;
- scripts with fewer than 10 candidate letters are dropped (lone letterlike symbols).

The split is by script, like Omniglot's background/evaluation alphabets: test scripts are
never seen in training (:data:`SCRIPT_SPLIT`, :func:`script_split`).

Generation is deterministic (per-letter generators seeded from ``(seed, code point)``) and
done once; the result is cached as a compressed ``.npz``. The bytes depend on the FreeType
(Pillow) and matplotlib versions, which are recorded in the file.
"""

from __future__ import annotations

import functools
import json
import os
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastmeta.data._episodes import stream_seed
from fastmeta.data._io import data_dir, fingerprint, load_npz, save_npz
from fastmeta.data.dataset import FewShotDataset

VERSION = 1
IMAGE_SIZE = 28
_CANVAS = 64          # high-res rendering; distorted examples are warped to 56 and 2x pooled
_CAP = 40             # cap height of each font on the canvas (font sizes are calibrated on "H")
_FIT = 56             # taller/wider glyphs are scaled down to fit
_MIN_SCRIPT_LETTERS = 10
_LOOKALIKE = 0.002    # mean squared difference (ink in [0, 1], at 32x32) of look-alikes

#: Fixed script -> split table (Omniglot-style: test scripts are held out of training).
#: Related scripts stay together: Greek with its descendants Cyrillic, Coptic and Old Italic,
#: and with Latin and Lisu (whose letters are Latin capitals, some turned). A script not in
#: the table (another font version) goes to train.
SCRIPT_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("Latin", "Greek", "Cyrillic", "Coptic", "Old Italic", "Lisu", "Arabic"),
    "val": ("Georgian", "Hebrew"),
    "test": ("Canadian Syllabics", "Armenian", "Lao"),
}
_MULTIWORD = ("CANADIAN SYLLABICS", "OLD ITALIC", "OLD PERSIAN", "OLD TURKIC", "OLD HUNGARIAN",
              "LINEAR B", "TAI LE", "NEW TAI LUE", "OL CHIKI")
# Fonts whose letter code points hold something else (see the module docstring).
_SKIP_FONTS = ("LastResortHE", "cmex10", "cmsy10")


def script_split() -> dict[str, tuple[str, ...]]:
    """The fixed script -> split assignment of the glyph dataset: ``{"train": (...), "val":
    (...), "test": (...)}``. Scripts not listed (absent from a font version) go to train."""
    return {k: tuple(v) for k, v in SCRIPT_SPLIT.items()}


def script_of(ch: str) -> str:
    """The script of a letter from its Unicode name: ``"LATIN SMALL LETTER A"`` -> ``"Latin"``,
    ``"CANADIAN SYLLABICS E"`` -> ``"Canadian Syllabics"``."""
    name = unicodedata.name(ch, "")
    for prefix in _MULTIWORD:
        if name.startswith(prefix + " "):
            return prefix.title()
    return name.split(" ")[0].title() if name else "Unknown"


def _is_letter(ch: str) -> bool:
    # Lm (modifier letters: tone marks, the Arabic tatweel, spacing diacritics) are not
    # letter shapes of their own.
    if unicodedata.category(ch) not in ("Lu", "Ll", "Lt", "Lo"):
        return False
    if unicodedata.normalize("NFKC", ch) == ch:
        return True
    return unicodedata.decomposition(ch).split(" ")[0] in ("<initial>", "<medial>", "<final>")


def font_files() -> list[Path]:
    """The matplotlib ``.ttf`` fonts used, in a fixed (sorted) order."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover
        raise ImportError("the glyphs dataset renders matplotlib's fonts: pip install matplotlib "
                          "pillow tqdm") from e
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [p for p in sorted(folder.glob("*.ttf"))
            if not any(p.stem.startswith(s) for s in _SKIP_FONTS)]


@functools.cache
def _cmap_letters(path: Path) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(path, lazy=True) as font:
        cmap = font.getBestCmap() or {}
    letters = {cp for cp in cmap if _is_letter(chr(cp))}
    if path.stem.startswith("cm"):  # TeX-encoded: only the ASCII letters are letters
        letters = {cp for cp in letters if chr(cp).isascii()}
    return frozenset(letters)


def glyph_letters(fonts: list[Path] | None = None, min_fonts: int = 4,
                  scripts: list[str] | None = None) -> dict[int, list[int]]:
    """Candidate letters from the fonts' cmaps: code point -> indices into ``fonts`` of the
    fonts that map it, for letters mapped by ``>= min_fonts`` fonts (before the blank and
    homoglyph checks, which need rendering)."""
    fonts = font_files() if fonts is None else fonts
    where: dict[int, list[int]] = defaultdict(list)
    for i, path in enumerate(fonts):
        for cp in _cmap_letters(path):
            where[cp].append(i)
    out = {cp: sorted(fi) for cp, fi in sorted(where.items()) if len(fi) >= min_fonts}
    per_script = Counter(script_of(chr(cp)) for cp in out)
    keep = {s for s, n in per_script.items() if n >= _MIN_SCRIPT_LETTERS}
    if scripts is not None:
        unknown = set(scripts) - keep
        if unknown:
            raise ValueError(f"unknown or too small scripts {sorted(unknown)}; available: "
                             f"{sorted(keep)}")
        keep = set(scripts)
    return {cp: fi for cp, fi in out.items() if script_of(chr(cp)) in keep}


def _render_font(path: Path, codepoints: list[int]) -> list[np.ndarray | None]:
    """Render ``codepoints`` in one font, each centred on its ink box on a blank canvas;
    ``None`` where the font's glyph is blank (an empty outline behind a cmap entry)."""
    if not codepoints:
        return []
    from PIL import Image, ImageDraw, ImageFont

    basic = ImageFont.Layout.BASIC  # no shaping: one code point, one glyph
    probe = ImageFont.truetype(str(path), 100, layout_engine=basic)
    left, top, right, bottom = probe.getbbox("H")
    size = round(100 * _CAP / (bottom - top)) if bottom > top else round(_CAP / 0.72)
    font = ImageFont.truetype(str(path), size, layout_engine=basic)
    big = 3 * _CANVAS
    out: list[np.ndarray | None] = []
    for cp in codepoints:
        ch = chr(cp)
        left, top, right, bottom = font.getbbox(ch)
        im = Image.new("L", (big, big))
        ImageDraw.Draw(im).text((big / 2 - (left + right) / 2, big / 2 - (top + bottom) / 2), ch,
                                font=font, fill=255)
        a = np.asarray(im)
        rows, cols = np.flatnonzero((a > 32).any(1)), np.flatnonzero((a > 32).any(0))
        if rows.size == 0 or int(a.sum()) < 255 * 8:
            out.append(None)
            continue
        crop = a[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
        h, w = crop.shape
        if max(h, w) > _FIT:
            s = _FIT / max(h, w)
            h, w = max(1, round(h * s)), max(1, round(w * s))
            crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.LANCZOS))
        canvas = np.zeros((_CANVAS, _CANVAS), np.uint8)
        y, x = (_CANVAS - h) // 2, (_CANVAS - w) // 2
        canvas[y: y + h, x: x + w] = crop
        out.append(canvas)
    return out


def _drop_lookalikes(letters: dict[int, list[int]], renders: dict[tuple[int, int], np.ndarray]
                     ) -> list[tuple[int, list[int]]]:
    """Keep letters in code point order, dropping any letter whose clean rendering in some
    font is within ``_LOOKALIKE`` (mean squared difference at 32x32) of a letter already
    kept: homoglyphs across scripts (Latin A, Greek Alpha, Cyrillic A; l and Arabic alef)
    and variants that differ by a mark of a pixel or two at 28x28 (Greek psili vs dasia,
    breve vs caron) would make classes that no learner can tell apart."""
    close, pos = {}, {}
    for f in sorted({i for fi in letters.values() for i in fi}):
        cps = [cp for cp, fi in letters.items() if f in fi]
        x = torch.from_numpy(np.stack([renders[cp, f] for cp in cps]))[:, None].float() / 255
        x = F.avg_pool2d(x, _CANVAS // 32).flatten(1)
        sq = (x * x).sum(1)
        close[f] = sq[:, None] + sq[None] - 2 * x @ x.T < _LOOKALIKE * x.shape[1]
        pos[f] = {cp: j for j, cp in enumerate(cps)}
    kept_in = {f: torch.zeros(len(p), dtype=torch.bool) for f, p in pos.items()}
    classes = []
    for cp, fi in letters.items():
        if any((close[f][pos[f][cp]] & kept_in[f]).any() for f in fi):
            continue
        classes.append((cp, fi))
        for f in fi:
            kept_in[f][pos[f][cp]] = True
    return classes


def _generator(seed: int, cp: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, cp))


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max filter of ``[n, 1, H, W]`` (zero padding), as two separable 3-tap maxima:
    much faster than ``max_pool2d`` with stride 1 on the CPU."""
    p = F.pad(x, (1, 1, 1, 1))
    h = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(h[..., :-2, :], h[..., 1:-1, :]), h[..., 2:, :])


def _distort(src: torch.Tensor, params: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 64, 64]`` clean renderings -> uint8 ``[n, 1, 28, 28]`` distorted examples.

    ``params`` ``[n, 7]`` uniform in [0, 1): rotation, shear, scale, aspect, x/y shift,
    stroke; ``field`` ``[n, 2, 4, 4]`` standard normal: the coarse elastic displacement.
    Examples are independent of each other (no batch statistics).
    """
    x = src[:, None].float().div_(255)
    # Stroke width: erode 1 px, keep, or dilate 1 px (grey-level 3x3 min/max filters). An
    # erosion that would remove more than half the ink (hairline fonts) is skipped.
    stroke = (params[:, 6] * 3).long().clamp_(0, 2)
    thick, thin = (stroke == 2).nonzero().flatten(), (stroke == 0).nonzero().flatten()
    x[thick] = _max3x3(x[thick])
    eroded = -_max3x3(-x[thin])
    ok = eroded.sum((1, 2, 3)) >= 0.5 * x[thin].sum((1, 2, 3))
    x[thin[ok]] = eroded[ok]
    # Affine: output = diag(sx, sy) @ [[1, shear], [0, 1]] @ rot(angle) @ input + t, in
    # normalised coordinates; grid_sample needs the inverse map, written out here.
    angle = (params[:, 0] * 2 - 1) * (12 * torch.pi / 180)
    shear = (params[:, 1] * 2 - 1) * 0.2
    scale = 0.85 + 0.2 * params[:, 2]
    aspect = torch.exp((params[:, 3] * 2 - 1) * 0.1)
    sx, sy = scale * aspect, scale / aspect
    tx, ty = (params[:, 4] * 2 - 1) * 0.08, (params[:, 5] * 2 - 1) * 0.08
    out = 2 * IMAGE_SIZE  # warp at twice the output size, then average-pool (antialiasing)
    c, s = torch.cos(angle), torch.sin(angle)
    inv = torch.stack([c / sx, (s - c * shear) / sy, -s / sx, (c + s * shear) / sy], 1)
    inv = inv.view(-1, 2, 2)
    theta = torch.cat([inv, -inv @ torch.stack([tx, ty], 1)[:, :, None]], 2)  # [n, 2, 3]
    # The sampling grid as one GEMM ([2n, 3] @ [3, out*out]; affine_grid's batched 3x2
    # products are several times slower on the CPU), plus a smooth elastic wobble: the
    # coarse 4x4 field upsampled by a fixed linear interpolation ``up``.
    lin = (torch.arange(out, dtype=torch.float32) * 2 + 1) / out - 1  # pixel centres
    base = torch.stack([lin.repeat(out), lin.repeat_interleave(out), torch.ones(out * out)])
    grid = (theta.reshape(-1, 3) @ base).view(-1, 2, out, out)
    up = F.interpolate(torch.eye(4)[None], size=out, mode="linear", align_corners=True)[0].T
    grid += up @ (field * 0.04) @ up.T
    grid = grid.permute(0, 2, 3, 1)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.avg_pool2d(y, 2)
    return y.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def build_glyphs(*, scripts: list[str] | None = None, max_classes_per_script: int | None = None,
                 examples_per_class: int = 20, min_fonts: int = 4, seed: int = 0,
                 progress: bool = True) -> dict[str, np.ndarray]:
    """Render the glyph dataset; returns the arrays that :func:`load_glyphs` caches.

    Args:
        scripts: keep only these scripts (e.g. ``["Latin", "Greek", "Armenian"]``).
        max_classes_per_script: keep the first (lowest code point) letters of each script.
            With ``scripts`` it makes a tiny dataset for tests in about a second.
        examples_per_class: examples of each letter (Omniglot has 20). They cycle through
            the letter's fonts in a random order, so every font is used about equally.
        min_fonts: a letter needs this many fonts that render it.
        seed: the per-letter generators are seeded from ``(seed, code point)``, so a letter's
            examples do not depend on which other letters are built.

    Returns:
        ``images`` uint8 ``[M, 1, 28, 28]``, ``labels`` int32 ``[M]``, ``fonts`` int16
        ``[M]`` (index into ``font_names``), ``codepoints`` int32 ``[C]``, ``scripts``
        ``[C]`` str, ``font_names`` str, ``meta`` (JSON str: config and versions).
    """
    from tqdm.auto import tqdm

    if examples_per_class < 1 or min_fonts < 1:
        raise ValueError("examples_per_class and min_fonts must be >= 1")
    fonts = font_files()
    letters = glyph_letters(fonts, min_fonts, scripts)
    if max_classes_per_script is not None:
        taken: Counter = Counter()
        kept = {}
        for cp, fi in letters.items():
            script = script_of(chr(cp))
            if taken[script] < max_classes_per_script:
                taken[script] += 1
                kept[cp] = fi
        letters = kept

    # Render each (letter, font) pair once, at high resolution (about 5 s for all ~24k
    # pairs: not worth worker processes, which measured no faster on 2 busy cores).
    renders: dict[tuple[int, int], np.ndarray] = {}
    total = sum(len(fi) for fi in letters.values())
    with tqdm(total=total, desc="glyphs: render", unit="glyph", disable=not progress) as bar:
        for f, path in enumerate(fonts):
            cps = [cp for cp, fi in letters.items() if f in fi]
            for cp, a in zip(cps, _render_font(path, cps)):
                if a is not None:
                    renders[cp, f] = a
            bar.update(len(cps))

    letters = {cp: [i for i in fi if (cp, i) in renders] for cp, fi in letters.items()}
    classes = _drop_lookalikes({cp: fi for cp, fi in letters.items() if len(fi) >= min_fonts},
                               renders)
    if not classes:
        raise ValueError("no letters left to build (check scripts / max_classes_per_script)")

    # Per-letter choices: font order and distortion parameters.
    e = examples_per_class
    src_index, font_of, params, fields = [], [], [], []
    stack, stack_pos = [], {}
    for cp, fi in classes:
        g = _generator(seed, cp)
        order = torch.randperm(len(fi), generator=g)
        for j in range(e):
            f = fi[int(order[j % len(fi)])]
            if (cp, f) not in stack_pos:
                stack_pos[cp, f] = len(stack)
                stack.append(renders[cp, f])
            src_index.append(stack_pos[cp, f])
            font_of.append(f)
        params.append(torch.rand(e, 7, generator=g))
        fields.append(torch.randn(e, 2, 4, 4, generator=g))
    src = torch.from_numpy(np.stack(stack))
    src_index = torch.tensor(src_index)
    params, fields = torch.cat(params), torch.cat(fields)
    m = len(src_index)
    images = torch.empty(m, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    chunk = 2048
    with tqdm(total=m, desc="glyphs: distort", unit="img", disable=not progress) as bar:
        for a in range(0, m, chunk):
            b = min(m, a + chunk)
            images[a:b] = _distort(src[src_index[a:b]], params[a:b], fields[a:b])
            bar.update(b - a)

    import matplotlib
    import PIL

    meta = dict(version=VERSION, config=_config(scripts, max_classes_per_script,
                                                examples_per_class, min_fonts, seed),
                matplotlib=matplotlib.__version__, pillow=PIL.__version__,
                freetype=_freetype_version())
    return dict(
        images=images.numpy(),
        labels=np.repeat(np.arange(len(classes), dtype=np.int32), e),
        fonts=np.asarray(font_of, dtype=np.int16),
        codepoints=np.asarray([cp for cp, _ in classes], dtype=np.int32),
        scripts=np.asarray([script_of(chr(cp)) for cp, _ in classes]),
        font_names=np.asarray([p.stem for p in fonts]),
        meta=np.asarray(json.dumps(meta, sort_keys=True)),
    )


def _freetype_version() -> str:
    from PIL import features

    return str(features.version("freetype2"))


def _config(scripts, max_classes_per_script, examples_per_class, min_fonts, seed) -> dict:
    return dict(scripts=sorted(scripts) if scripts is not None else None,
                max_classes_per_script=max_classes_per_script,
                examples_per_class=examples_per_class, min_fonts=min_fonts, seed=seed)


def glyphs_path(root=None, **config) -> Path:
    """The cache file for a configuration: ``<data dir>/glyphs-v1.npz`` for the default one,
    ``glyphs-v1-<hash>.npz`` otherwise (see :func:`fastmeta.data.data_dir`)."""
    cfg = _config(**{**_config(None, None, 20, 4, 0), **config})
    default = cfg == _config(None, None, 20, 4, 0)
    suffix = "" if default else f"-{fingerprint(cfg)}"
    return data_dir(root) / f"glyphs-v{VERSION}{suffix}.npz"


def load_glyphs(root: str | os.PathLike | None = None, *, scripts: list[str] | None = None,
                max_classes_per_script: int | None = None, examples_per_class: int = 20,
                min_fonts: int = 4, seed: int = 0, rebuild: bool = False,
                progress: bool = True) -> FewShotDataset:
    """The glyph dataset, built on first use and cached (see :func:`build_glyphs` for the
    arguments).

    Args:
        root: cache folder; default ``$FASTMETA_DATA_DIR`` or ``~/.cache/fastmeta``. The
            default configuration is cached as ``glyphs-v1.npz``.
        rebuild: build even if the cache exists.

    Returns:
        A :class:`FewShotDataset`: ``images`` uint8 ``[M, 1, 28, 28]``, one class per letter
        (``class_names`` like ``"U+0041 LATIN CAPITAL LETTER A"``), groups = scripts, split by
        :data:`SCRIPT_SPLIT`; ``info`` holds ``codepoints``, ``fonts`` (per example),
        ``font_names`` and ``meta``.
    """
    config = _config(scripts, max_classes_per_script, examples_per_class, min_fonts, seed)
    path = glyphs_path(root, **config)
    arrays = None if rebuild else load_npz(path)
    if arrays is not None:
        try:
            stored = json.loads(str(arrays["meta"]))
        except (KeyError, ValueError):
            stored = {}
        if stored.get("version") != VERSION or stored.get("config") != config:
            arrays = None
    if arrays is None:
        arrays = build_glyphs(scripts=scripts, max_classes_per_script=max_classes_per_script,
                              examples_per_class=examples_per_class, min_fonts=min_fonts,
                              seed=seed, progress=progress)
        save_npz(path, arrays)
    return _to_dataset(arrays, path)


def _to_dataset(arrays: dict[str, np.ndarray], path: Path) -> FewShotDataset:
    codepoints = arrays["codepoints"].tolist()
    scripts = [str(s) for s in arrays["scripts"]]
    names = [f"U+{cp:04X} {unicodedata.name(chr(cp), '?')}" for cp in codepoints]
    split_of = {s: split for split, ss in SCRIPT_SPLIT.items() for s in ss}
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c, s in enumerate(scripts):
        splits[split_of.get(s, "train")].append(c)
    return FewShotDataset(
        torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]).long(), names,
        scripts, splits, name="glyphs",
        info=dict(codepoints=codepoints, fonts=torch.from_numpy(arrays["fonts"]).long(),
                  font_names=[str(f) for f in arrays["font_names"]],
                  meta=json.loads(str(arrays["meta"])), path=str(path)),
    )
