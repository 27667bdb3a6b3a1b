"""Benchmark peers: the two GPU augmentation paths a user would compare DALI with. Not training loaders.

Both keep the training set on the device (uint8 NHWC) and iterate like pipeline.make_loader's loaders, in their order.

* "torch": DALI's very epoch parameters (pipeline.params) applied in plain torch, the airbench way: the warp as
  `F.affine_grid` + `F.grid_sample` with border padding (OpenCV's BORDER_REPLICATE), pad-and-crop a clamped
  whole-pixel gather, cutout a mask blend: the reference's pixels up to float rounding.
* "kornia": `kornia.augmentation` with the spec's rates and ranges. It differs from the spec where kornia has its
  own way: a continuous shift-scale-rotate shift (the spec truncates to whole pixels), and parameters drawn from
  torch's global generator, so an epoch's augmentations are not a function of (seed, epoch); its order is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.dali_loader import CHUNK_IMAGES, graph_layout
from pipeline.errors import ConfigError
from pipeline.order import Order, epoch_batches, num_batches
from pipeline.params import draw_params, epoch_generator, grid_shifts, hole_boxes, sampling_matrices
from pipeline.spec import AugSpec

PEERS = ("kornia", "torch")
KORNIA_TWINS = ("ssr", "flip", "pad_crop", "cutout")  # the units kornia_augment writes with kornia's modules


def peer_available(kind: str) -> bool:
    """Whether peer `kind` can run here (kornia is an optional dependency; plain torch always can)."""
    return kind != "kornia" or importlib.util.find_spec("kornia") is not None


def grid_matrices(matrices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 2, 3) float32 destination->source matrices in OpenCV pixel-centre coordinates (pixel i's centre at i, as
    `sampling_matrices` returns them) -> the same maps in `F.affine_grid`'s coordinates for align_corners=False
    (pixel i's centre at (2i + 1) / size - 1): theta = P @ A @ P^-1 with P(i) = (2 / size) i + (1 / size - 1)."""
    options = dict(dtype=torch.float64, device=matrices.device)
    to_norm = torch.tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]], **options)
    from_norm = torch.tensor([[width / 2, 0, (width - 1) / 2], [0, height / 2, (height - 1) / 2], [0, 0, 1]], **options)
    full = torch.cat([matrices.double(), to_norm[2:].expand(len(matrices), 1, 3)], 1)  # (N, 3, 3)
    return (to_norm @ full @ from_norm)[:, :2].float()


def torch_augment(
    pixels: torch.Tensor,
    theta: torch.Tensor,
    shifts: torch.Tensor,
    boxes: torch.Tensor,
    spec: AugSpec,
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """The spec's augmentations and normalize on one batch, in plain torch, in the units' order: the composed warp
    (shift-scale-rotate, flip), then the whole-pixel shift (pad-and-crop), then the holes (cutout).

    pixels: uint8 [B, H, W, 3]; theta: float32 [B, 2, 3] from `grid_matrices`; shifts: float32 [B, 2k] (x, y)
    offsets from `grid_shifts`, k <= 1 (k = 0: none); boxes: float32 [B, 4k] [y0, x0, y1, x1) from `hole_boxes`
    (empty where not applied); scale, bias: float32 [1, 3, 1, 1] with x * scale + bias = (x / 255 - mean) / std.
    Returns float32 [B, 3, H, W] channels_last."""
    x = pixels.permute(0, 3, 1, 2).float()
    n, _, height, width = x.shape
    grid = F.affine_grid(theta, [n, 3, height, width], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ys, xs = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    if shifts.shape[1]:
        # output (x, y) = warped(x + dx, y + dy), the index clamped to the image: replicate padding, then the crop
        rows = (ys + shifts[:, 1:2].long()).clamp(0, height - 1)  # (B, H)
        cols = (xs + shifts[:, 0:1].long()).clamp(0, width - 1)  # (B, W)
        x = x.gather(2, rows.view(n, 1, height, 1).expand(n, 3, height, width))
        x = x.gather(3, cols.view(n, 1, 1, width).expand(n, 3, height, width))
    ys, xs = ys.view(1, 1, height, 1), xs.view(1, 1, 1, width)
    y0, x0, y1, x1 = boxes.view(n, boxes.shape[1] // 4, 4, 1, 1).unbind(2)  # each (B, k, 1, 1)
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # (B, k, H, W): the k Box units in order
    # each Box unit's own fill, the uint8 level the reference writes (pipeline.dali_loader.graph_layout); explicit
    # parameters may leave the Box units out: then there is nothing to fill
    for k, fill in zip(range(inside.shape[1]), graph_layout(spec).fills, strict=False):
        x = torch.where(inside[:, k : k + 1], float(fill), x)
    return torch.addcmul(bias, x, scale).contiguous(memory_format=torch.channels_last)


def kornia_augment(spec: AugSpec, height: int, width: int) -> torch.nn.Module:
    """The spec as kornia.augmentation modules, for float [B, 3, height, width] images in [0, 1]. Raises
    ConfigError without kornia."""
    if not peer_available("kornia"):
        raise ConfigError("kornia is not installed: pip install -e '.[bench]' (or pip install 'kornia>=0.7')")
    import kornia.augmentation as K

    # a unit added to pipeline/augs/ without a kornia twin below would be left out silently: refused instead
    missing = [unit.name for unit in spec.included if unit.name not in KORNIA_TWINS]
    if missing:
        raise ValueError(f"the kornia peer has no twin for {', '.join(missing)} (bench/peers.py kornia_augment)")

    class OneHoleCutout(K.RandomErasing):
        """RandomErasing with one hole drawn by the spec's law instead of kornia's area/aspect-ratio law (whose
        sides can reach the image size), gated by kornia with the spec's cutout_p."""

        def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
            n, h, w = batch_shape[0], batch_shape[-2], batch_shape[-1]
            # the gate is kornia's p; every drawn box is a hole
            always = dataclasses.replace(spec, cutout=dataclasses.replace(spec.cutout, p=1.0))
            y0, x0, y1, x1 = hole_boxes(draw_params(always, n, h, w, torch.default_generator, "cpu")).T
            return {"xs": x0, "ys": y0, "widths": x1 - x0, "heights": y1 - y0, "values": torch.full((n,), self.value)}

    delta = spec.ssr.scale_max_delta
    steps: list[torch.nn.Module] = [
        K.RandomAffine(
            degrees=spec.ssr.rotate_max_deg,
            translate=(spec.ssr.shift_max_frac, spec.ssr.shift_max_frac),
            scale=(1 - delta, 1 + delta),  # two values: isotropic
            padding_mode="border",
            align_corners=False,
            p=spec.ssr.p,
        ),
        K.RandomHorizontalFlip(p=spec.flip.p),
    ]
    if spec.pad_crop.px:  # pad-and-crop: whole-pixel window offsets uniform over {-N .. N}, replicate border
        steps.append(K.RandomCrop((height, width), padding=spec.pad_crop.px, padding_mode="replicate"))
    steps += [
        OneHoleCutout(value=spec.cutout.fill_uint8 / 255, p=spec.cutout.p),
        K.Normalize(mean=torch.tensor(spec.mean), std=torch.tensor(spec.std)),
    ]
    return torch.nn.Sequential(*steps)


class PeerLoader:
    """Peer `kind` ("torch" or "kornia") over images uint8 [N, H, W, 3] and labels [N]: each pass one epoch of
    (x float32 [B, 3, H, W] channels_last normalized, y int64 [B]) on `device`, as pipeline.make_loader's loaders.
    Raises ValueError for an unknown kind, ConfigError when kornia is asked for and missing."""

    def __init__(
        self,
        kind: str,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        spec: AugSpec | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if kind not in PEERS:
            raise ValueError(f"unknown peer {kind!r}; choose one of {', '.join(PEERS)}")
        self.kind, self.spec, self.device = kind, spec or AugSpec(), torch.device(device)
        self.batch_size = batch_size
        self.order = Order(seed=seed, shuffle=shuffle, drop_last=drop_last)
        self.spec.check_image_size(*images.shape[1:3])  # as the loaders do: a spec that cannot work is refused
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(np.asarray(labels, np.int64)).to(self.device)
        self.num_samples = len(images)
        self.epoch = 0
        scale, shift = self.spec.pixel_scale_shift()
        self._scale = torch.tensor(scale, device=self.device).view(1, 3, 1, 1)
        self._bias = -torch.tensor(shift, device=self.device).view(1, 3, 1, 1)
        height, width = images.shape[1:3]
        self._kornia = kornia_augment(self.spec, height, width).to(self.device) if kind == "kornia" else None

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        chosen = epoch_batches(self.num_samples, self.batch_size, epoch, self.order)
        index = torch.from_numpy(np.concatenate(chosen) if chosen else np.zeros(0, np.int64)).to(self.device)
        # the DALI loader's generator for (seed, epoch, rank): the torch peer draws the very parameters DALI does
        generator = epoch_generator(self.order.seed, epoch, self.order.rank, self.device)
        augment = self._epoch_augment(generator, len(index))
        # a chunk of whole batches at a time, as the DALI loader does, handed out as views: the same design compared
        ends = np.cumsum([len(b) for b in chosen]).tolist()
        spans = list(zip([0, *ends[:-1]], ends, strict=True))
        per_chunk = max(1, CHUNK_IMAGES // self.batch_size)
        for first in range(0, len(spans), per_chunk):
            group = spans[first : first + per_chunk]
            rows = slice(group[0][0], group[-1][1])
            x, y = augment(self.images[index[rows]], rows), self.labels[index[rows]]
            for a, b in group:
                yield x[a - rows.start : b - rows.start], y[a - rows.start : b - rows.start]

    def _epoch_augment(self, generator: torch.Generator, n: int) -> Callable[[torch.Tensor, slice], torch.Tensor]:
        """The function that augments the images at `rows` of this epoch's `n` (its order's positions)."""
        if self._kornia is not None:
            kornia = self._kornia

            def with_kornia(pixels: torch.Tensor, rows: slice) -> torch.Tensor:
                x = pixels.permute(0, 3, 1, 2).float().div_(255)
                return kornia(x).contiguous(memory_format=torch.channels_last)

            return with_kornia
        # the airbench way: the whole epoch's parameters in one pass (.to: a unit missing gives an empty CPU tensor)
        height, width = self.images.shape[1:3]
        params = draw_params(self.spec, n, height, width, generator, self.device)
        theta = grid_matrices(sampling_matrices(params, height, width).to(self.device), height, width)
        shifts, boxes = grid_shifts(params).to(self.device), hole_boxes(params).to(self.device)

        def with_torch(pixels: torch.Tensor, rows: slice) -> torch.Tensor:
            return torch_augment(pixels, theta[rows], shifts[rows], boxes[rows], self.spec, self._scale, self._bias)

        return with_torch
