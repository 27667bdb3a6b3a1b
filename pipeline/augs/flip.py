"""Horizontal flip: x -> (width - 1) - x with probability p (the seed's HorizontalFlip(p=0.5))."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.augs.unit import Columns, Warp


@dataclass(frozen=True)
class Flip(Warp):
    name = "flip"
    columns = {"flip": False}
    uniforms = 1

    p: float = 0.5  # probability of a horizontal flip

    def __post_init__(self) -> None:
        self.check_probability("p")

    def draw(self, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        return {"flip": u[0] < self.p}

    @staticmethod
    def matrix(columns: Columns, height: int, width: int) -> torch.Tensor:
        """It maps the pixel grid onto itself: no border of its own."""
        flip = columns["flip"]
        m = torch.zeros((len(flip), 2, 3), dtype=torch.float64, device=flip.device)
        m[:, 0, 0] = torch.where(flip, -1.0, 1.0)
        m[:, 0, 2] = torch.where(flip, width - 1.0, 0.0)
        m[:, 1, 1] = 1.0
        return m

    def albu(self, height: int, width: int) -> Any:
        import albumentations as A  # (imported on use: slow to import, and the DALI path never needs it)

        return A.HorizontalFlip(p=self.p)

    @staticmethod
    def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
        return transform.apply(image) if row["flip"] else image
