"""CIFAR-10 data: reading, the one augmentation spec, and the two loaders built from it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.data import load_cifar10, resolve_root
from pipeline.errors import ConfigError, DataError
from pipeline.order import Order, check_seed
from pipeline.spec import AugSpec

LOADERS = ("cpu", "dali")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as taskset or a container sets it; else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Worker processes (cpu) or DALI threads per usable core at most: past one per core nothing is gained, and each
# DataLoader worker is a ~200 MB process, so a typo like 100000 would exhaust memory. 4 leaves room to oversubscribe.
WORKERS_PER_CORE_MAX = 4


def check_workers(workers: int | None, name: str = "workers", kind: str = "cpu") -> None:
    """Refuse a worker count loader `kind` cannot use: below 0 (cpu: 0 is the main process alone) or 1 (dali: its
    threads), or more than WORKERS_PER_CORE_MAX per usable core. None (the loader's default) passes. `name` is what
    the message calls it (a flag, for a command line). Raises ConfigError with one line that names the limit."""
    if workers is None:
        return
    if kind == "dali" and workers == 0:
        raise ConfigError(
            f"{name} 0: the DALI loader needs at least one thread (0 means the main process alone only "
            f"for the cpu loader); use {name} 1 or more, or leave it out for the default"
        )
    if workers < 0:
        raise ConfigError(f"{name} must be >= 0, got {workers}")
    cores = usable_cores()
    if workers > WORKERS_PER_CORE_MAX * cores:
        raise ConfigError(
            f"{name} {workers} is more than {WORKERS_PER_CORE_MAX} per usable core ({cores} cores here: at most "
            f"{WORKERS_PER_CORE_MAX * cores}); more buy no speed and each worker process costs memory"
        )


@runtime_checkable
class Loader(Protocol):
    """What both loaders are, and all that train, bench and the gallery use of them.

    Iterating yields one epoch of (x, y): x float32 [B, 3, H, W] channels_last, normalized; y int64 [B]; on the
    loader's device. Each pass is the next epoch; `set_epoch(e)` makes the next pass epoch e (to resume). `len()` is
    the batches per epoch, the same on every rank; `num_samples` the images in this rank's shard of an epoch."""

    num_samples: int
    workers: int  # in use: DataLoader worker processes (cpu; 0 = the main process) or DALI threads (dali)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def make_loader(
    kind: str,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    spec: AugSpec | None = None,
    train: bool = True,
    order: Order | None = None,
    device: str | torch.device = "cpu",
    workers: int | None = None,
) -> Loader:
    """A Loader over uint8 images [N, H, W, 3] and int64 labels [N], in batches of `batch_size` per rank.

    kind "cpu": albumentations in DataLoader workers (the reference). kind "dali": NVIDIA DALI, GPU operators when
    `device` is CUDA, DALI's CPU operators otherwise. `spec` (default: the seed's) says how to augment and normalize;
    `train=False` means normalization only. `order` (default: shuffled from seed 0, one rank) says which images this
    rank sees and in what batches: across ranks every image comes exactly once per epoch. `workers`: DataLoader
    worker processes (cpu) or DALI threads (check_workers bounds both). Raises ConfigError for a bad kind, batch
    size, worker count, image array or spec.
    """
    spec = spec or AugSpec()
    order = order or Order()
    if kind not in LOADERS:
        raise ConfigError(f"unknown loader {kind!r}; choose one of {', '.join(LOADERS)}")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    check_workers(workers, kind=kind)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ConfigError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    if kind == "cpu":
        from pipeline.albu_loader import AlbumentationsLoader

        return AlbumentationsLoader(
            images, labels, batch_size, spec=spec, train=train, order=order, device=device, workers=workers
        )
    from pipeline.dali_loader import DaliLoader

    return DaliLoader(images, labels, batch_size, spec=spec, train=train, order=order, device=device, workers=workers)


__all__ = ["AugSpec", "DataError", "Order", "check_seed", "load_cifar10", "resolve_root"]  # re-exported
