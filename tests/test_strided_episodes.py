"""data.episodes(rank=, world=): each torchrun rank builds only its share of every global batch,
exactly the episodes fastmeta.distributed.shard would cut from the whole batch (issue 16)."""

from __future__ import annotations

import itertools

import pytest
import torch
from learner_helpers import blob_dataset

from fastmeta import data, distributed


def _same(a: data.Episode, b: data.Episode) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_a_ranks_batches_are_its_shard_of_the_global_batches(world, shuffle):
    ds = blob_dataset()
    kw = dict(batch_size=8, start=3, seed=5, shuffle=shuffle)
    full = list(data.episodes(ds, "train", 3, 2, 2, num_batches=3, **kw))
    for rank in range(world):
        mine = data.episodes(ds, "train", 3, 2, 2, num_batches=3, rank=rank, world=world, **kw)
        assert len(mine) == 3
        got = list(mine)
        assert len(got) == 3 and all(g.support_x.shape[0] == 8 // world for g in got)
        assert all(_same(g, distributed.shard(f, rank, world)) for g, f in zip(got, full))
    # the endless training stream too
    endless = data.episodes(ds, "train", 3, 2, 2, rank=world - 1, world=world, **kw)
    for g, f in zip(itertools.islice(endless, 3), full):
        assert _same(g, distributed.shard(f, world - 1, world))


def test_one_rank_is_the_whole_batch_and_bad_arguments_raise():
    ds = blob_dataset()
    a = next(iter(data.episodes(ds, "train", 3, 1, 1, batch_size=4, num_batches=1)))
    b = next(iter(data.episodes(ds, "train", 3, 1, 1, batch_size=4, num_batches=1, rank=0,
                                world=1)))
    assert _same(a, b)
    with pytest.raises(ValueError, match="batch_size a multiple of world, got rank=0, world=3"):
        data.episodes(ds, "train", 3, 1, 1, batch_size=4, world=3)
    with pytest.raises(ValueError, match="need 0 <= rank < world"):
        data.episodes(ds, "train", 3, 1, 1, batch_size=4, rank=2, world=2)
    with pytest.raises(ValueError, match="world must be an int >= 1"):
        data.episodes(ds, "train", 3, 1, 1, batch_size=4, world=0)
