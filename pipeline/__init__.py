"""CIFAR-10 data: reading, the one augmentation spec, and the two loaders built from it."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data import CLASSES, DataError, load_cifar10, resolve_root
from pipeline.spec import AugSpec

LOADERS = ("cpu", "dali")


def make_loader(
    kind: str,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    spec: AugSpec | None = None,
    train: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
):
    """An iterable with len() yielding (x, y): x float32 [B,3,H,W] channels_last, normalized by `spec`, y int64 [B].

    kind "cpu": albumentations in DataLoader workers (the reference). kind "dali": NVIDIA DALI, GPU operators when
    `device` is CUDA, DALI's CPU operators otherwise. `train=False` means normalization only. Across ranks every
    sample comes exactly once per epoch; each pass over the loader is the next epoch (`set_epoch` to choose).
    """
    spec = spec or AugSpec()
    if kind not in LOADERS:
        raise ValueError(f"unknown loader {kind!r}; choose one of {', '.join(LOADERS)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    args = dict(
        spec=spec,
        train=train,
        device=device,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        workers=workers,
    )
    if kind == "cpu":
        from pipeline.albu_loader import AlbumentationsLoader

        return AlbumentationsLoader(images, labels, batch_size, **args)
    from pipeline.dali_loader import DaliLoader

    return DaliLoader(images, labels, batch_size, **args)


__all__ = ["AugSpec", "CLASSES", "DataError", "LOADERS", "load_cifar10", "make_loader", "resolve_root"]
