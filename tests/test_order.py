"""pipeline.order: every rank gets the same number of batches, shards differ by at most one image, every image comes
exactly once per epoch (without drop_last), no batch is empty, and too few images for the ranks are refused."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pipeline.order import Order, batch_sizes, epoch_batches, num_batches, shard_size

CASES = [
    (n, batch, world, drop_last)
    for world, batch, drop_last in itertools.product(range(1, 6), range(1, 7), (False, True))
    for n in range(world, 60)
]


def _old_len(n: int, batch: int, order: Order) -> int:
    """Before: each rank counted its own shard, so a shard one image longer could have one batch more."""
    size = len(range(order.rank, n, order.world_size))
    return size // batch if order.drop_last else math.ceil(size / batch)


def test_the_cases_include_those_where_ranks_used_to_get_different_batch_counts():
    uneven = [
        (n, b, w, d)
        for n, b, w, d in CASES
        if len({_old_len(n, b, Order(rank=r, world_size=w, drop_last=d)) for r in range(w)}) > 1
    ]
    assert len(uneven) > 100 and (9, 4, 2, False) in uneven  # shards of 5 and 4 images, batch 4: 2 vs 1 batches


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_every_rank_gets_the_same_number_of_batches_and_every_image_once(world, drop_last):
    for n, batch, w, d in CASES:
        if (w, d) != (world, drop_last):
            continue
        orders = [Order(seed=1, rank=r, world_size=w, drop_last=d) for r in range(w)]
        counts = {num_batches(n, batch, o) for o in orders}
        assert len(counts) == 1, (n, batch, w, d, counts)
        shards = [shard_size(n, o) for o in orders]
        assert max(shards) - min(shards) <= 1 and sum(shards) == n
        seen = []
        for o in orders:
            batches = epoch_batches(n, batch, 3, o)
            sizes = [len(b) for b in batches]
            assert len(batches) == num_batches(n, batch, o) and sizes == batch_sizes(n, batch, o)
            assert all(size > 0 for size in sizes), (n, batch, w, d, sizes)  # no empty batch
            assert all(size == batch for size in sizes[:-1])  # full batches, then the last
            assert not sizes or sizes[-1] <= (batch if d else batch + 1)
            seen.extend(np.concatenate(batches).tolist() if batches else [])
        assert len(seen) == len(set(seen))  # disjoint
        if d:
            assert len(seen) == w * counts.pop() * batch and n - len(seen) <= w * batch
        else:
            assert sorted(seen) == list(range(n)), (n, batch, w)  # every image exactly once


def test_an_odd_image_joins_the_last_batch():
    ranks = [Order(rank=r, world_size=2) for r in range(2)]
    assert [batch_sizes(9, 4, o) for o in ranks] == [[5], [4]]
    assert [batch_sizes(129, 32, o) for o in ranks] == [[32, 33], [32, 32]]
    assert [batch_sizes(11, 4, o) for o in ranks] == [[4, 2], [4, 1]]  # nothing to move when the counts agree


@pytest.mark.parametrize("n, world", [(0, 1), (1, 2), (3, 4)])
def test_fewer_images_than_ranks_is_refused(n, world):
    order = Order(rank=world - 1, world_size=world)
    for call in (
        lambda: shard_size(n, order),
        lambda: num_batches(n, 8, order),
        lambda: epoch_batches(n, 8, 0, order),
    ):
        with pytest.raises(ValueError, match=f"{n} image\\(s\\) cannot be shared by {world} ranks"):
            call()
