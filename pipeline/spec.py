"""The one augmentation spec both loaders are built from.

`AugSpec` is the only place that holds an augmentation probability, range or fill value: one field per unit
(pipeline/augs/, each a frozen dataclass that owns and validates its settings), in the order they compose, then
normalize's mean and std. The albumentations loader and the DALI loader both read it through its units.

The defaults are the seed's:
    ShiftScaleRotate(shift 0.05, scale 0.05, rotate 5 deg, p 0.5) -> HorizontalFlip(p 0.5)
    -> CoarseDropout(1 hole, 1..12 px high and wide, p 0.5, fill 0.5) -> Normalize(mean 0.5, std 0.5)
with two departures that let DALI do exactly the same, each explained in its unit: a replicate border
(pipeline/augs/ssr.py) and a mid-grey cutout fill (pipeline/augs/cutout.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.augs import Aug, Cutout, Flip, PadCrop, ShiftScaleRotate
from pipeline.errors import ConfigError

FLOAT32_MAX = float(np.finfo(np.float32).max)
RGB = tuple[float, ...]  # one value per channel


@dataclass(frozen=True, kw_only=True)
class AugSpec:
    """The augmentation spec: frozen, validated on construction (ConfigError naming the `--aug` key)."""

    # The units, in the order they compose: the DALI graphs apply every Warp, then at most one Shift, then the Boxes.
    ssr: ShiftScaleRotate = ShiftScaleRotate()
    flip: Flip = Flip()
    pad_crop: PadCrop = PadCrop()  # opt-in, after the warp and before the hole
    cutout: Cutout = Cutout()
    # Normalize, after the augmentations: (x / 255 - mean) / std per RGB channel, in [0, 1] image units.
    mean: RGB = (0.5, 0.5, 0.5)
    std: RGB = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            _check(len(value) == 3, f"{name} needs one value per RGB channel, got {value!r}")
            _check(all(math.isfinite(v) for v in value), f"{name} must be finite per channel, got {value}")
        _check(all(s > 0 for s in self.std), f"std must be > 0 per channel, got {self.std}")
        # The loaders normalize in float32: beyond its range the inputs would be inf or nan. Pixel values 0 and 1
        # are the extremes of (x - mean) / std.
        largest = max(abs((x - m) / s) for m, s in zip(self.mean, self.std, strict=True) for x in (0.0, 1.0))
        _check(
            largest < FLOAT32_MAX,
            f"mean={self.mean}, std={self.std} normalize pixels to {largest:.3g}, beyond float32; use a larger std",
        )

    @property
    def units(self) -> tuple[Aug, ...]:
        """Every unit, in composition order (the fields' order)."""
        return tuple(value for f in dataclasses.fields(self) if isinstance(value := getattr(self, f.name), Aug))

    @property
    def included(self) -> tuple[Aug, ...]:
        """The units the graphs and albumentations' Compose include, in composition order."""
        return tuple(unit for unit in self.units if unit.enabled)

    @classmethod
    def none(cls) -> AugSpec:
        """Every augmentation off: what evaluation uses (normalization only)."""
        default = cls()
        off: dict[str, Any] = {unit.name: unit.off() for unit in default.units}
        return dataclasses.replace(default, **off)

    def alone(self, name: str) -> AugSpec:
        """The unit `name` alone, always applied, with its other settings from this spec; every other unit off."""
        shown: dict[str, Any] = {name: getattr(self, name).shown(), "mean": self.mean, "std": self.std}
        return dataclasses.replace(self.none(), **shown)

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse settings that cannot work for (height, width) images (a hole larger than the image, a scale that
        shrinks it below a pixel, a crop that can miss it). Both loaders call this when they augment, and `python -m
        train` before reading any data. Raises ConfigError naming the key, the image size and the largest that works."""
        for unit in self.units:
            unit.check_image(height, width)

    def pixel_scale_shift(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per RGB channel (scale, shift) with normalized = uint8 pixel x scale - shift: 1 / (255 std) and mean / std,
        the one form of (x / 255 - mean) / std that the DALI graphs and the benchmark peers apply (a multiply-add)."""
        scale = tuple(1 / (255 * s) for s in self.std)
        shift = tuple(m / s for m, s in zip(self.mean, self.std, strict=True))
        return scale, shift

    def aug_keys(self) -> dict[str, tuple[str, str]]:
        """`--aug` key -> (AugSpec field, the unit's field; "" for mean and std)."""
        keys = {unit.key(f.name): (unit.name, f.name) for unit in self.units for f in dataclasses.fields(unit)}
        return {**keys, "mean": ("mean", ""), "std": ("std", "")}

    @classmethod
    def from_overrides(cls, items: list[str], base: AugSpec | None = None) -> AugSpec:
        """A spec from `KEY=VALUE` strings (the CLI's `--aug`, e.g. cutout_p=0.3), validating names and values.

        A mean or std takes comma-separated values, one value meaning the same for every channel. Raises
        ConfigError naming the key."""
        spec = base or cls()
        keys = spec.aug_keys()
        changes: dict[str, dict[str, object]] = {}  # AugSpec field -> the unit's changed fields ("" for mean, std)
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            _check(
                bool(sep) and key in keys, f"--aug expects KEY=VALUE with KEY one of {', '.join(keys)}; got {item!r}"
            )
            name, field = keys[key]
            current = getattr(getattr(spec, name), field) if field else getattr(spec, name)
            try:
                if isinstance(current, tuple):
                    values = tuple(float(v) for v in raw.split(","))
                    value: object = values * 3 if len(values) == 1 else values
                elif isinstance(current, int):
                    value = int(raw)
                else:
                    value = float(raw)
            except ValueError:
                kind = "a whole number" if isinstance(current, int) else "a number"
                raise ConfigError(f"--aug {key}: {raw!r} is not {kind}") from None
            changes.setdefault(name, {})[field] = value
        # one replace per unit, so that fields that must agree (cutout_min_px <= cutout_max_px) change together
        changed: dict[str, Any] = {
            name: dataclasses.replace(getattr(spec, name), **fields) if "" not in fields else fields[""]
            for name, fields in changes.items()
        }
        return dataclasses.replace(spec, **changed)

    def unit_of_column(self, column: str) -> Aug:
        """The unit a parameter column belongs to; ConfigError for an unknown name."""
        for unit in self.units:
            if column in unit.columns:
                return unit
        known = [c for unit in self.units for c in unit.columns]
        raise ConfigError(f"unknown augmentation parameter {column!r}; known: {', '.join(known)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"AugSpec: {message}")
