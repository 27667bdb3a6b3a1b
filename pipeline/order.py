"""Which images a rank sees in an epoch, in what batches: shared by both loaders so they agree sample for sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Order:
    """The shard and order settings a loader takes (instead of five keyword arguments).

    seed:       the epoch's permutation comes from (seed, epoch) alone, so every rank computes the same one
    shuffle:    False keeps the dataset's order (evaluation, predictions)
    drop_last:  leave out the images that do not fill a last whole batch
    rank, world_size: this process's shard of the epoch under torchrun (0 and 1 alone)

    Raises ValueError for a rank outside [0, world_size).
    """

    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")


def epoch_indices(n: int, epoch: int, order: Order) -> np.ndarray:
    """This rank's dataset indices for `epoch`, in order.

    The permutation depends only on (seed, epoch), so every rank computes the same one and takes a disjoint stride of
    it (rank, rank + world_size, ...), as DistributedSampler does, but without padding: across ranks every sample
    appears exactly once per epoch (shards may differ in length by one).
    """
    permutation = np.random.default_rng([order.seed, epoch]).permutation(n) if order.shuffle else np.arange(n)
    return permutation[order.rank :: order.world_size]


def shard_size(n: int, order: Order) -> int:
    """Images in this rank's shard of an n-image epoch."""
    return len(range(order.rank, n, order.world_size))


def num_batches(n: int, batch_size: int, order: Order) -> int:
    """Batches this rank's loader yields per epoch of an n-image split."""
    size = shard_size(n, order)
    return size // batch_size if order.drop_last else math.ceil(size / batch_size)


def epoch_batches(n: int, batch_size: int, epoch: int, order: Order) -> list[np.ndarray]:
    """This rank's batches of dataset indices for `epoch`: what both loaders yield, batch by batch."""
    indices = epoch_indices(n, epoch, order)
    return [indices[b * batch_size : (b + 1) * batch_size] for b in range(num_batches(n, batch_size, order))]


def sample_seeds(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """One seed per image for an epoch's albumentations draws (the CPU loader): deterministic for any number of
    DataLoader workers, and independent of which rank or batch an image lands in."""
    return np.random.default_rng([seed, epoch, 0xA1B]).integers(0, 2**63 - 1, size=n, dtype=np.int64)
