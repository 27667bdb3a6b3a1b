"""Pad-and-crop: the standard CIFAR-10 translation by up to px whole pixels per axis; opt-in (0 = off).

The ResNet papers pad 4 px on each side and take a random 32x32 crop (He et al. 2016, section 4.2); airbench uses
2 px. Turn it on with `--aug pad_crop_px=4`. albumentations' RandomCrop on the padded image draws the window's
top-left corner as int((2N + 1) * U(0, 1)) per axis, so the window's offset (crop_x, crop_y) is uniform over
{-N .. N} per axis: output pixel (x, y) is input pixel (x + crop_x, y + crop_y).

Border: replicate, not the papers' zeros: the border the composed warp already has, so both loaders do exactly the
same with no new operation in the GPU graph. It applies after shift-scale-rotate and flip and before cutout (the
usual crop -> flip -> cutout recipe places the hole in the final image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.augs.unit import Aug, Columns, Shift

RESNET_PX = 4  # the ResNet papers' padding: what the gallery shows when a spec leaves it off


@dataclass(frozen=True)
class PadCrop(Shift):
    name = "pad_crop"
    columns = {"crop_x": 0.0, "crop_y": 0.0}
    uniforms = 2

    px: int = 0  # N: translate by up to N whole pixels per axis (replicate border); 0 = off

    @property
    def enabled(self) -> bool:
        return self.px > 0

    def off(self) -> Aug:
        return dataclasses.replace(self, px=0)

    def shown(self) -> Aug:
        return dataclasses.replace(self, px=self.px or RESNET_PX)

    def __post_init__(self) -> None:
        self.check_count("px", 0)

    def check_image(self, height: int, width: int) -> None:
        # At N >= size the window can lie entirely in the padding: an image of one replicated edge pixel.
        most = min(height, width) - 1
        self.check(
            self.px <= most,
            f"pad_crop_px={self.px} lets the crop miss a {height}x{width} image entirely; use at most {most}",
        )

    def draw(self, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        n = self.px
        return {"crop_y": torch.floor(u[0] * (2 * n + 1)) - n, "crop_x": torch.floor(u[1] * (2 * n + 1)) - n}

    @staticmethod
    def offsets(columns: Columns) -> torch.Tensor:
        return torch.stack([columns["crop_x"], columns["crop_y"]], -1).float()

    def albu(self, height: int, width: int) -> Any:
        import albumentations as A  # (imported on use: slow to import, and the DALI path never needs it)
        import cv2

        n = self.px
        pad = A.PadIfNeeded(height + 2 * n, width + 2 * n, position="center", border_mode=cv2.BORDER_REPLICATE)
        return A.Sequential([pad, A.RandomCrop(height, width)], p=1.0)

    @staticmethod
    def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
        pad, crop = transform.transforms
        height, width = image.shape[:2]
        n = (pad.min_height - height) // 2
        padded = pad.apply(image, pad_top=n, pad_bottom=n, pad_left=n, pad_right=n)
        x0, y0 = int(row["crop_x"]) + n, int(row["crop_y"]) + n
        return crop.apply(padded, crop_coords=(x0, y0, x0 + width, y0 + height))
