"""Shift-scale-rotate: one affine warp about the image centre with probability p (the seed's ShiftScaleRotate).

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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.augs.unit import Columns, Warp


@dataclass(frozen=True)
class ShiftScaleRotate(Warp):
    name = "ssr"
    columns = {"ssr": False, "shift_x": 0.0, "shift_y": 0.0, "scale": 1.0, "angle": 0.0}
    uniforms = 5

    p: float = 0.5  # probability of the warp
    shift_max_frac: float = 0.05  # f: shift drawn from U(-f, f) * size, truncated to whole pixels (albumentations)
    scale_max_delta: float = 0.05  # d: isotropic scale drawn from U(1 - d, 1 + d)
    rotate_max_deg: float = 5.0  # r: angle drawn from U(-r, r) degrees

    def key(self, field: str) -> str:
        return "ssr_p" if field == "p" else field  # (the other keys predate the unit's name)

    def __post_init__(self) -> None:
        self.check_probability("p")
        for field in ("shift_max_frac", "scale_max_delta", "rotate_max_deg"):
            self.check_number(field)
        self.check(
            self.shift_max_frac <= 1.0, f"shift_max_frac is a fraction of the size, <= 1; got {self.shift_max_frac}"
        )
        self.check(
            self.scale_max_delta < 1.0, f"scale_max_delta must be < 1 (keeps scale > 0); got {self.scale_max_delta}"
        )
        self.check(self.rotate_max_deg <= 180.0, f"rotate_max_deg must be <= 180, got {self.rotate_max_deg}")

    def check_image(self, height: int, width: int) -> None:
        # Below one pixel the image is gone: what is left is the replicated border colour.
        smallest = (1 - self.scale_max_delta) * min(height, width)
        self.check(
            smallest >= 1,
            f"scale_max_delta={self.scale_max_delta} can shrink a {height}x{width} image to {smallest:.2g} px; "
            f"use at most {1 - 1 / min(height, width):.4g}",
        )

    def draw(self, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        # Where SSR is off its values are the identity's, so an image without SSR is never resampled.
        ssr = u[0] < self.p
        return {
            "ssr": ssr,
            "shift_x": torch.where(ssr, torch.trunc((2 * u[1] - 1) * self.shift_max_frac * width), 0.0),
            "shift_y": torch.where(ssr, torch.trunc((2 * u[2] - 1) * self.shift_max_frac * height), 0.0),
            "scale": torch.where(ssr, 1 + (2 * u[3] - 1) * self.scale_max_delta, 1.0),
            "angle": torch.where(ssr, (2 * u[4] - 1) * self.rotate_max_deg, 0.0),
        }

    @staticmethod
    def matrix(columns: Columns, height: int, width: int) -> torch.Tensor:
        """The inverse of dst = c + t + s R (src - c) about the centre c = (w/2 - 0.5, h/2 - 0.5) (albumentations'
        `center`), i.e. src = c + (1/s) R^T (dst - c - t), with R^T = [[cos, -sin], [sin, cos]]."""
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

    def albu(self, height: int, width: int) -> Any:
        import albumentations as A  # (imported on use: slow to import, and the DALI path never needs it)
        import cv2

        return A.Affine(
            scale=(1 - self.scale_max_delta, 1 + self.scale_max_delta),
            translate_percent=(-self.shift_max_frac, self.shift_max_frac),
            rotate=(-self.rotate_max_deg, self.rotate_max_deg),
            shear=0,
            keep_ratio=True,
            interpolation=cv2.INTER_LINEAR,
            border_mode=cv2.BORDER_REPLICATE,
            p=self.p,
        )

    @staticmethod
    def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
        """The matrix albumentations builds from its drawn values, built from explicit ones, applied by its code."""
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
