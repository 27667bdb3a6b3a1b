"""The albumentations CPU loader: the reference the DALI loader is held to.

One function turns the AugSpec into an albumentations Compose of each unit's twin (pipeline/augs/); a torch
DataLoader runs it in worker processes and hands back normalized float batches in channels_last layout.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from pipeline import usable_cores
from pipeline.order import Order, epoch_batches, num_batches, sample_seeds, shard_size
from pipeline.spec import AugSpec

# albumentations does its work on one core per worker; OpenCV's own threads would only fight the workers.
cv2.setNumThreads(0)


def build_transform(spec: AugSpec, height: int, width: int, train: bool = True) -> A.Compose:
    """The albumentations pipeline for `spec` and (height, width) images: each included unit's twin, in composition
    order, then Normalize; Normalize alone when `train` is False."""
    normalize = A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0)
    return A.Compose([unit.albu(height, width) for unit in spec.included] + [normalize] if train else [normalize])


class _AugmentedImages(torch.utils.data.Dataset):
    """Images with their labels; each item is augmented with its own seed so results do not depend on workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: A.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Whole batches per call: one round trip to the worker per batch, not per image.
        out = np.empty((len(keys), *self.images.shape[1:]), dtype=np.float32)
        for j, (index, seed) in enumerate(keys):
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
            out[j] = self.transform(image=self.images[index])["image"]
        indices = [index for index, _ in keys]
        return torch.from_numpy(out), torch.from_numpy(self.labels[indices])


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of (index, seed) keys for this rank; the epoch is set by the loader before each pass."""

    def __init__(self, n: int, batch_size: int, order: Order):
        self.n, self.batch_size, self.order = n, batch_size, order
        self.epoch = 0

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, self.order)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        seeds = sample_seeds(self.n, seed=self.order.seed, epoch=self.epoch)
        for batch in epoch_batches(self.n, self.batch_size, self.epoch, self.order):
            yield [(int(i), int(seeds[i])) for i in batch]


def _already_collated(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class AlbumentationsLoader:
    """Yields (x, y): x float32 [B,3,H,W] channels_last, normalized by the spec; y int64 [B]; both on `device`.

    Each pass over the loader is one epoch; the epoch number advances by itself after every pass and can be set with
    `set_epoch` (to resume, or to mirror DistributedSampler). Which images, in what batches: `order`
    (pipeline.order), as the DALI loader. Satisfies pipeline.Loader.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        spec: AugSpec,
        train: bool,
        order: Order,
        device: str | torch.device,
        workers: int | None,
    ):
        height, width = images.shape[1:3]
        if train:
            spec.check_image_size(height, width)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.workers = usable_cores() if workers is None else workers
        self.sampler = _EpochBatches(len(images), batch_size, order)
        self.num_samples = shard_size(len(images), order)
        dataset = _AugmentedImages(images, labels, build_transform(spec, height, width, train))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "This DataLoader will create N worker processes" notes
            self._loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=self.sampler,
                collate_fn=_already_collated,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0,  # workers keep their imports and state between epochs
                prefetch_factor=4 if self.workers > 0 else None,
            )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch = self.epoch
        self.epoch += 1
        for x, y in self._loader:
            # NHWC -> NCHW view: exactly channels_last memory, no copy; .to() keeps the strides.
            x = x.permute(0, 3, 1, 2).to(self.device, non_blocking=True)
            yield x, y.to(self.device, non_blocking=True)
