"""What an augmentation unit is: a small frozen dataclass that owns its parameters, as FFCV's operations do.

A unit validates its fields, draws its per-image parameter columns from U(0, 1) numbers (`draw`), builds its
albumentations twin (`albu`, and `albu_apply` with explicit columns), and has one of the effects the DALI graphs
compose without naming an augmentation: `Warp`, `Shift` or `Box`. The graphs apply every Warp (one matrix), then at
most one Shift, then the Boxes, so AugSpec lists its units in that order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch

from pipeline.errors import ConfigError

# One image's parameter columns: name -> (N,) tensor (bool for "applied" flags, float32 otherwise).
Columns = Mapping[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Aug:
    """One augmentation. Subclasses are frozen dataclasses whose fields are its settings."""

    name: ClassVar[str]  # its AugSpec field, its module under pipeline/augs/ and its label in the gallery
    columns: ClassVar[dict[str, bool | float]]  # its parameter columns -> their "not applied" value
    uniforms: ClassVar[int]  # U(0, 1) numbers it draws per image

    @property
    def enabled(self) -> bool:
        """Whether the graphs and albumentations' Compose include it at all."""
        return True

    def key(self, field: str) -> str:
        """The `--aug` key of one of its fields."""
        return f"{self.name}_{field}"

    def off(self) -> Aug:
        """This unit, never applied (AugSpec.none: evaluation)."""
        return dataclasses.replace(self, **{"p": 0.0})

    def shown(self) -> Aug:
        """This unit, always applied (the gallery shows each unit alone)."""
        return dataclasses.replace(self, **{"p": 1.0})

    def check_image(self, height: int, width: int) -> None:
        """Refuse settings that cannot work for (height, width) images (ConfigError naming the key)."""

    def draw(self, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        """Its columns for N images from `u`, (uniforms, N) float32 U(0, 1) numbers."""
        raise NotImplementedError

    def albu(self, height: int, width: int) -> Any:
        """Its albumentations transform for (height, width) images."""
        raise NotImplementedError

    @staticmethod
    def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
        """`transform` (made by `albu`) applied to one HWC uint8 image with the explicit parameters `row`."""
        raise NotImplementedError

    # --- validation, for __post_init__ -----------------------------------------------------------------------------

    def fail(self, message: str) -> NoReturn:
        raise ConfigError(f"AugSpec: {message}")

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.fail(message)

    def check_probability(self, field: str) -> None:
        value = getattr(self, field)
        self.check(0.0 <= value <= 1.0, f"{self.key(field)} must be a probability in [0, 1], got {value}")

    def check_number(self, field: str) -> None:
        """A finite number >= 0."""
        value = getattr(self, field)
        ok = isinstance(value, int | float) and math.isfinite(value) and value >= 0
        self.check(ok, f"{self.key(field)} must be a finite number >= 0, got {value}")

    def check_count(self, field: str, least: int) -> None:
        """A whole number (of pixels) >= least."""
        value = getattr(self, field)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
        self.check(ok, f"{self.key(field)} must be an integer >= {least}, got {value!r}")


class Warp(Aug):
    """A geometric factor, folded into the one sampling matrix of the composed warp. Warps share its one replicate
    border: exact for a factor that maps the pixel grid onto itself (flip) next to one that moves pixels across the
    border (shift-scale-rotate); two of the latter would need a border each, which is what `Shift` is for."""

    @staticmethod
    def matrix(columns: Columns, height: int, width: int) -> torch.Tensor:
        """(N, 2, 3) float64 destination->source matrices, pixel centres at integer coordinates (OpenCV's): the
        output pixel (x, y) comes from the input at A @ (x, y, 1)."""
        raise NotImplementedError


class Shift(Aug):
    """A translation by whole pixels after the warp, with a replicate border of its own: albumentations clamps twice
    when it follows a shift-scale-rotate, which one matrix and one clamp cannot reproduce (tests/test_parity.py)."""

    @staticmethod
    def offsets(columns: Columns) -> torch.Tensor:
        """(N, 2) float32 (x, y): output pixel p takes the warped image at clamp(p + offset)."""
        raise NotImplementedError


class Box(Aug):
    """A rectangle in output pixels written with a constant uint8 fill (on uint8 images, as albumentations does)."""

    @staticmethod
    def box(columns: Columns) -> torch.Tensor:
        """(N, 4) float32 [y0, x0, y1, x1), an empty box where not applied."""
        raise NotImplementedError

    @property
    def fill_uint8(self) -> int:
        raise NotImplementedError
