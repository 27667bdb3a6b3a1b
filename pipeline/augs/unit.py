"""What one augmentation unit declares: the record every module in pipeline/augs/ fills in, and the effect kinds.

Modelled on FFCV's transforms (one operation per file, declaring what it takes and what it gives), with plain
functions in a frozen dataclass instead of a class hierarchy. A unit is everything about one augmentation:

  * its AugSpec fields and their validation, alone and against the image size;
  * how many U(0, 1) numbers it draws per image and how they become its parameter columns, with the values that
    mean "not applied" (the explicit-parameter path, `AugParams.fixed`, fills them in);
  * its effect, as one of the few kinds the DALI graphs compose generically (`Warp`, `Shift`, `Box` below);
  * its albumentations twin: the transform built from the spec, and how that transform applies explicit parameters;
  * its parity probe (pipeline/augs/probe.py): what image makes it detectable and what its draws must follow.

The DALI graphs apply the kinds in one fixed order, so units must be composed in that order (checked in
pipeline/augs/__init__.py): every `Warp`, then at most one `Shift`, then the `Box`es.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.augs.probe import Probe
    from pipeline.spec import AugSpec

# One image's parameter columns: name -> (N,) tensor (bool for "applied" flags, float32 otherwise).
Columns = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Field:
    """One flat AugSpec field owned by a unit: its name, default and meaning (units, range, source)."""

    name: str
    default: float | int | tuple[float, ...]
    doc: str


@dataclass(frozen=True)
class Warp:
    """A geometric factor, folded into the one sampling matrix of the composed warp.

    `matrix(columns, height, width)` gives (N, 2, 3) float64 destination->source matrices in OpenCV's pixel-centre
    convention (pixel centres at integer coordinates): the unit's output pixel (x, y) comes from its input at
    A @ (x, y, 1). Warps compose by matrix product in application order and share the composed warp's single
    replicate border (clamped coordinates). That is exact for a factor that maps the pixel grid onto itself (flip)
    next to one that moves pixels across the border (shift-scale-rotate); two of the latter would need one border
    each, which is what `Shift` is for.
    """

    matrix: Callable[[Columns, int, int], torch.Tensor]


@dataclass(frozen=True)
class Shift:
    """A translation by whole pixels applied after the warp, with a replicate border of its own.

    `offsets(columns)` gives (N, 2) float32 (x, y): output pixel p takes the warped image at clamp(p + offset).
    Not a `Warp` because albumentations clamps twice when this follows a shift-scale-rotate (once in Affine, once in
    the pad before the crop); a translation folded into the one matrix would clamp once and differ in a border strip
    up to `offset` pixels wide (tests/test_parity.py shows it).
    """

    offsets: Callable[[Columns], torch.Tensor]


@dataclass(frozen=True)
class Box:
    """A rectangle in output pixels written with a constant fill (a mask blend after the warp, before normalize).

    `box(columns)` gives (N, 4) float32 [y0, x0, y1, x1), an empty box where not applied; `fill(spec)` the uint8
    level written into it (the loaders cut out on uint8 images, as albumentations does).
    """

    box: Callable[[Columns], torch.Tensor]
    fill: Callable[[AugSpec], int]


Effect = Warp | Shift | Box


def always(spec: AugSpec) -> bool:
    return True


@dataclass(frozen=True)
class Aug:
    """One augmentation, everything about it (see the module docstring for the parts)."""

    name: str  # the unit's name: its module under pipeline/augs/ and its label in the gallery
    fields: tuple[Field, ...]  # its AugSpec fields, flat names prefixed by the unit (flip_p, cutout_max_px, ...)
    check: Callable[[AugSpec], None]  # validates its fields alone; raises ValueError("AugSpec: ...")
    check_image: Callable[[AugSpec, int, int], None]  # validates them against an image of (height, width)
    off: Mapping[str, object]  # field values that switch it off (AugSpec.none())
    shown: Callable[[AugSpec], dict[str, object]]  # field values that always apply it (gallery: one unit alone)
    columns: Mapping[str, bool | float]  # its parameter columns -> their "not applied" value
    uniforms: int  # U(0, 1) numbers it draws per image
    draw: Callable[[AugSpec, torch.Tensor, int, int], dict[str, torch.Tensor]]  # (uniforms, N) -> its columns
    effect: Effect
    albu: Callable[[AugSpec, int, int], Any]  # its albumentations transform for (height, width) images
    albu_apply: Callable[[Any, np.ndarray, Mapping[str, Any]], np.ndarray]  # that transform, explicit parameters
    probe: Probe
    enabled: Callable[[AugSpec], bool] = always  # whether a spec includes it at all (in the graphs and Compose)
    properties: Mapping[str, Callable[[AugSpec], object]] = field(default_factory=dict)  # derived AugSpec values


# --- validation helpers shared by the units ------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    raise ValueError(f"AugSpec: {message}")


def check(ok: bool, message: str) -> None:
    if not ok:
        fail(message)


def check_probability(spec: AugSpec, name: str) -> None:
    value = getattr(spec, name)
    check(0.0 <= value <= 1.0, f"{name} must be a probability in [0, 1], got {value}")


def check_number(spec: AugSpec, name: str) -> None:
    """A finite float >= 0."""
    value = getattr(spec, name)
    check(
        isinstance(value, int | float) and math.isfinite(value) and value >= 0,
        f"{name} must be a finite number >= 0, got {value}",
    )


def check_count(spec: AugSpec, name: str, least: int) -> None:
    """A whole number (of pixels) >= least."""
    value = getattr(spec, name)
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= least,
        f"{name} must be an integer >= {least}, got {value!r}",
    )


def no_image_limits(spec: AugSpec, height: int, width: int) -> None:
    """For units whose valid fields work at any image size."""
