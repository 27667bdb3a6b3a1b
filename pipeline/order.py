"""Which images a rank sees in an epoch, in what order: shared by both loaders so they agree sample for sample."""

from __future__ import annotations

import math

import numpy as np


def epoch_indices(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's dataset indices for `epoch`, in order.

    The permutation depends only on (seed, epoch), so every rank computes the same one and takes a disjoint stride of
    it (rank, rank + world_size, ...), as DistributedSampler does, but without padding: across ranks every sample
    appears exactly once per epoch (shards may differ in length by one).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return order[rank::world_size]


def shard_size(n: int, rank: int, world_size: int) -> int:
    return len(range(rank, n, world_size))


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def sample_seeds(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """One seed per image for an epoch's albumentations draws (the CPU loader): deterministic for any number of
    DataLoader workers, and independent of which rank or batch an image lands in."""
    return np.random.default_rng([seed, epoch, 0xA1B]).integers(0, 2**63 - 1, size=n, dtype=np.int64)
