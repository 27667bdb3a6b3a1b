"""The augmentations, one module each, and the order they compose in.

`UNITS` is the spec: AugSpec's fields are the units' fields in this order (then normalize's), parameters are drawn
unit by unit in this order, albumentations' Compose lists the twins in this order, and the DALI graphs apply the
effects in this order. A new augmentation is one new module (see pipeline/augs/unit.py for what it declares) and
its place in this tuple.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.augs import cutout, flip, pad_crop, ssr
from pipeline.augs.unit import Aug, Box, Shift, Warp

if TYPE_CHECKING:
    from pipeline.spec import AugSpec

# The seed's order, ShiftScaleRotate -> HorizontalFlip -> CoarseDropout (then Normalize, which is not a unit), with the
# opt-in pad-and-crop (off by default) after the warp and before the hole.
UNITS: tuple[Aug, ...] = (ssr.UNIT, flip.UNIT, pad_crop.UNIT, cutout.UNIT)


def units_of(spec: AugSpec) -> tuple[Aug, ...]:
    """The units a spec includes (in the graphs and in albumentations' Compose), in composition order."""
    return tuple(unit for unit in UNITS if unit.enabled(spec))


def unit_of_column(name: str) -> Aug:
    """The unit a parameter column belongs to; ValueError for an unknown name."""
    for unit in UNITS:
        if name in unit.columns:
            return unit
    known = [column for unit in UNITS for column in unit.columns]
    raise ValueError(f"unknown augmentation parameter {name!r}; known: {', '.join(known)}")


def check_composition(units: tuple[Aug, ...]) -> None:
    """The DALI graphs apply every Warp (one matrix), then at most one Shift, then the Boxes: the units' order must
    be that order, and names, fields and columns must be unique."""
    rank = {Warp: 0, Shift: 1, Box: 2}
    kinds = [rank[type(unit.effect)] for unit in units]
    if kinds != sorted(kinds):
        raise TypeError(f"units must be ordered Warp, Shift, Box: {[(u.name, type(u.effect).__name__) for u in units]}")
    if kinds.count(1) > 1:
        raise TypeError("at most one Shift unit: two would need a border each")
    for what, names in (
        ("names", [unit.name for unit in units]),
        ("fields", [f.name for unit in units for f in unit.fields]),
        ("parameter columns", [column for unit in units for column in unit.columns]),
    ):
        if len(names) != len(set(names)):
            raise TypeError(f"duplicate unit {what}: {names}")


check_composition(UNITS)

__all__ = ["UNITS", "Aug", "unit_of_column", "units_of"]
