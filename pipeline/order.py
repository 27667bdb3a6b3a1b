"""Which images a rank sees in an epoch, in what batches: shared by both loaders so they agree sample for sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError

# The seeds that every consumer takes as themselves: numpy's SeedSequence (the order, the albumentations draws) wants a
# non-negative integer, DALI's pipeline seed is an int64 in which -1 means "pick one at random", and torch.manual_seed
# takes [-2**63, 2**64). Their intersection is [0, 2**63 - 1]; anything else is refused rather than folded into it,
# so that two different seeds never silently make the same run.
SEED_MAX = 2**63 - 1


def check_seed(seed: int) -> int:
    """`seed` itself if it is an integer in [0, SEED_MAX]; ConfigError (saying the range) otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"--seed must be an integer in [0, 2**63 - 1] = [0, {SEED_MAX}], got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class Order:
    """The shard and order settings a loader takes (instead of five keyword arguments).

    seed:       the epoch's permutation comes from (seed, epoch) alone, so every rank computes the same one
    shuffle:    False keeps the dataset's order (evaluation, predictions)
    drop_last:  leave out the images that do not fill a last whole batch
    rank, world_size: this process's shard of the epoch under torchrun (0 and 1 alone)

    Raises ConfigError for a seed outside [0, SEED_MAX] or a rank outside [0, world_size).
    """

    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")


def epoch_indices(n: int, epoch: int, order: Order) -> np.ndarray:
    """This rank's shard of `epoch`: its dataset indices, in order.

    The permutation depends only on (seed, epoch), so every rank computes the same one and takes a disjoint stride of
    it (rank, rank + world_size, ...), as DistributedSampler does but without padding: across ranks every image
    appears exactly once per epoch, and shards differ in length by at most one. Raises ConfigError if n < world_size.
    """
    check_every_rank_has_an_image(n, order)
    permutation = np.random.default_rng([order.seed, epoch]).permutation(n) if order.shuffle else np.arange(n)
    return permutation[order.rank :: order.world_size]


def shard_size(n: int, order: Order) -> int:
    """Images in this rank's shard of an n-image epoch: n // world_size, or one more for the first n % world_size
    ranks. Raises ConfigError if n < world_size."""
    check_every_rank_has_an_image(n, order)
    return len(range(order.rank, n, order.world_size))


def num_batches(n: int, batch_size: int, order: Order) -> int:
    """Batches per epoch of an n-image split: the same on every rank, by construction.

    It is counted on the smallest shard, k = n // world_size images: k // batch_size with drop_last, else
    ceil(k / batch_size). A rank whose shard holds one image more puts it into its last batch (see `batch_sizes`),
    so no rank ever waits for another's extra batch: DDP needs no Join and SyncBatchNorm cannot hang at the end of
    an epoch. Raises ConfigError if n < world_size.
    """
    check_every_rank_has_an_image(n, order)
    smallest = n // order.world_size
    return smallest // batch_size if order.drop_last else math.ceil(smallest / batch_size)


def batch_sizes(n: int, batch_size: int, order: Order) -> list[int]:
    """This rank's batch sizes per epoch: `batch_size` each, except without drop_last the last, which takes the
    rest of the shard: 1 .. batch_size + 1 images (batch_size + 1 when the smallest shard fills its batches exactly
    and this rank holds one image more). With drop_last every batch is full and a rank's leftover images (fewer
    than batch_size + 1) wait for another epoch's shuffle. Raises ConfigError if n < world_size."""
    count = num_batches(n, batch_size, order)
    if order.drop_last or count == 0:
        return [batch_size] * count
    return [batch_size] * (count - 1) + [shard_size(n, order) - (count - 1) * batch_size]


def epoch_batches(n: int, batch_size: int, epoch: int, order: Order) -> list[np.ndarray]:
    """This rank's batches of dataset indices for `epoch` (the shard of `epoch_indices` cut by `batch_sizes`): what
    both loaders yield, batch by batch. Raises ConfigError if n < world_size."""
    indices = epoch_indices(n, epoch, order)
    ends = np.cumsum(batch_sizes(n, batch_size, order))
    return np.split(indices[: ends[-1]], ends[:-1]) if len(ends) else []


def check_every_rank_has_an_image(n: int, order: Order) -> None:
    """ConfigError (one line, saying what to do) unless each of `order.world_size` ranks gets one of n images."""
    if n < order.world_size:
        raise ConfigError(
            f"{n} image(s) cannot be shared by {order.world_size} ranks: every rank needs at least one; "
            "use more images or fewer ranks"
        )


def sample_seeds(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """One seed per image for an epoch's albumentations draws (the CPU loader): deterministic for any number of
    DataLoader workers, and independent of which rank or batch an image lands in."""
    return np.random.default_rng([seed, epoch, 0xA1B]).integers(0, 2**63 - 1, size=n, dtype=np.int64)
