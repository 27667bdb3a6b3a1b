"""The one augmentation spec both loaders are built from.

`AugSpec` is the only place that holds an augmentation probability, range or fill value. The albumentations
loader (`pipeline.albu.build_transform`) and the DALI loader (`pipeline.params` + `pipeline.dali`) read it; nothing
else restates a number.

The defaults are the seed's (see README, "Augmentations"):
    ShiftScaleRotate(shift 0.05, scale 0.05, rotate 5 deg, p 0.5) -> HorizontalFlip(p 0.5)
    -> CoarseDropout(1 hole, 1..12 px high and wide, p 0.5, fill 0.5) -> Normalize(mean 0.5, std 0.5)

Two deliberate departures from the seed, both because DALI must be able to do exactly the same thing:
  * Border: replicate (OpenCV BORDER_REPLICATE, DALI's clamp), not albumentations' reflect-101. DALI's warp has no
    reflect mode; clamping the sampling coordinates is the same as replicating the edge pixels.
  * Cutout fill: mid-grey, 0.5 in [0, 1] units, stored as the uint8 level 128. The seed wrote fill_value=0.5 on a
    uint8 image, which albumentations casts to 0 (black); mid-grey is what the seed meant, and after
    Normalize(0.5, 0.5) it is (almost exactly) zero, i.e. "no information".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AugSpec:
    # Horizontal flip, applied after shift-scale-rotate (as in the seed's Compose order).
    flip_p: float = 0.5
    # Shift-scale-rotate: an affine warp about the image centre.
    ssr_p: float = 0.5
    shift_max_frac: float = 0.05  # shift drawn from U(-f, f) * size; albumentations 2.x truncates it to whole pixels
    scale_max_delta: float = 0.05  # isotropic scale drawn from U(1 - d, 1 + d)
    rotate_max_deg: float = 5.0  # angle drawn from U(-r, r) degrees, counter-clockwise on screen for positive
    # Cutout (CoarseDropout with one hole): height and width drawn independently and uniformly from
    # {cutout_min_px..cutout_max_px}, the hole placed uniformly so that it lies fully inside the image.
    cutout_p: float = 0.5
    cutout_min_px: int = 1
    cutout_max_px: int = 12
    cutout_fill: float = 0.5  # in [0, 1] image units; applied as the nearest uint8 level (see cutout_fill_uint8)
    # Normalize: (x / 255 - mean) / std per channel (RGB).
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("flip_p", "ssr_p", "cutout_p"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"{name} must be a probability in [0, 1], got {value}")
        for name in ("shift_max_frac", "scale_max_delta", "rotate_max_deg", "cutout_fill"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")
        _check(self.shift_max_frac <= 1.0, f"shift_max_frac is a fraction of the size, <= 1; got {self.shift_max_frac}")
        _check(self.scale_max_delta < 1.0, f"scale_max_delta must be < 1 (keeps scale > 0); got {self.scale_max_delta}")
        _check(self.rotate_max_deg <= 180.0, f"rotate_max_deg must be <= 180, got {self.rotate_max_deg}")
        _check(self.cutout_fill <= 1.0, f"cutout_fill is in [0, 1] image units, got {self.cutout_fill}")
        for name in ("cutout_min_px", "cutout_max_px"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _check(
            self.cutout_min_px <= self.cutout_max_px,
            f"cutout_min_px ({self.cutout_min_px}) must be <= cutout_max_px ({self.cutout_max_px})",
        )
        for name in ("mean", "std"):
            value = getattr(self, name)
            _check(len(value) == 3, f"{name} needs one value per RGB channel, got {value!r}")
        _check(all(s > 0 for s in self.std), f"std must be > 0 per channel, got {self.std}")

    @property
    def cutout_fill_uint8(self) -> int:
        """The fill as the uint8 level both loaders write (they cut out on uint8 images, before Normalize)."""
        return int(round(self.cutout_fill * 255))

    @classmethod
    def none(cls, **overrides: object) -> AugSpec:
        """Every augmentation off: what evaluation uses (normalization only)."""
        return cls(**{"flip_p": 0.0, "ssr_p": 0.0, "cutout_p": 0.0, **overrides})

    def replace(self, **changes: object) -> AugSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_overrides(cls, items: list[str], base: AugSpec | None = None) -> AugSpec:
        """Build a spec from `KEY=VALUE` strings (the CLI's `--aug`), validating names and values."""
        base = base or cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, object] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            _check(
                bool(sep) and key in fields,
                f"--aug expects KEY=VALUE with KEY one of {', '.join(fields)}; got {item!r}",
            )
            current = getattr(base, key)
            try:
                if isinstance(current, tuple):
                    values = [float(v) for v in raw.split(",")]
                    changes[key] = tuple(values * 3 if len(values) == 1 else values)
                elif isinstance(current, int) and not isinstance(current, bool):
                    changes[key] = int(raw)
                else:
                    changes[key] = float(raw)
            except ValueError:
                raise ValueError(f"--aug {key}: {raw!r} is not a number") from None
        return dataclasses.replace(base, **changes)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"AugSpec: {message}")
