"""Cutout: one rectangular hole with a constant fill, with probability cutout_p (the seed's CoarseDropout, 1 hole).

Per image, when applied: hole height and width drawn independently and uniformly from {cutout_min_px ..
cutout_max_px}, the top-left corner uniformly from {0 .. size - hole}, so the hole lies fully inside the image
(albumentations 2.x's CoarseDropout with integer ranges).

Fill: mid-grey, 0.5 in [0, 1] units, written as the uint8 level 128. The seed wrote fill_value=0.5 on a uint8 image,
which albumentations casts to 0 (black); mid-grey is what it meant, and after Normalize(0.5, 0.5) it is (almost
exactly) zero, "no information".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.augs.probe import Convention, Coverage, Discrete, Holds, Probe, Rate, uniform_integers
from pipeline.augs.unit import Aug, Box, Columns, Field, check, check_count, check_number, check_probability

if TYPE_CHECKING:
    from pipeline.spec import AugSpec


def check_fields(spec: AugSpec) -> None:
    check_probability(spec, "cutout_p")
    check_count(spec, "cutout_min_px", 1)
    check_count(spec, "cutout_max_px", 1)
    check(
        spec.cutout_min_px <= spec.cutout_max_px,
        f"cutout_min_px ({spec.cutout_min_px}) must be <= cutout_max_px ({spec.cutout_max_px})",
    )
    check_number(spec, "cutout_fill")
    check(spec.cutout_fill <= 1.0, f"cutout_fill is in [0, 1] image units, got {spec.cutout_fill}")


def check_image(spec: AugSpec, height: int, width: int) -> None:
    # A hole larger than the image cannot be placed: albumentations raises, and a capped size would not be the
    # distribution the spec states.
    for name in ("cutout_min_px", "cutout_max_px"):
        value = getattr(spec, name)
        check(
            value <= min(height, width),
            f"{name}={value} does not fit a {height}x{width} image; use at most {min(height, width)}",
        )


def fill_uint8(spec: AugSpec) -> int:
    """The fill as the uint8 level both loaders write (they cut out on uint8 images, before Normalize)."""
    return int(round(spec.cutout_fill * 255))


def draw(spec: AugSpec, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    sizes = spec.cutout_max_px - spec.cutout_min_px + 1
    hole_h = spec.cutout_min_px + torch.floor(u[1] * sizes)
    hole_w = spec.cutout_min_px + torch.floor(u[2] * sizes)
    return {
        "cutout": u[0] < spec.cutout_p,
        "hole_y": torch.floor(u[3] * (height - hole_h + 1)),
        "hole_x": torch.floor(u[4] * (width - hole_w + 1)),
        "hole_h": hole_h,
        "hole_w": hole_w,
    }


def box(columns: Columns) -> torch.Tensor:
    """(N, 4) [y0, x0, y1, x1) in output pixels; an empty box where cutout is off."""
    on = columns["cutout"]
    y0, x0 = columns["hole_y"], columns["hole_x"]
    y1, x1 = y0 + columns["hole_h"], x0 + columns["hole_w"]
    return torch.stack([torch.where(on, v, 0.0) for v in (y0, x0, y1, x1)], -1).float()


def albu(spec: AugSpec, height: int, width: int) -> Any:
    import albumentations as A  # (imported on use: slow to import, and the DALI path never needs it)

    return A.CoarseDropout(
        num_holes_range=(1, 1),
        hole_height_range=(spec.cutout_min_px, spec.cutout_max_px),
        hole_width_range=(spec.cutout_min_px, spec.cutout_max_px),
        fill=fill_uint8(spec),
        p=spec.cutout_p,
    )


def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
    if not row["cutout"]:
        return image
    y0, x0 = int(row["hole_y"]), int(row["hole_x"])
    holes = np.array([[x0, y0, x0 + int(row["hole_w"]), y0 + int(row["hole_h"])]])
    return transform.apply(image, holes=holes, seed=0)


def probe_image(spec: AugSpec, height: int, width: int) -> np.ndarray:
    """Flat, and as far from the fill as a uint8 level can be, so the hole is every pixel near the fill."""
    return np.full((height, width, 3), 255 if fill_uint8(spec) < 128 else 0, np.uint8)


def read(spec: AugSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    hole = np.abs(pixels[..., 2] - fill_uint8(spec)) < 64
    hole_h, hole_w = hole.any(2).sum(1), hole.any(1).sum(1)
    return {
        "cutout": hole.any((1, 2)),
        "hole": hole,
        "hole_h": hole_h,
        "hole_w": hole_w,
        "hole_is_rectangle": hole.sum((1, 2)) == hole_h * hole_w,
    }


def coverage(spec: AugSpec, height: int, width: int) -> np.ndarray:
    """P(pixel in the hole), per pixel: size uniform, top-left corner uniform in [0, size - hole]."""

    def line(length: int) -> np.ndarray:
        sizes = range(spec.cutout_min_px, spec.cutout_max_px + 1)
        out = np.zeros(length)
        for size in sizes:
            for start in range(length - size + 1):
                out[start : start + size] += 1 / (len(sizes) * (length - size + 1))
        return out

    return spec.cutout_p * np.outer(line(height), line(width))


def expect(spec: AugSpec, height: int, width: int) -> list:
    sizes = uniform_integers(spec.cutout_min_px, spec.cutout_max_px)
    return [
        Rate("cutout", spec.cutout_p),
        Discrete("hole_h", sizes, given="cutout"),
        Discrete("hole_w", sizes, given="cutout"),
        Coverage("hole", coverage(spec, height, width)),
        Holds("hole_is_rectangle"),
    ]


_HOLES = ((0, 0, 1, 1), (20, 20, 12, 12), (5, 17, 3, 9), (31, 0, 1, 12), (10, 31, 12, 1), (8, 12, 4, 10))


def _hole(y: int, x: int, h: int, w: int) -> dict[str, Any]:
    return {"cutout": True, "hole_y": y, "hole_x": x, "hole_h": h, "hole_w": w}


def _transposed(row: Mapping[str, Any]) -> dict[str, Any]:
    return _hole(row["hole_x"], row["hole_y"], row["hole_w"], row["hole_h"])


UNIT = Aug(
    name="cutout",
    fields=(
        Field("cutout_p", 0.5, "probability of one cutout hole"),
        Field("cutout_min_px", 1, "smallest hole height and width, px"),
        Field("cutout_max_px", 12, "largest hole height and width, px"),
        Field("cutout_fill", 0.5, "fill in [0, 1] image units, written as the nearest uint8 level"),
    ),
    check=check_fields,
    check_image=check_image,
    off={"cutout_p": 0.0},
    shown=lambda spec: {"cutout_p": 1.0},
    columns={"cutout": False, "hole_y": 0.0, "hole_x": 0.0, "hole_h": 0.0, "hole_w": 0.0},
    uniforms=5,
    draw=draw,
    effect=Box(box, fill_uint8),
    albu=albu,
    albu_apply=albu_apply,
    probe=Probe(
        image=probe_image,
        read=read,
        expect=expect,
        rows=tuple(_hole(*h) for h in _HOLES),
        conventions=(
            # rows and columns swapped: what mixing up (y, x) and albumentations' (x, y) hole corners gives
            Convention("hole axes", tuple(_hole(*h) for h in _HOLES[2:]), _transposed),
        ),
    ),
    properties={"cutout_fill_uint8": fill_uint8},
)
