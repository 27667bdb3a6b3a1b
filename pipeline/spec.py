"""The one augmentation spec both loaders are built from.

`AugSpec` is the only place that holds an augmentation probability, range or fill value. It is a frozen dataclass
whose flat fields are those of the augmentation units (pipeline/augs/, in composition order) followed by normalize's
mean and std; each unit validates its own fields. The albumentations loader (`pipeline.albu_loader.build_transform`)
and the DALI loader (`pipeline.params` + `pipeline.dali_loader`) read it through the units; nothing else restates a
number.

The defaults are the seed's (see README, "Augmentations"):
    ShiftScaleRotate(shift 0.05, scale 0.05, rotate 5 deg, p 0.5) -> HorizontalFlip(p 0.5)
    -> CoarseDropout(1 hole, 1..12 px high and wide, p 0.5, fill 0.5) -> Normalize(mean 0.5, std 0.5)
with two departures that let DALI do exactly the same, each explained in its unit: a replicate border
(pipeline/augs/ssr.py) and a mid-grey cutout fill (pipeline/augs/cutout.py).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipeline.augs import UNITS
from pipeline.augs.unit import Field, check

# Normalize: (x / 255 - mean) / std per channel (RGB), after the augmentations. Not a unit: nothing random.
NORMALIZE_FIELDS = (
    Field("mean", (0.5, 0.5, 0.5), "per-channel (RGB) mean subtracted, in [0, 1] image units"),
    Field("std", (0.5, 0.5, 0.5), "per-channel (RGB) standard deviation divided by, > 0"),
)
FLOAT32_MAX = float(np.finfo(np.float32).max)
FIELDS: tuple[Field, ...] = tuple(f for unit in UNITS for f in unit.fields) + NORMALIZE_FIELDS


def _check_normalize(spec: AugSpec) -> None:
    for name in ("mean", "std"):
        value = getattr(spec, name)
        check(len(value) == 3, f"{name} needs one value per RGB channel, got {value!r}")
        check(all(math.isfinite(v) for v in value), f"{name} must be finite per channel, got {value}")
    check(all(s > 0 for s in spec.std), f"std must be > 0 per channel, got {spec.std}")
    # The loaders normalize in float32 (DALI's graph, albumentations' Normalize): beyond its range the inputs
    # would be inf or nan. Pixel values 0 and 1 are the extremes of (x - mean) / std.
    largest = max(abs((x - m) / s) for m, s in zip(spec.mean, spec.std, strict=True) for x in (0.0, 1.0))
    check(
        largest < FLOAT32_MAX,
        f"mean={spec.mean}, std={spec.std} normalize pixels to {largest:.3g}, beyond float32; use a larger std",
    )


def _check_image_size(self: AugSpec, height: int, width: int) -> None:
    """Refuse settings that cannot work for (height, width) images, each unit checking its own fields (a hole
    larger than the image, a scale that shrinks it below a pixel, a crop that can miss it). Both loaders call this
    when they augment, and `python -m train` before reading any data, so they can never disagree about a spec.

    Raises ValueError naming the field, the image size and the largest value that works."""
    for unit in UNITS:
        unit.check_image(self, height, width)


def _pixel_scale_shift(self: AugSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per RGB channel (scale, shift) with normalized = uint8 pixel x scale - shift: 1 / (255 std) and mean / std,
    the one form of (x / 255 - mean) / std that the DALI graphs and the benchmark peers apply (a multiply-add)."""
    scale = tuple(1 / (255 * s) for s in self.std)
    shift = tuple(m / s for m, s in zip(self.mean, self.std, strict=True))
    return scale, shift


def _post_init(self: AugSpec) -> None:
    for unit in UNITS:
        unit.check(self)
    _check_normalize(self)


def _none(cls: type[AugSpec], **overrides: object) -> AugSpec:
    """Every augmentation off: what evaluation uses (normalization only)."""
    off = {name: value for unit in UNITS for name, value in unit.off.items()}
    return cls(**{**off, **overrides})


def _from_overrides(cls: type[AugSpec], items: list[str], base: AugSpec | None = None) -> AugSpec:
    """Build a spec from `KEY=VALUE` strings (the CLI's `--aug`), validating names and values.

    A tuple field takes comma-separated values, one value meaning the same for every channel. Raises ValueError
    naming the field."""
    base = base or cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    changes: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        check(
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
            kind = "a whole number" if isinstance(current, int) else "a number"
            raise ValueError(f"--aug {key}: {raw!r} is not {kind}") from None
    return dataclasses.replace(base, **changes)


def _docstring() -> str:
    lines = ["The augmentation spec: frozen, validated on construction. Fields (defaults are the seed's):", ""]
    lines += [f"    {f.name} = {f.default!r}: {f.doc}" for f in FIELDS]
    return "\n".join(lines)


_namespace: dict[str, object] = {
    "__post_init__": _post_init,
    "none": classmethod(_none),
    "from_overrides": classmethod(_from_overrides),
    "check_image_size": _check_image_size,
    "pixel_scale_shift": _pixel_scale_shift,
    "__doc__": _docstring(),
}
for _unit in UNITS:
    for _name, _derive in _unit.properties.items():
        _namespace[_name] = property(_derive, doc=_derive.__doc__)

# Built from the units' fields rather than written out, so that a new augmentation is one new module; the fields
# stay flat, keyword-only and frozen (AugSpec(flip_p=0.3), spec.ssr_p, dataclasses.replace all work).
AugSpec = dataclasses.make_dataclass(
    "AugSpec",
    [
        (
            f.name,
            tuple[float, float, float] if isinstance(f.default, tuple) else type(f.default),
            dataclasses.field(default=f.default, metadata={"doc": f.doc}),
        )
        for f in FIELDS
    ],
    namespace=_namespace,
    frozen=True,
    kw_only=True,
)
AugSpec.__module__ = __name__  # (make_dataclass's own module= needs Python 3.12)
