"""Pad-and-crop: the standard CIFAR-10 translation by up to pad_crop_px whole pixels; opt-in (0 = off).

The ResNet papers pad 4 px on each side and take a random 32x32 crop (He et al. 2016, section 4.2); airbench uses
2 px. Turn it on with `--aug pad_crop_px=4`. Per image, albumentations' RandomCrop on the padded image draws the
window's top-left corner as int((2N + 1) * U(0, 1)) per axis (`get_crop_coords`), so the window's offset from the
original image, (crop_x, crop_y), is uniform over {-N .. N} in each axis, independently: output pixel (x, y) is
input pixel (x + crop_x, y + crop_y).

Border: replicate (edge pixels repeated), not the papers' zeros. It is the border the composed warp already has
(DALI clamps the sampling coordinates; see pipeline/augs/ssr.py), so both loaders do exactly the same with no new
operation in the GPU graph: clamping the whole-pixel grid before the warp is the replicate padding. It composes as a
`Shift`, not as a factor folded into the warp's matrix, because albumentations replicates twice when a shift-scale-
rotate came first (Affine's border, then the pad's), which one clamp after one matrix cannot reproduce.

It applies after shift-scale-rotate and flip and before cutout (the hole is placed in the final image, as in
the usual crop -> flip -> cutout recipe).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.augs.probe import (
    Convention,
    Discrete,
    Holds,
    Probe,
    fit_sampling,
    ramp_image,
    ramp_sources,
    uniform_integers,
)
from pipeline.augs.unit import Aug, Columns, Field, Shift, check, check_count

if TYPE_CHECKING:
    from pipeline.spec import AugSpec


RESNET_PX = 4  # the ResNet papers' padding: what the probe and the gallery use when a spec leaves it off


def check_fields(spec: AugSpec) -> None:
    check_count(spec, "pad_crop_px", 0)


def check_image(spec: AugSpec, height: int, width: int) -> None:
    # At N >= size the window can lie entirely in the padding: an image of one replicated edge pixel.
    most = min(height, width) - 1
    check(
        spec.pad_crop_px <= most,
        f"pad_crop_px={spec.pad_crop_px} lets the crop miss a {height}x{width} image entirely; use at most {most}",
    )


def draw(spec: AugSpec, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    n = spec.pad_crop_px
    return {"crop_y": torch.floor(u[0] * (2 * n + 1)) - n, "crop_x": torch.floor(u[1] * (2 * n + 1)) - n}


def offsets(columns: Columns) -> torch.Tensor:
    return torch.stack([columns["crop_x"], columns["crop_y"]], -1).float()


def albu(spec: AugSpec, height: int, width: int) -> Any:
    import albumentations as A  # (imported on use: slow to import, and the DALI path never needs it)
    import cv2

    n = spec.pad_crop_px
    return A.Sequential(
        [
            A.PadIfNeeded(height + 2 * n, width + 2 * n, position="center", border_mode=cv2.BORDER_REPLICATE),
            A.RandomCrop(height, width),
        ],
        p=1.0,
    )


def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
    pad, crop = transform.transforms
    height, width = image.shape[:2]
    n = (pad.min_height - height) // 2
    padded = pad.apply(image, pad_top=n, pad_bottom=n, pad_left=n, pad_right=n)
    x0, y0 = int(row["crop_x"]) + n, int(row["crop_y"]) + n
    return crop.apply(padded, crop_coords=(x0, y0, x0 + width, y0 + height))


def read(spec: AugSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The window's offset from a translated ramp image, and whether the rest is a replicated edge."""
    height, width = pixels.shape[1:3]
    a, b, c, d, e, f = fit_sampling(pixels)
    crop_x, crop_y = np.round(c).astype(np.int64), np.round(f).astype(np.int64)
    src_x, src_y = ramp_sources(pixels)
    y, x = np.mgrid[0:height, 0:width]
    # every pixel, padding included, is the input pixel at the clamped position (x + crop_x, y + crop_y)
    want_x = np.clip(x + crop_x[:, None, None], 0, width - 1)
    want_y = np.clip(y + crop_y[:, None, None], 0, height - 1)
    return {
        "crop_x": crop_x,
        "crop_y": crop_y,
        "whole_pixel_translation": (np.abs(a - 1) + np.abs(b) + np.abs(d) + np.abs(e - 1) < 1e-3)
        & (np.abs(c - crop_x) < 0.05)
        & (np.abs(f - crop_y) < 0.05),
        "replicate_border": (np.abs(src_x - want_x) < 0.1).all((1, 2)) & (np.abs(src_y - want_y) < 0.1).all((1, 2)),
    }


def expect(spec: AugSpec, height: int, width: int) -> list:
    n = spec.pad_crop_px
    return [
        Discrete("crop_x", uniform_integers(-n, n)),
        Discrete("crop_y", uniform_integers(-n, n)),
        Holds("whole_pixel_translation"),
        Holds("replicate_border"),
    ]


_WINDOWS = ((0, 0), (4, -4), (-4, 4), (3, 1), (-2, -3), (1, 0), (0, -1), (4, 4), (-4, -4))

UNIT = Aug(
    name="pad_crop",
    fields=(
        Field(
            "pad_crop_px", 0, "pad-and-crop: translate by up to this many whole px per axis (replicate border); 0 = off"
        ),
    ),
    check=check_fields,
    check_image=check_image,
    off={"pad_crop_px": 0},
    shown=lambda spec: {"pad_crop_px": spec.pad_crop_px or RESNET_PX},
    columns={"crop_x": 0.0, "crop_y": 0.0},
    uniforms=2,
    draw=draw,
    effect=Shift(offsets),
    albu=albu,
    albu_apply=albu_apply,
    probe=Probe(
        image=ramp_image,
        read=read,
        expect=expect,
        rows=tuple({"crop_x": float(x), "crop_y": float(y)} for x, y in _WINDOWS),
        on={"pad_crop_px": RESNET_PX},
        conventions=(
            # the window moved the other way (the content moved by crop instead of by -crop)
            Convention(
                "crop direction",
                tuple({"crop_x": float(x), "crop_y": float(y)} for x, y in _WINDOWS[1:5]),
                lambda row: {"crop_x": -row["crop_x"], "crop_y": -row["crop_y"]},
            ),
        ),
    ),
    enabled=lambda spec: spec.pad_crop_px > 0,
)
