"""AugSpec and the units it is composed of: the seed's defaults, validation, the `--aug` keys, that albumentations is
built from it alone, and what every unit declares (its off switch, its parameter columns, its place in the order)."""

from __future__ import annotations

import dataclasses

import albumentations as A
import cv2
import pytest
import torch

from pipeline.albu_loader import build_transform
from pipeline.augs import Box, Cutout, Flip, PadCrop, Shift, Warp
from pipeline.errors import ConfigError
from pipeline.params import AugParams, draw_params
from pipeline.spec import AugSpec

UNITS = AugSpec().units


def test_defaults_are_the_seeds():
    s = AugSpec()
    assert (s.flip.p, s.ssr.p, s.cutout.p) == (0.5, 0.5, 0.5)
    assert (s.ssr.shift_max_frac, s.ssr.scale_max_delta, s.ssr.rotate_max_deg) == (0.05, 0.05, 5.0)
    assert (s.cutout.min_px, s.cutout.max_px, s.cutout.fill) == (1, 12, 0.5)
    assert s.mean == (0.5, 0.5, 0.5) and s.std == (0.5, 0.5, 0.5)
    assert s.cutout.fill_uint8 == 128  # mid-grey, not the black that fill_value=0.5 became on uint8 in the seed


def test_aug_keys_are_the_ones_users_write():
    assert list(AugSpec().aug_keys()) == [
        "ssr_p",
        "shift_max_frac",
        "scale_max_delta",
        "rotate_max_deg",
        "flip_p",
        "pad_crop_px",
        "cutout_p",
        "cutout_min_px",
        "cutout_max_px",
        "cutout_fill",
        "mean",
        "std",
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["flip_p=1.5"], "flip_p must be a probability"),
        (["ssr_p=-0.1"], "ssr_p must be a probability"),
        (["cutout_p=nan"], "cutout_p must be a probability"),
        (["shift_max_frac=-0.01"], "shift_max_frac must be a finite number >= 0"),
        (["shift_max_frac=2"], "shift_max_frac is a fraction"),
        (["scale_max_delta=1"], "scale_max_delta must be < 1"),
        (["rotate_max_deg=270"], "rotate_max_deg must be <= 180"),
        (["cutout_min_px=0"], "cutout_min_px must be an integer >= 1"),
        (["cutout_min_px=9", "cutout_max_px=4"], "cutout_min_px \\(9\\) must be <= cutout_max_px \\(4\\)"),
        (["cutout_fill=1.2"], "cutout_fill is in \\[0, 1\\]"),
        (["std=0.5,0,0.5"], "std must be > 0"),
        (["mean=0.5,0.5"], "mean needs one value per RGB channel"),
        (["pad_crop_px=-1"], "pad_crop_px must be an integer >= 0"),
        (["std=0.5,inf,0.5"], "std must be finite per channel"),
        (["mean=nan,0.5,0.5"], "mean must be finite per channel"),
        (["mean=0.5,-inf,0.5"], "mean must be finite per channel"),
        (["std=1e-40,0.5,0.5"], "normalize pixels to 5e\\+39, beyond float32"),
        (["mean=1e39,0.5,0.5", "std=1"], "beyond float32"),
        (["cutout_prob=0.3"], "KEY one of ssr_p, shift_max_frac"),
        (["flip_p=often"], "flip_p: 'often' is not a number"),
        (["pad_crop_px=2.5"], "pad_crop_px: '2.5' is not a whole number"),
    ],
)
def test_validation_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        AugSpec.from_overrides(overrides)


def test_units_validate_themselves_when_built_in_code():
    with pytest.raises(ConfigError, match="pad_crop_px must be an integer >= 0, got 2.5"):
        PadCrop(px=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="flip_p must be a probability"):
        AugSpec(flip=Flip(p=2.0))


@pytest.mark.parametrize(
    "overrides, size, message",
    [
        (["cutout_min_px=40", "cutout_max_px=40"], (32, 32), "cutout_min_px=40 does not fit a 32x32 image"),
        (["cutout_max_px=33"], (32, 32), "cutout_max_px=33 does not fit a 32x32 image; use at most 32"),
        (["cutout_max_px=20"], (32, 16), "cutout_max_px=20 does not fit a 32x16 image; use at most 16"),
        (["scale_max_delta=0.99"], (32, 32), "scale_max_delta=0.99 can shrink a 32x32 image to 0.32 px"),
        (["pad_crop_px=32"], (32, 32), "pad_crop_px=32 lets the crop miss a 32x32 image entirely; use at most 31"),
        (["pad_crop_px=16"], (16, 32), "pad_crop_px=16 lets the crop miss a 16x32 image"),
    ],
)
def test_settings_that_cannot_work_for_the_image_size_are_refused(overrides, size, message):
    spec = AugSpec.from_overrides(overrides)  # valid on its own: only the image size makes it impossible
    with pytest.raises(ConfigError, match=message):
        spec.check_image_size(*size)


@pytest.mark.parametrize(
    "overrides",
    [
        ["cutout_min_px=32", "cutout_max_px=32"],  # a hole the size of the image
        [f"scale_max_delta={1 - 1 / 32}"],  # shrinks to exactly one pixel
        ["pad_crop_px=31"],  # at least one real row and column stay in view
        ["shift_max_frac=1", "rotate_max_deg=180"],
    ],
)
def test_the_largest_settings_that_work_are_accepted(overrides):
    AugSpec.from_overrides(overrides).check_image_size(32, 32)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AugSpec().flip.p = 0.1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        AugSpec().mean = (0.1, 0.1, 0.1)  # type: ignore[misc]


def test_overrides_from_cli_strings():
    s = AugSpec.from_overrides(["cutout_p=0.3", "cutout-max-px=8", "mean=0.4914,0.4822,0.4465", "std=0.25"])
    assert s.cutout == Cutout(p=0.3, max_px=8) and s.flip == Flip()
    assert s.mean == (0.4914, 0.4822, 0.4465) and s.std == (0.25, 0.25, 0.25)
    # fields that must agree change together: 14..20 is valid although 14 > the default largest hole, 12
    assert AugSpec.from_overrides(["cutout_min_px=14", "cutout_max_px=20"]).cutout == Cutout(min_px=14, max_px=20)


def test_albumentations_pipeline_carries_the_spec_values():
    spec = AugSpec.from_overrides(
        ["flip_p=0.1", "ssr_p=0.2", "cutout_p=0.3", "shift_max_frac=0.1", "scale_max_delta=0.2", "rotate_max_deg=7"]
        + ["cutout_min_px=2", "cutout_max_px=9", "cutout_fill=0.25", "mean=0.1,0.2,0.3", "std=0.4,0.5,0.6"]
    )
    affine, flip, dropout, normalize = build_transform(spec, 32, 32).transforms
    assert isinstance(affine, A.Affine) and affine.p == 0.2 and affine.border_mode == cv2.BORDER_REPLICATE
    assert affine.rotate == (-7, 7) and affine.scale == {"x": (0.8, 1.2), "y": (0.8, 1.2)} and affine.keep_ratio
    assert affine.translate_percent == {"x": (-0.1, 0.1), "y": (-0.1, 0.1)}
    assert isinstance(flip, A.HorizontalFlip) and flip.p == 0.1
    assert isinstance(dropout, A.CoarseDropout) and dropout.p == 0.3 and dropout.fill == 64
    assert dropout.hole_height_range == (2, 9) and dropout.hole_width_range == (2, 9)
    assert tuple(normalize.mean) == (0.1, 0.2, 0.3) and tuple(normalize.std) == (0.4, 0.5, 0.6)
    (only,) = build_transform(spec, 32, 32, train=False).transforms
    assert isinstance(only, A.Normalize)


def test_spec_fields_are_its_units_in_the_order_the_graphs_apply_them_then_normalize():
    """The DALI graphs apply every Warp (one matrix), then at most one Shift, then the Boxes."""
    names = [f.name for f in dataclasses.fields(AugSpec)]
    assert names == [unit.name for unit in UNITS] + ["mean", "std"]
    kinds = [next(rank for rank, kind in enumerate((Warp, Shift, Box)) if isinstance(u, kind)) for u in UNITS]
    assert kinds == sorted(kinds) and kinds.count(1) <= 1
    columns = [column for unit in UNITS for column in unit.columns]
    assert len(columns) == len(set(columns))


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_off_switches_a_unit_off_and_alone_always_applies_it(unit):
    """What AugSpec.none() (evaluation) and the gallery (AugSpec.alone) rely on, checked on the unit's own draws."""
    generator = torch.Generator().manual_seed(0)
    off = draw_params(AugSpec.none(), 1000, 32, 32, generator, "cpu")
    for name, default in unit.columns.items():
        if name in off.columns and isinstance(default, bool):
            assert not off[name].any(), f"{unit.name}: {name} applied with AugSpec.none()"
    shown = draw_params(AugSpec().alone(unit.name), 1000, 32, 32, generator, "cpu")
    assert unit in shown.units
    for other in shown.units:
        for name, default in other.columns.items():
            assert len(shown[name]) == 1000
            if isinstance(default, bool):
                applied = shown[name].all() if other.name == unit.name else not shown[name].any()
                assert applied, f"{other.name}: {name} with {unit.name} alone"


def test_draws_use_one_row_of_uniforms_per_declared_uniform():
    spec = AugSpec()
    generator = torch.Generator().manual_seed(3)
    draw_params(spec, 10, 32, 32, generator, "cpu")
    # one torch.rand of (sum of uniforms, n): the generator has advanced exactly that far
    reference = torch.Generator().manual_seed(3)
    torch.rand((sum(unit.uniforms for unit in spec.included), 10), generator=reference)
    assert torch.equal(torch.rand(1, generator=generator), torch.rand(1, generator=reference))


def test_fixed_parameters_hold_the_named_units_with_their_defaults():
    params = AugParams.fixed([{"flip": True}, {"hole_h": 3.0, "cutout": True}])
    assert [u.name for u in params.units] == ["flip", "cutout"]
    assert params["flip"].tolist() == [True, False] and params["hole_w"].tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="unknown augmentation parameter 'wobble'"):
        AugParams.fixed([{"wobble": 1.0}])
    full = params.for_units(UNITS, "cpu")
    assert [u.name for u in full.units] == [u.name for u in UNITS]
    with pytest.raises(ConfigError, match="flip, which this spec does not include"):
        params.for_units([u for u in UNITS if u.name != "flip"], "cpu")


def test_pad_and_crop_is_opt_in_and_built_from_the_spec():
    assert AugSpec().pad_crop.px == 0 and all(u.name != "pad_crop" for u in AugSpec().included)
    spec = AugSpec.from_overrides(["pad_crop_px=3"])
    assert spec.pad_crop.px == 3 and [u.name for u in spec.included] == ["ssr", "flip", "pad_crop", "cutout"]
    affine, flip, pad_crop, dropout, normalize = build_transform(spec, 32, 32).transforms
    pad, crop = pad_crop.transforms
    assert isinstance(pad_crop, A.Sequential) and pad_crop.p == 1.0
    assert isinstance(pad, A.PadIfNeeded) and (pad.min_height, pad.min_width) == (38, 38)
    assert pad.border_mode == cv2.BORDER_REPLICATE and pad.position == "center"
    assert isinstance(crop, A.RandomCrop) and (crop.height, crop.width) == (32, 32)
    assert spec.alone("pad_crop").pad_crop.px == 3 and AugSpec().alone("pad_crop").pad_crop.px == 4
