"""Cutout: one rectangular hole with a constant fill, with probability p (the seed's CoarseDropout, 1 hole).

Per image, when applied: hole height and width drawn independently and uniformly from {min_px .. max_px}, the
top-left corner uniformly from {0 .. size - hole}, so the hole lies fully inside the image (albumentations 2.x's
CoarseDropout with integer ranges).

Fill: mid-grey, 0.5 in [0, 1] units, written as the uint8 level 128. The seed wrote fill_value=0.5 on a uint8 image,
which albumentations casts to 0 (black); mid-grey is what it meant, and after Normalize(0.5, 0.5) it is (almost
exactly) zero, "no information".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.augs.unit import Box, Columns


@dataclass(frozen=True)
class Cutout(Box):
    name = "cutout"
    columns = {"cutout": False, "hole_y": 0.0, "hole_x": 0.0, "hole_h": 0.0, "hole_w": 0.0}
    uniforms = 5

    p: float = 0.5  # probability of one hole
    min_px: int = 1  # smallest hole height and width, px
    max_px: int = 12  # largest hole height and width, px
    fill: float = 0.5  # in [0, 1] image units, written as the nearest uint8 level

    def __post_init__(self) -> None:
        self.check_probability("p")
        self.check_count("min_px", 1)
        self.check_count("max_px", 1)
        self.check(
            self.min_px <= self.max_px,
            f"cutout_min_px ({self.min_px}) must be <= cutout_max_px ({self.max_px})",
        )
        self.check_number("fill")
        self.check(self.fill <= 1.0, f"cutout_fill is in [0, 1] image units, got {self.fill}")

    def check_image(self, height: int, width: int) -> None:
        # A hole larger than the image cannot be placed: albumentations raises, and a capped size would not be the
        # distribution the spec states.
        for field in ("min_px", "max_px"):
            value = getattr(self, field)
            self.check(
                value <= min(height, width),
                f"{self.key(field)}={value} does not fit a {height}x{width} image; use at most {min(height, width)}",
            )

    @property
    def fill_uint8(self) -> int:
        """The fill as the uint8 level both loaders write (they cut out on uint8 images, before Normalize)."""
        return int(round(self.fill * 255))

    def draw(self, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        sizes = self.max_px - self.min_px + 1
        hole_h = self.min_px + torch.floor(u[1] * sizes)
        hole_w = self.min_px + torch.floor(u[2] * sizes)
        return {
            "cutout": u[0] < self.p,
            "hole_y": torch.floor(u[3] * (height - hole_h + 1)),
            "hole_x": torch.floor(u[4] * (width - hole_w + 1)),
            "hole_h": hole_h,
            "hole_w": hole_w,
        }

    @staticmethod
    def box(columns: Columns) -> torch.Tensor:
        on = columns["cutout"]
        y0, x0 = columns["hole_y"], columns["hole_x"]
        y1, x1 = y0 + columns["hole_h"], x0 + columns["hole_w"]
        return torch.stack([torch.where(on, v, 0.0) for v in (y0, x0, y1, x1)], -1).float()

    def albu(self, height: int, width: int) -> Any:
        import albumentations as A  # (imported on use: slow to import, and the DALI path never needs it)

        return A.CoarseDropout(
            num_holes_range=(1, 1),
            hole_height_range=(self.min_px, self.max_px),
            hole_width_range=(self.min_px, self.max_px),
            fill=self.fill_uint8,
            p=self.p,
        )

    @staticmethod
    def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
        if not row["cutout"]:
            return image
        y0, x0 = int(row["hole_y"]), int(row["hole_x"])
        holes = np.array([[x0, y0, x0 + int(row["hole_w"]), y0 + int(row["hole_h"])]])
        return transform.apply(image, holes=holes, seed=0)
