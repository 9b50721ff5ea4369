"""Omniglot and mini-ImageNet from tiny fixture trees written in tmp_path."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fastmeta.data import EpisodeDataset, _io, load_dataset, load_miniimagenet, load_omniglot

BACKGROUND = {"Alpha_A": 2, "Alpha_B": 2, "Alpha_C": 3}
EVALUATION = {"Alpha_D": 2}
PER_CHAR = 3


def omniglot_png(path, char_id, drawer):
    """105x105 bilevel PNG, black ink on white; the ink is a bar whose position encodes the
    character and a dot that encodes the drawer, so every image is different."""
    a = np.full((105, 105), 255, np.uint8)
    a[10 + 8 * char_id: 18 + 8 * char_id, 10:80] = 0  # horizontal bar, one per character
    a[90:100, 10 + 10 * drawer: 20 + 10 * drawer] = 0
    Image.fromarray(a).convert("1").save(path)


@pytest.fixture
def omniglot_root(tmp_path):
    root = tmp_path / "omniglot"
    char_id = 0
    for part, alphabets in (("images_background", BACKGROUND),
                            ("images_evaluation", EVALUATION)):
        for alphabet, n_chars in alphabets.items():
            for c in range(n_chars):
                folder = root / part / alphabet / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(PER_CHAR):
                    omniglot_png(folder / f"{char_id:04d}_{d + 1:02d}.png", char_id, d)
                char_id += 1
    return root


def n_chars():
    return sum(BACKGROUND.values()) + sum(EVALUATION.values())


def test_omniglot_layout_rotations_and_split(omniglot_root, tmp_path):
    ds = load_omniglot(omniglot_root, val_fraction=1 / 3, cache_dir=tmp_path / "cache",
                       progress=False)
    assert ds.num_classes == 4 * n_chars() and len(ds) == 4 * n_chars() * PER_CHAR
    assert ds.images.shape[1:] == (1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.class_names[:5] == ["Alpha_A/character01", "Alpha_A/character01@rot90",
                                  "Alpha_A/character01@rot180", "Alpha_A/character01@rot270",
                                  "Alpha_A/character02"]
    assert ds.groups("test") == ["Alpha_D"]
    assert len(ds.groups("val")) == 1 and len(ds.groups("train")) == 2
    assert set(ds.groups("train") + ds.groups("val")) == set(BACKGROUND)
    # Rotated classes stay in their character's split.
    for split in ("train", "val", "test"):
        ids = set(ds.classes(split).tolist())
        assert all({4 * (c // 4) + r for r in range(4)} <= ids for c in ids)
    # Inverted: background 0, ink bright; the bar sits where the PNG drew it.
    first = ds.images[ds.examples(0)]
    assert first[:, :, 0].max() <= 10  # top row blank (up to Lanczos ringing)
    assert first[:, 0, 3:5, 5:20].float().mean() > 150  # the bar of character 0 (rows ~10-18)
    # The rotation classes are the base images rotated.
    for r in (1, 2, 3):
        assert torch.equal(ds.images[ds.examples(r)], torch.rot90(first, r, dims=(2, 3)))
    check = EpisodeDataset(ds, "train", 5, 1, 2, seed=0)[0]
    assert check.support_x.shape == (5, 1, 28, 28)


def test_omniglot_options(omniglot_root, tmp_path):
    cache = tmp_path / "cache"
    plain = load_omniglot(omniglot_root, rotations=False, image_size=20, cache_dir=cache,
                          progress=False)
    assert plain.num_classes == n_chars() and plain.image_shape == (1, 20, 20)
    assert plain.class_names[0] == "Alpha_A/character01"
    chars = load_omniglot(omniglot_root, split="character", cache_dir=cache, progress=False)
    sizes = [chars.classes(s).numel() // 4 for s in ("train", "val", "test")]
    assert sum(sizes) == n_chars() and sizes[0] >= sizes[2] >= 1
    assert set(chars.classes("train").tolist()).isdisjoint(chars.classes("test").tolist())
    with pytest.raises(ValueError, match="split must be"):
        load_omniglot(omniglot_root, split="vinyals", cache_dir=cache)
    # Also found one level down, as torchvision unpacks it.
    nested = tmp_path / "tv"
    nested.mkdir()
    omniglot_root.rename(nested / "omniglot-py")
    assert load_omniglot(nested, cache_dir=cache, progress=False).num_classes == 4 * n_chars()


def test_omniglot_cache(omniglot_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_omniglot(omniglot_root, cache_dir=cache, progress=False)
    assert len(list(cache.glob("omniglot-*.npz"))) == 1

    def no_reading(*a, **k):
        raise AssertionError("read the PNGs again instead of the cache")

    monkeypatch.setattr("fastmeta.data.omniglot.read_images", no_reading)
    again = load_omniglot(omniglot_root, cache_dir=cache, progress=False)
    assert torch.equal(first.images, again.images) and first.class_names == again.class_names
    with pytest.raises(AssertionError, match="read the PNGs"):  # a changed tree is re-read
        omniglot_png(omniglot_root / "images_evaluation/Alpha_D/character01/extra.png", 0, 4)
        load_omniglot(omniglot_root, cache_dir=cache, progress=False)


def test_omniglot_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background"):
        load_omniglot(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="images_background"):
        load_omniglot(tmp_path / "empty")
    root = tmp_path / "bad"
    (root / "images_background").mkdir(parents=True)
    with pytest.raises(ValueError, match="no alphabet folders"):
        load_omniglot(root)
    (root / "images_background" / "Alpha" / "character01").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .png files"):
        load_omniglot(root)
    (root / "images_background" / "Alpha" / "character01" / "x.png").write_bytes(b"not png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_omniglot(root, cache=False, progress=False)


# -- mini-ImageNet ----------------------------------------------------------------------------

SPLIT_CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}


def tagged_rgb(n, cls, size=84):
    """uint8 [n, size, size, 3]: pixel (0, 0) holds the class number, (0, 1) the index."""
    rng = np.random.default_rng(cls)
    a = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    a[:, 0, 0, :] = cls
    a[:, 0, 1, :] = np.arange(n)[:, None]
    return a


@pytest.fixture
def mini_pickles(tmp_path):
    root = tmp_path / "mini"
    root.mkdir()
    for split, classes in SPLIT_CLASSES.items():
        parts = [tagged_rgb(4, int(name[1:])) for name in classes]
        data = np.concatenate(parts)
        order = np.random.default_rng(0).permutation(len(data))  # rows not grouped by class
        inv = np.argsort(order)
        class_dict = {name: inv[4 * i: 4 * i + 4].tolist() for i, name in enumerate(classes)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data[order], "class_dict": class_dict}, f)
    return root


def test_miniimagenet_pickles(mini_pickles):
    ds = load_miniimagenet(mini_pickles)
    assert ds.num_classes == 7 and len(ds) == 28 and ds.image_shape == (3, 84, 84)
    assert ds.info["layout"] == "pickle"
    for split, names in SPLIT_CLASSES.items():
        assert [ds.class_names[c] for c in ds.classes(split).tolist()] == names
    for c, name in enumerate(ds.class_names):
        x = ds.images[ds.examples(c)]
        assert (x[:, :, 0, 0] == int(name[1:])).all()
        assert sorted(x[:, 0, 0, 1].tolist()) == [0, 1, 2, 3]
        want = tagged_rgb(4, int(name[1:]))[int(x[0, 0, 0, 1])]
        assert np.array_equal(x[0].permute(1, 2, 0).numpy(), want)
    e = EpisodeDataset(ds, "train", 3, 2, 2, seed=0)[0]
    assert e.support_x.shape == (6, 3, 84, 84)
    assert torch.equal(e.support_x[:, 0, 0, 0].long(),
                       torch.tensor([int(ds.class_names[c][1:]) for c in e.classes])[e.support_y])
    assert load_dataset("mini-ImageNet", mini_pickles).num_classes == 7


@pytest.fixture
def mini_folders(tmp_path):
    root = tmp_path / "mini_jpg"
    for split, classes in SPLIT_CLASSES.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                a = np.full((100, 90, 3), (int(name[1:]) * 30, 10 * i, 200), np.uint8)
                Image.fromarray(a).save(folder / f"{name}_{i}.jpg" if i else folder / f"{name}.PNG")
            (folder / "notes.txt").write_text("not an image")
    return root


def test_miniimagenet_folders(mini_folders, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = load_miniimagenet(mini_folders, cache_dir=cache, progress=False)
    assert ds.info["layout"] == "folders"
    assert ds.num_classes == 7 and len(ds) == 21 and ds.image_shape == (3, 84, 84)
    assert ds.class_names == sum(SPLIT_CLASSES.values(), [])
    for c, name in enumerate(ds.class_names):
        red = ds.images[ds.examples(c), 0].float()
        assert (red - int(name[1:]) * 30).abs().max() <= 3  # JPEG
    monkeypatch.setattr("fastmeta.data.miniimagenet.read_images",
                        lambda *a, **k: pytest.fail("cache not used"))
    again = load_miniimagenet(mini_folders, cache_dir=cache, progress=False)
    assert torch.equal(again.images, ds.images)
    monkeypatch.undo()
    small = load_miniimagenet(mini_folders, image_size=32, cache=False, progress=False)
    assert small.image_shape == (3, 32, 32)


def test_miniimagenet_bad_paths(tmp_path, mini_pickles):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_miniimagenet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"mini-imagenet-cache-\{train,val,test\}.pkl"):
        load_miniimagenet(tmp_path / "empty")
    (mini_pickles / "mini-imagenet-cache-val.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-val.pkl"):
        load_miniimagenet(mini_pickles)
    partial = tmp_path / "partial"
    (partial / "train" / "n01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"not \['val/', 'test/'\]"):
        load_miniimagenet(partial)
    for s in ("val", "test"):
        (partial / s / "n09").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .jpg/.jpeg/.png images"):
        load_miniimagenet(partial)


@pytest.mark.parametrize("payload,match", [
    (b"garbage", "not a readable pickle"),
    ({"images": 1}, "expected a dict with 'image_data'"),
    ({"image_data": np.zeros((2, 84, 84, 3), np.float32), "class_dict": {"a": [0]}}, "uint8"),
    ({"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {"a": [0]}}, "uint8"),
    ({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 2]}},
     r"indices in \[0, 2\)"),
    ({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {}}, "non-empty dict"),
])
def test_miniimagenet_malformed_pickle(mini_pickles, payload, match):
    path = mini_pickles / "mini-imagenet-cache-test.pkl"
    path.write_bytes(payload if isinstance(payload, bytes) else pickle.dumps(payload))
    with pytest.raises(ValueError, match=match):
        load_miniimagenet(mini_pickles)


def test_data_dir_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMETA_DATA_DIR", str(tmp_path))
    assert _io.data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "omniglot")):
        load_dataset("omniglot")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "miniimagenet")):
        load_dataset("miniimagenet")
