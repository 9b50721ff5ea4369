"""Files: where built datasets are cached, atomic .npz writes, reading image folders."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$FASTMETA_DATA_DIR``, else ``$XDG_CACHE_HOME/fastmeta``
    (``~/.cache/fastmeta``)."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("FASTMETA_DATA_DIR"):
        return Path(os.environ["FASTMETA_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fastmeta"


def fingerprint(obj) -> str:
    """Short stable hash of a JSON-able object (cache keys)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def save_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    """Write to a temporary file beside ``path`` and rename it into place, so readers (or a
    concurrent build) never see a half-written cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """All arrays of ``path``, or ``None`` if it is missing or unreadable (a stale or
    truncated cache is rebuilt, not an error)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def read_images(paths: list[Path], size: int, mode: str, invert: bool = False,
                desc: str = "images", progress: bool = True) -> np.ndarray:
    """Read image files with Pillow, convert to ``mode`` (``"L"`` or ``"RGB"``), invert if
    asked, resize to ``size x size`` (Lanczos) and stack: uint8 ``[n, size, size]`` or
    ``[n, size, size, 3]``. Threads overlap the decoding (Pillow releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, ImageOps
    from tqdm.auto import tqdm

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        if invert:
            im = ImageOps.invert(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)

    shape = (size, size) if mode == "L" else (size, size, len(mode))
    out = np.empty((len(paths), *shape), np.uint8)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for i, a in enumerate(pool.map(read, paths)):
            out[i] = a
            bar.update(1)
    return out


def listing_key(root: Path, files: list[Path], **extra) -> str:
    """Cache key of a folder dataset: its resolved path, every file's relative path and
    size, and the processing options."""
    entries = [(str(p.relative_to(root)), p.stat().st_size) for p in files]
    return fingerprint(dict(root=str(root.resolve()), files=entries, **extra))
