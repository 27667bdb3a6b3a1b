"""Shift-scale-rotate: one affine warp about the image centre with probability ssr_p (the seed's ShiftScaleRotate).

Written for albumentations as `A.Affine`, which its 2.x (deprecated) ShiftScaleRotate also wraps; `keep_ratio=True`
keeps the seed's isotropic scale (2.x's ShiftScaleRotate scales x and y independently). Per image, when applied:

  shift_x, shift_y   trunc(U(-f, f) * size) whole pixels: Affine turns the fraction into pixels with int(), so at
                     32 px and f = 0.05 it is -1, 0 or +1 px with probabilities 3/16, 5/8, 3/16
  scale              U(1 - d, 1 + d), isotropic
  angle              U(-r, r) degrees, counter-clockwise on screen for positive angles (OpenCV's convention)

Border: replicate (OpenCV BORDER_REPLICATE, the DALI warp's clamp), not albumentations' default reflect-101, which
DALI's warp cannot do.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.augs.probe import (
    Convention,
    Discrete,
    Holds,
    Probe,
    Rate,
    Uniform,
    fit_sampling,
    ramp_image,
    truncated_uniform,
)
from pipeline.augs.unit import Aug, Columns, Field, Warp, check, check_number, check_probability

if TYPE_CHECKING:
    from pipeline.spec import AugSpec


def check_fields(spec: AugSpec) -> None:
    check_probability(spec, "ssr_p")
    for name in ("shift_max_frac", "scale_max_delta", "rotate_max_deg"):
        check_number(spec, name)
    check(spec.shift_max_frac <= 1.0, f"shift_max_frac is a fraction of the size, <= 1; got {spec.shift_max_frac}")
    check(spec.scale_max_delta < 1.0, f"scale_max_delta must be < 1 (keeps scale > 0); got {spec.scale_max_delta}")
    check(spec.rotate_max_deg <= 180.0, f"rotate_max_deg must be <= 180, got {spec.rotate_max_deg}")


def check_image(spec: AugSpec, height: int, width: int) -> None:
    # Below one pixel the image is gone: what is left is the replicated border colour.
    smallest = (1 - spec.scale_max_delta) * min(height, width)
    check(
        smallest >= 1,
        f"scale_max_delta={spec.scale_max_delta} can shrink a {height}x{width} image to {smallest:.2g} px; "
        f"use at most {1 - 1 / min(height, width):.4g}",
    )


def draw(spec: AugSpec, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    # Where SSR is off its values are the identity's, so an image without SSR is never resampled.
    ssr = u[0] < spec.ssr_p
    return {
        "ssr": ssr,
        "shift_x": torch.where(ssr, torch.trunc((2 * u[1] - 1) * spec.shift_max_frac * width), 0.0),
        "shift_y": torch.where(ssr, torch.trunc((2 * u[2] - 1) * spec.shift_max_frac * height), 0.0),
        "scale": torch.where(ssr, 1 + (2 * u[3] - 1) * spec.scale_max_delta, 1.0),
        "angle": torch.where(ssr, (2 * u[4] - 1) * spec.rotate_max_deg, 0.0),
    }


def matrix(columns: Columns, height: int, width: int) -> torch.Tensor:
    """(N, 2, 3) float64: the inverse of dst = c + t + s R (src - c) about the centre c = (w/2 - 0.5, h/2 - 0.5)
    (albumentations' `center`), i.e. src = c + (1/s) R^T (dst - c - t), with R^T = [[cos, -sin], [sin, cos]]."""
    cx, cy = width / 2 - 0.5, height / 2 - 0.5
    ssr = columns["ssr"]
    rad = torch.deg2rad(torch.where(ssr, columns["angle"], 0.0).double())
    inv_s = 1.0 / torch.where(ssr, columns["scale"], 1.0).double()
    a, b = torch.cos(rad) * inv_s, -torch.sin(rad) * inv_s
    d, e = torch.sin(rad) * inv_s, torch.cos(rad) * inv_s
    ox = cx + torch.where(ssr, columns["shift_x"], 0.0).double()
    oy = cy + torch.where(ssr, columns["shift_y"], 0.0).double()
    c = cx - (a * ox + b * oy)
    f = cy - (d * ox + e * oy)
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], -2)


def albu(spec: AugSpec, height: int, width: int) -> Any:
    import albumentations as A  # (imported on use: slow to import, and the DALI path never needs it)
    import cv2

    return A.Affine(
        scale=(1 - spec.scale_max_delta, 1 + spec.scale_max_delta),
        translate_percent=(-spec.shift_max_frac, spec.shift_max_frac),
        rotate=(-spec.rotate_max_deg, spec.rotate_max_deg),
        shear=0,
        keep_ratio=True,
        interpolation=cv2.INTER_LINEAR,
        border_mode=cv2.BORDER_REPLICATE,
        p=spec.ssr_p,
    )


def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
    """Affine with explicit values: the matrix albumentations builds from its drawn ones, applied by its own code."""
    if not row["ssr"]:
        return image
    from albumentations.augmentations.geometric import functional as fgeometric

    shape = image.shape[:2]
    matrix = fgeometric.create_affine_transformation_matrix(
        translate={"x": row["shift_x"], "y": row["shift_y"]},
        shear={"x": 0.0, "y": 0.0},
        scale={"x": row["scale"], "y": row["scale"]},
        rotate=row["angle"],
        shift=fgeometric.center(shape),
    )
    return transform.apply(image, matrix=matrix, output_shape=shape)


def read(spec: AugSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The warp's parameters from a warped ramp image (no flip: the probe runs this unit alone)."""
    size_y, size_x = pixels.shape[1:3]
    a, b, c, d, e, f = fit_sampling(pixels)
    det = a * e - b * d
    inv_scale = np.sqrt(det)
    angle = np.degrees(np.arctan2(d, a))
    # src = M dst + v with v = centre - M (centre + t)  =>  t = M^-1 (centre - v) - centre
    cx, cy = size_x / 2 - 0.5, size_y / 2 - 0.5
    wx, wy = cx - c, cy - f
    shift_x = (e * wx - b * wy) / det - cx
    shift_y = (-d * wx + a * wy) / det - cy
    ssr = (np.abs(inv_scale - 1) > 1e-3) | (np.abs(angle) > 0.05) | (np.abs(shift_x) > 0.5) | (np.abs(shift_y) > 0.5)
    shift_err = np.maximum(np.abs(shift_x - np.round(shift_x)), np.abs(shift_y - np.round(shift_y)))
    return {
        "ssr": ssr,
        "scale": 1 / inv_scale,
        "angle": angle,
        "shift_x": np.round(shift_x).astype(np.int64),
        "shift_y": np.round(shift_y).astype(np.int64),
        "whole_pixel_shifts": ~ssr | (shift_err < 0.1),
        # a rotation and an isotropic scale, nothing else (no shear, no mirror)
        "rotation_and_scale": (np.abs(a - e) < 2e-3) & (np.abs(b + d) < 2e-3),
    }


def expect(spec: AugSpec, height: int, width: int) -> list:
    r, d = spec.rotate_max_deg, spec.scale_max_delta
    # (readings come from uint8 pixels, so each carries a small measurement error: the slack)
    return [
        Rate("ssr", spec.ssr_p),
        Uniform("angle", -r, r, given="ssr", slack=0.2),
        Uniform("scale", 1 - d, 1 + d, given="ssr", slack=3e-3),
        Discrete("shift_x", truncated_uniform(spec.shift_max_frac * width), given="ssr"),
        Discrete("shift_y", truncated_uniform(spec.shift_max_frac * height), given="ssr"),
        Holds("whole_pixel_shifts"),
        Holds("rotation_and_scale"),
    ]


def _rows() -> tuple[dict, ...]:
    shifts, scales, angles = ((0, 0), (1, -1), (-1, 1)), (0.95, 1.0, 1.05), (-5.0, -2.5, 0.0, 2.5, 5.0)
    return tuple(
        {"ssr": True, "shift_x": float(sx), "shift_y": float(sy), "scale": scale, "angle": angle}
        for (sx, sy), scale, angle in itertools.product(shifts, scales, angles)
    )


_TURNED = tuple([{"ssr": True, "angle": 5.0, "scale": 1.05}] * 4 + [{"ssr": True, "angle": -5.0, "scale": 0.95}] * 4)

UNIT = Aug(
    name="ssr",
    fields=(
        Field("ssr_p", 0.5, "probability of the shift-scale-rotate warp"),
        Field("shift_max_frac", 0.05, "shift drawn from U(-f, f) * size, truncated to whole pixels (albumentations)"),
        Field("scale_max_delta", 0.05, "isotropic scale drawn from U(1 - d, 1 + d)"),
        Field("rotate_max_deg", 5.0, "angle drawn from U(-r, r) degrees, counter-clockwise on screen for positive"),
    ),
    check=check_fields,
    check_image=check_image,
    off={"ssr_p": 0.0},
    shown=lambda spec: {"ssr_p": 1.0},
    columns={"ssr": False, "shift_x": 0.0, "shift_y": 0.0, "scale": 1.0, "angle": 0.0},
    uniforms=5,
    draw=draw,
    effect=Warp(matrix),
    albu=albu,
    albu_apply=albu_apply,
    probe=Probe(
        image=ramp_image,
        read=read,
        expect=expect,
        rows=_rows(),
        conventions=(
            # the opposite rotation sign
            Convention("rotation direction", _TURNED, lambda row: {**row, "angle": -row["angle"]}),
            # half a pixel off: what mixing DALI's pixel-corner and OpenCV's pixel-centre conventions gives
            Convention("pixel centres", _TURNED, lambda row: {**row, "shift_x": 0.5, "shift_y": 0.5}),
        ),
    ),
)
