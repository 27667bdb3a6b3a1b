"""The albumentations CPU loader: the reference the DALI loader is held to.

One function turns the AugSpec into an albumentations Compose; a torch DataLoader runs it in worker processes and
hands back normalized float batches in channels_last layout.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterator

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.geometric import functional as fgeometric

from pipeline.order import epoch_indices, num_batches, sample_seeds, shard_size
from pipeline.spec import AugSpec

# albumentations does its work on one core per worker; OpenCV's own threads would only fight the workers.
cv2.setNumThreads(0)


def build_transform(spec: AugSpec, train: bool = True) -> A.Compose:
    """The albumentations pipeline for `spec`: the only place the CPU path turns spec values into transforms.

    ShiftScaleRotate is written as A.Affine, which albumentations 2.x's (deprecated) ShiftScaleRotate also wraps;
    keep_ratio=True keeps the seed's isotropic scale (the 2.x ShiftScaleRotate scales x and y independently).
    """
    normalize = A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0)
    if not train:
        return A.Compose([normalize])
    return A.Compose(
        [
            A.Affine(
                scale=(1 - spec.scale_max_delta, 1 + spec.scale_max_delta),
                translate_percent=(-spec.shift_max_frac, spec.shift_max_frac),
                rotate=(-spec.rotate_max_deg, spec.rotate_max_deg),
                shear=0,
                keep_ratio=True,
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_REPLICATE,
                p=spec.ssr_p,
            ),
            A.HorizontalFlip(p=spec.flip_p),
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(spec.cutout_min_px, spec.cutout_max_px),
                hole_width_range=(spec.cutout_min_px, spec.cutout_max_px),
                fill=spec.cutout_fill_uint8,
                p=spec.cutout_p,
            ),
            normalize,
        ]
    )


def apply_fixed(transform: A.Compose, image: np.ndarray, row: dict) -> np.ndarray:
    """Apply `transform` (from build_transform) to one HWC uint8 image with explicit parameters instead of random
    ones: the albumentations side of the parity tests' seam. `row` has AugParams' keys (see pipeline.params)."""
    affine, flip, dropout, normalize = transform.transforms
    shape = image.shape[:2]
    out = image
    if row.get("ssr"):
        scale = {"x": row.get("scale", 1.0), "y": row.get("scale", 1.0)}
        matrix = fgeometric.create_affine_transformation_matrix(
            translate={"x": row.get("shift_x", 0.0), "y": row.get("shift_y", 0.0)},
            shear={"x": 0.0, "y": 0.0},
            scale=scale,
            rotate=row.get("angle", 0.0),
            shift=fgeometric.center(shape),
        )
        out = affine.apply(out, matrix=matrix, output_shape=shape)
    if row.get("flip"):
        out = flip.apply(out)
    if row.get("cutout"):
        y0, x0 = int(row["hole_y"]), int(row["hole_x"])
        holes = np.array([[x0, y0, x0 + int(row["hole_w"]), y0 + int(row["hole_h"])]])
        out = dropout.apply(out, holes=holes, seed=0)
    return normalize.apply(out)


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

    def __init__(
        self, n: int, batch_size: int, *, seed: int, shuffle: bool, drop_last: bool, rank: int, world_size: int
    ):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return num_batches(shard_size(self.n, self.rank, self.world_size), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_indices(
            self.n, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, rank=self.rank, world_size=self.world_size
        )
        seeds = sample_seeds(self.n, seed=self.seed, epoch=self.epoch)
        for b in range(len(self)):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(int(i), int(seeds[i])) for i in chunk]


def _already_collated(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class AlbumentationsLoader:
    """Yields (x, y): x float32 [B,3,H,W] channels_last, normalized by the spec; y int64 [B]; both on `device`.

    Each pass over the loader is one epoch; the epoch number advances by itself after every pass and can be set with
    `set_epoch` (to resume, or to mirror DistributedSampler). The order is reshuffled from seed + epoch.
    """

    kind = "cpu"

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        spec: AugSpec,
        train: bool,
        device: str | torch.device,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        rank: int,
        world_size: int,
        workers: int | None,
    ):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        self.sampler = _EpochBatches(
            len(images), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size
        )
        self.num_samples = shard_size(len(images), rank, world_size)
        dataset = _AugmentedImages(images, labels, build_transform(spec, train))
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
