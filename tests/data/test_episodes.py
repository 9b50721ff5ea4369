"""The container and the episode sampler: counts, labels, class membership, determinism
(seeds, workers, batch size, start), errors."""

import itertools
import warnings

import pytest
import torch
from data_helpers import make_tagged

from fastmeta.data import Episode, EpisodeDataset, FewShotDataset, episodes, to_float
from fastmeta.data.dataset import split_by_fraction


def check_episode(ds, ep, split, n, k, q):
    sx, sy, qx, qy, classes = ep
    c, h, w = ds.image_shape
    assert sx.shape == (n * k, c, h, w) and qx.shape == (n * q, c, h, w)
    assert sy.shape == (n * k,) and qy.shape == (n * q,)
    assert sy.dtype == qy.dtype == classes.dtype == torch.int64
    assert torch.equal(torch.bincount(sy, minlength=n), torch.full((n,), k))
    assert torch.equal(torch.bincount(qy, minlength=n), torch.full((n,), q))
    assert classes.shape == (n,) and len(set(classes.tolist())) == n
    assert set(classes.tolist()) <= set(ds.classes(split).tolist())
    # Every image belongs to the class its label claims, and no example appears twice.
    for x, y in ((sx, sy), (qx, qy)):
        assert torch.equal(x[:, 0, 0, 0].long(), classes[y])
    tags = torch.cat([sx, qx])[:, 0, 0, :2].long()
    assert len({tuple(t) for t in tags.tolist()}) == n * (k + q)


@pytest.mark.parametrize("n,k,q", [(5, 1, 1), (3, 2, 4), (6, 6, 0), (1, 1, 5)])
def test_episode_counts_labels_and_membership(tagged, n, k, q):
    ep = EpisodeDataset(tagged, "train", n, k, q, seed=3, num_episodes=20)
    assert len(ep) == 20
    for i in range(20):
        e = ep[i]
        assert isinstance(e, Episode)
        check_episode(tagged, e, "train", n, k, q)
        assert torch.equal(e.support_y, torch.arange(n).repeat_interleave(k))  # class-major


def test_episodes_cover_all_classes_and_examples(tagged):
    ep = EpisodeDataset(tagged, "test", 2, 1, 1, seed=0)
    classes, examples = set(), set()
    for i in range(300):
        e = ep[i]
        classes |= set(e.classes.tolist())
        examples |= {tuple(t) for t in torch.cat([e.support_x, e.query_x])[:, 0, 0, :2].tolist()}
    assert classes == set(tagged.classes("test").tolist())
    assert len(examples) == int(tagged.class_counts[tagged.classes("test")].sum())


def test_shuffle_keeps_content_and_labels(tagged):
    plain = EpisodeDataset(tagged, "train", 4, 3, 2, seed=5)[7]
    mixed = EpisodeDataset(tagged, "train", 4, 3, 2, seed=5, shuffle=True)[7]
    check_episode(tagged, mixed, "train", 4, 3, 2)
    assert torch.equal(plain.classes, mixed.classes)
    assert not torch.equal(plain.support_y, mixed.support_y)
    key = lambda x: sorted(map(tuple, x[:, 0, 0, :3].tolist()))  # noqa: E731
    assert key(plain.support_x) == key(mixed.support_x)
    assert key(plain.query_x) == key(mixed.query_x)


def test_seed_determinism(tagged):
    a = EpisodeDataset(tagged, "train", 5, 2, 3, seed=11)
    b = EpisodeDataset(tagged, "train", 5, 2, 3, seed=11)
    c = EpisodeDataset(tagged, "train", 5, 2, 3, seed=12)
    for i in (0, 1, 1000, 10**9):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    # Another seed (or another episode index) gives other episodes.
    differ = lambda e, f: not torch.equal(e.support_x, f.support_x)  # noqa: E731
    assert sum(differ(a[i], c[i]) for i in range(20)) >= 18
    assert sum(differ(a[i], a[i + 1]) for i in range(20)) >= 18
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a[3]
    assert torch.equal(state, torch.get_rng_state())


def stack(episodes_list):
    return [torch.stack(t) for t in zip(*episodes_list)]


def test_loader_batches_are_episodes_by_index(tagged):
    ep = EpisodeDataset(tagged, "train", 3, 2, 2, seed=4)
    loader = episodes(tagged, "train", 3, 2, 2, batch_size=4, num_batches=3, start=2, seed=4)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    for j, batch in enumerate(batches):
        sx, sy, qx, qy, classes = batch
        assert sx.shape == (4, 6, 1, 8, 8) and sy.shape == (4, 6)
        assert qx.shape == (4, 6, 1, 8, 8) and qy.shape == (4, 6) and classes.shape == (4, 3)
        assert sx.dtype == torch.float32 and 0 <= sx.min() and sx.max() <= 1
        want = stack([ep[i] for i in range((2 + j) * 4, (3 + j) * 4)])
        assert torch.equal(sx, to_float(want[0])) and torch.equal(qx, to_float(want[2]))
        assert torch.equal(sy, want[1]) and torch.equal(qy, want[3])
        assert torch.equal(classes, want[4])


def test_same_episodes_with_0_and_2_workers(tagged):
    def run(workers, **kw):
        loader = episodes(tagged, "train", 4, 1, 3, batch_size=3, num_batches=5, seed=9,
                          num_workers=workers, **kw)
        return [list(b) for b in loader]

    serial = run(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator warns
        parallel = run(2, pin_memory=True)
    assert len(serial) == len(parallel) == 5
    for b0, b2 in zip(serial, parallel):
        assert all(torch.equal(x, y) for x, y in zip(b0, b2))


def test_plain_dataloader_with_workers(tagged):
    ep = EpisodeDataset(tagged, "val", 3, 2, 1, seed=2, num_episodes=6)
    loader = torch.utils.data.DataLoader(ep, batch_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3
    for j, b in enumerate(batches):
        assert isinstance(b, Episode) and b.support_x.shape == (2, 6, 1, 8, 8)
        want = stack([ep[2 * j], ep[2 * j + 1]])
        assert all(torch.equal(x, y) for x, y in zip(b, want))


def test_endless_stream(tagged):
    loader = episodes(tagged, "train", 2, 1, 1, batch_size=2)
    got = list(itertools.islice(iter(loader), 7))
    assert len(got) == 7
    with pytest.raises(TypeError):
        len(loader)
    ep = EpisodeDataset(tagged, "train", 2, 1, 1)
    with pytest.raises(TypeError):
        len(ep)
    assert ep[123456].support_x.shape == (2, 1, 8, 8)


def test_to_float_and_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    assert torch.allclose(to_float(x)[0, :, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    y = to_float(x, normalize=([0.0, 0.2, 0.5], [1.0, 0.5, 0.25]))
    assert torch.allclose(y[1, :, 1, 1], torch.tensor([0.0, 0.0, 2.0]))
    assert to_float(x, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="uint8"):
        to_float(x.float())
    with pytest.raises(ValueError, match="normalize"):
        to_float(x, normalize=([0.1, 0.2], [1.0, 1.0]))


def test_normalized_loader(tagged):
    (sx, *_), = episodes(tagged, "train", 2, 1, 1, num_batches=1, normalize=([0.5], [0.5]))
    raw = EpisodeDataset(tagged, "train", 2, 1, 1)[0].support_x
    assert torch.allclose(sx[0], to_float(raw) * 2 - 1)


def test_too_few_classes_or_examples(tagged):
    with pytest.raises(ValueError, match=r"split 'val'.* 3 classes, fewer than n_way=4"):
        EpisodeDataset(tagged, "val", 4, 1, 1)
    # Classes of the train split have 6, 7 or 8 examples.
    EpisodeDataset(tagged, "train", 2, 3, 3)
    with pytest.raises(ValueError, match=r"fewer than k_shot \+ n_query = 7.*'class0' \(6\)"):
        EpisodeDataset(tagged, "train", 2, 3, 4)
    with pytest.raises(ValueError, match="unknown split 'meta-train'"):
        EpisodeDataset(tagged, "meta-train", 2, 1, 1)
    empty = make_tagged(splits={"train": range(12), "test": []})
    with pytest.raises(ValueError, match="0 classes"):
        episodes(empty, "test", 1, 1, 1)


@pytest.mark.parametrize("kw", [dict(n_way=0), dict(k_shot=0), dict(n_query=-1),
                                dict(n_way=2.0), dict(k_shot=True), dict(seed=-1)])
def test_bad_episode_arguments(tagged, kw):
    args = dict(n_way=2, k_shot=1, n_query=1, seed=0) | kw
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        EpisodeDataset(tagged, "train", **args)


def test_index_out_of_range(tagged):
    ep = EpisodeDataset(tagged, "train", 2, 1, 1, num_episodes=3)
    ep[2]
    for i in (3, -1):
        with pytest.raises(IndexError):
            ep[i]


def test_container_sorts_and_validates():
    ds = make_tagged()
    for c in range(ds.num_classes):
        idx = ds.examples(c)
        assert (ds.labels[idx] == c).all() and len(idx) == 6 + c % 3
        assert torch.equal(ds.images[idx, 0, 0, 1].long(), torch.arange(len(idx)))
    assert ds.groups("test") == ["group3"] and len(ds) == int(ds.class_counts.sum())
    assert "train:" in repr(ds)
    img, lab = ds.images, ds.labels
    names, groups = ds.class_names, ds.class_groups
    with pytest.raises(ValueError, match="class-disjoint"):
        FewShotDataset(img, lab, names, groups, {"train": [0, 1], "test": [1, 2]})
    with pytest.raises(ValueError, match="uint8"):
        FewShotDataset(img.float(), lab, names, groups, {})
    with pytest.raises(ValueError, match="one per image"):
        FewShotDataset(img, lab[:-1], names, groups, {})
    with pytest.raises(ValueError, match="labels must lie"):
        FewShotDataset(img, lab, names[:-1], groups[:-1], {})
    with pytest.raises(ValueError, match="one group per class"):
        FewShotDataset(img, lab, names, groups[:-1], {})
    with pytest.raises(ValueError, match="outside"):
        FewShotDataset(img, lab, names, groups, {"train": [12]})


def test_split_by_fraction_is_fixed_and_complete():
    names = [f"n{i}" for i in range(50)]
    a = split_by_fraction(names, [0.6, 0.2, 0.2], seed=0)
    assert a == split_by_fraction(list(reversed(names)), [0.6, 0.2, 0.2], seed=0)
    assert [len(p) for p in a] == [30, 10, 10]
    assert sorted(sum(a, [])) == sorted(names)
    assert a != split_by_fraction(names, [0.6, 0.2, 0.2], seed=1)


def test_loader_for_an_accelerator_converts_after_the_copy(tagged):
    # "meta" stands in for a GPU: batches stay uint8 through the DataLoader and are
    # converted on the target device.
    loader = episodes(tagged, "train", 3, 1, 2, batch_size=2, num_batches=2, device="meta",
                      normalize=([0.5], [0.5]))
    assert loader.loader.pin_memory is False and loader.on_cpu is False
    for sx, sy, qx, qy, classes in loader:
        assert sx.device.type == qx.device.type == sy.device.type == "meta"
        assert sx.dtype == torch.float32 and sx.shape == (2, 3, 1, 8, 8)
        assert qy.shape == (2, 6) and classes.device.type == "cpu"
    with pytest.raises(ValueError, match="normalize"):
        episodes(tagged, "train", 3, 1, 2, normalize=([0.5, 0.5], [1, 1]))
