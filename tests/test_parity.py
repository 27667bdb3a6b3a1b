"""DALI against the albumentations reference, unit by unit (pipeline/augs/): identity, explicit parameters, each
unit's conventions, and the distributions of random draws read back from each unit's probe image.

Every DALI graph is held to albumentations: the per-image CPU graph, the batched GPU graph run on the CPU with
OpenCV standing in for its GPU-only remap, and (when a GPU is present) the batched graph on the GPU itself. Each
unit's probe (PROBES, below) says which image makes its effect readable from the output pixels alone, how to read its
parameters back per image, and which distributions those readings follow. Readings come from pixels, never from the
loaders.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import LOADER_VARIANTS, build_loader, decode_index, indexed_images, smooth_images

from bench.peers import PEERS, PeerLoader, grid_matrices, torch_augment
from pipeline.albu_loader import build_transform
from pipeline.augs import Aug
from pipeline.errors import ConfigError
from pipeline.params import AugParams, grid_shifts, hole_boxes, sampling_matrices
from pipeline.spec import AugSpec

DALI_VARIANTS = [v for v in LOADER_VARIANTS if v.startswith("dali")]
SIZE = 32
UNITS = AugSpec().units

# --- what the readings must follow ----------------------------------------------------------------------------------

Readings = dict[str, np.ndarray]  # name -> one value per image (or (N, H, W) for a per-pixel reading)


@dataclass(frozen=True)
class Rate:
    """The boolean reading `key` is True with probability `p` (binomial test)."""

    key: str
    p: float


@dataclass(frozen=True)
class Uniform:
    """Reading `key`, on the images where reading `given` is True, is uniform on [lo, hi] (Kolmogorov-Smirnov);
    `slack` is the measurement error of a reading taken from uint8 pixels, allowed beyond the ends."""

    key: str
    lo: float
    hi: float
    given: str | None = None
    slack: float = 0.0


@dataclass(frozen=True)
class Discrete:
    """Reading `key` (integers), where `given` is True, takes value v with probability probs[v] (chi-square)."""

    key: str
    probs: Mapping[int, float]
    given: str | None = None


@dataclass(frozen=True)
class Coverage:
    """Reading `key` is an (N, H, W) boolean mask; per pixel it is True with probability expected[y, x]."""

    key: str
    expected: np.ndarray


@dataclass(frozen=True)
class Holds:
    """Reading `key` is a per-image boolean that must be True for every image (a consistency check)."""

    key: str


Expectation = Rate | Uniform | Discrete | Coverage | Holds


@dataclass(frozen=True)
class Convention:
    """Applying `mistake` to each of `rows` (what mixing up the convention would draw) must match albumentations
    clearly worse than the rows themselves."""

    what: str
    rows: tuple[Mapping[str, Any], ...]
    mistake: Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Probe:
    """One unit's probe: the image (spec, height, width) -> uint8 HWC every sample starts from; `read` (spec,
    (N, H, W, 3) float64 pixels in [0, 255]) -> readings; `expect` (spec, height, width) -> what they follow; `rows`
    of explicit parameters; `on`: the unit's settings for the probe run; `conventions` the explicit test must tell."""

    image: Callable[[AugSpec, int, int], np.ndarray]
    read: Callable[[AugSpec, np.ndarray], Readings]
    expect: Callable[[AugSpec, int, int], list[Expectation]]
    rows: tuple[Mapping[str, Any], ...]
    on: Mapping[str, Any] = field(default_factory=dict)
    conventions: tuple[Convention, ...] = ()


# --- the geometric probes' image: a ramp ----------------------------------------------------------------------------

RAMP_STEP = 8  # uint8 levels per source pixel: 32 px * 8 + 4 fits in [0, 255]


def ramp_image(spec: AugSpec, height: int, width: int) -> np.ndarray:
    """R and G encode each pixel's source x and y as 8 * coordinate + 4 (bilinear resampling keeps a linear ramp
    exact), B is 0. From one output image the whole geometric map can be read back."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = (RAMP_STEP * np.arange(width) + RAMP_STEP // 2)[None, :]
    image[..., 1] = (RAMP_STEP * np.arange(height) + RAMP_STEP // 2)[:, None]
    return image


def ramp_sources(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(src_x, src_y), each (N, H, W): where each output pixel of a ramp image came from, in input pixels."""
    half = RAMP_STEP // 2
    return (pixels[..., 0] - half) / RAMP_STEP, (pixels[..., 1] - half) / RAMP_STEP


def fit_sampling(pixels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per image, the destination->source affine map (a, b, c, d, e, f) of a warped ramp image (pixel centres):
    src_x = a x + b y + c, src_y = d x + e y + f, fitted by least squares on the pixels not clamped at the border."""
    n, height, width = pixels.shape[:3]
    src_x, src_y = ramp_sources(pixels)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    use = (src_x > 0.3) & (src_x < width - 1.3) & (src_y > 0.3) & (src_y < height - 1.3)
    basis = np.stack([x.ravel(), y.ravel(), np.ones(height * width)], -1)  # (HW, 3)
    weight = use.reshape(n, -1).astype(np.float64)  # (N, HW): 1 where a pixel takes part in the fit
    # normal equations as plain matrix products (fast GEMMs rather than a batch of tiny ones)
    gram = (weight @ (basis[:, :, None] * basis[:, None, :]).reshape(-1, 9)).reshape(n, 3, 3)
    rhs = np.stack([(weight * src.reshape(n, -1)) @ basis for src in (src_x, src_y)], -1)  # (N, 3, 2)
    coefficients = np.linalg.solve(gram, rhs)
    (a, d), (b, e), (c, f) = coefficients[:, 0].T, coefficients[:, 1].T, coefficients[:, 2].T
    return a, b, c, d, e, f


def uniform_integers(lo: int, hi: int) -> dict[int, float]:
    return {v: 1 / (hi - lo + 1) for v in range(lo, hi + 1)}


def truncated_uniform(limit: float) -> dict[int, float]:
    """P(k) for k = trunc(U(-limit, limit)), what albumentations' int() of a uniform fraction * size draws."""
    if limit <= 0:
        return {0: 1.0}
    probs = {0: min(1.0, limit) / limit}
    for k in range(1, math.ceil(limit)):
        probs[k] = probs[-k] = (min(k + 1, limit) - k) / (2 * limit)
    return probs


# --- shift-scale-rotate ---------------------------------------------------------------------------------------------


def read_ssr(spec: AugSpec, pixels: np.ndarray) -> Readings:
    """The warp's parameters from a warped ramp image (no flip: the probe runs this unit alone)."""
    size_y, size_x = pixels.shape[1:3]
    a, b, c, d, e, f = fit_sampling(pixels)
    det = a * e - b * d
    inv_scale = np.sqrt(det)
    angle = np.degrees(np.arctan2(d, a))
    # src = M dst + v with v = centre - M (centre + t)  =>  t = M^-1 (centre - v) - centre
    cx, cy = size_x / 2 - 0.5, size_y / 2 - 0.5
    wx, wy = cx - c, cy - f
    shift_x = (e * wx - b * wy) / det - cx
    shift_y = (-d * wx + a * wy) / det - cy
    ssr = (np.abs(inv_scale - 1) > 1e-3) | (np.abs(angle) > 0.05) | (np.abs(shift_x) > 0.5) | (np.abs(shift_y) > 0.5)
    shift_err = np.maximum(np.abs(shift_x - np.round(shift_x)), np.abs(shift_y - np.round(shift_y)))
    return {
        "ssr": ssr,
        "scale": 1 / inv_scale,
        "angle": angle,
        "shift_x": np.round(shift_x).astype(np.int64),
        "shift_y": np.round(shift_y).astype(np.int64),
        "whole_pixel_shifts": ~ssr | (shift_err < 0.1),
        # a rotation and an isotropic scale, nothing else (no shear, no mirror)
        "rotation_and_scale": (np.abs(a - e) < 2e-3) & (np.abs(b + d) < 2e-3),
    }


def expect_ssr(spec: AugSpec, height: int, width: int) -> list[Expectation]:
    ssr = spec.ssr
    r, d = ssr.rotate_max_deg, ssr.scale_max_delta
    # (readings come from uint8 pixels, so each carries a small measurement error: the slack)
    return [
        Rate("ssr", ssr.p),
        Uniform("angle", -r, r, given="ssr", slack=0.2),
        Uniform("scale", 1 - d, 1 + d, given="ssr", slack=3e-3),
        Discrete("shift_x", truncated_uniform(ssr.shift_max_frac * width), given="ssr"),
        Discrete("shift_y", truncated_uniform(ssr.shift_max_frac * height), given="ssr"),
        Holds("whole_pixel_shifts"),
        Holds("rotation_and_scale"),
    ]


SSR_ROWS = tuple(
    {"ssr": True, "shift_x": float(sx), "shift_y": float(sy), "scale": scale, "angle": angle}
    for (sx, sy), scale, angle in itertools.product(
        ((0, 0), (1, -1), (-1, 1)), (0.95, 1.0, 1.05), (-5.0, -2.5, 0.0, 2.5, 5.0)
    )
)
TURNED = tuple([{"ssr": True, "angle": 5.0, "scale": 1.05}] * 4 + [{"ssr": True, "angle": -5.0, "scale": 0.95}] * 4)

# --- flip -----------------------------------------------------------------------------------------------------------


def read_flip(spec: AugSpec, pixels: np.ndarray) -> Readings:
    a, b, c, d, e, f = fit_sampling(pixels)
    flip = a < 0
    # nothing else moved: exactly the identity or exactly the mirror image
    still = (np.abs(np.abs(a) - 1) < 1e-3) & (np.abs(b) + np.abs(d) + np.abs(e - 1) + np.abs(f) < 1e-3)
    return {"flip": flip, "mirror_or_identity": still & (np.abs(c - np.where(flip, pixels.shape[2] - 1, 0)) < 1e-2)}


# --- pad-and-crop ---------------------------------------------------------------------------------------------------


def read_pad_crop(spec: AugSpec, pixels: np.ndarray) -> Readings:
    """The window's offset from a translated ramp image, and whether the rest is a replicated edge."""
    height, width = pixels.shape[1:3]
    a, b, c, d, e, f = fit_sampling(pixels)
    crop_x, crop_y = np.round(c).astype(np.int64), np.round(f).astype(np.int64)
    src_x, src_y = ramp_sources(pixels)
    y, x = np.mgrid[0:height, 0:width]
    # every pixel, padding included, is the input pixel at the clamped position (x + crop_x, y + crop_y)
    want_x = np.clip(x + crop_x[:, None, None], 0, width - 1)
    want_y = np.clip(y + crop_y[:, None, None], 0, height - 1)
    return {
        "crop_x": crop_x,
        "crop_y": crop_y,
        "whole_pixel_translation": (np.abs(a - 1) + np.abs(b) + np.abs(d) + np.abs(e - 1) < 1e-3)
        & (np.abs(c - crop_x) < 0.05)
        & (np.abs(f - crop_y) < 0.05),
        "replicate_border": (np.abs(src_x - want_x) < 0.1).all((1, 2)) & (np.abs(src_y - want_y) < 0.1).all((1, 2)),
    }


def expect_pad_crop(spec: AugSpec, height: int, width: int) -> list[Expectation]:
    n = spec.pad_crop.px
    return [
        Discrete("crop_x", uniform_integers(-n, n)),
        Discrete("crop_y", uniform_integers(-n, n)),
        Holds("whole_pixel_translation"),
        Holds("replicate_border"),
    ]


WINDOWS = tuple(
    {"crop_x": float(x), "crop_y": float(y)}
    for x, y in ((0, 0), (4, -4), (-4, 4), (3, 1), (-2, -3), (1, 0), (0, -1), (4, 4), (-4, -4))
)

# --- cutout ---------------------------------------------------------------------------------------------------------


def cutout_image(spec: AugSpec, height: int, width: int) -> np.ndarray:
    """Flat, and as far from the fill as a uint8 level can be, so the hole is every pixel near the fill."""
    return np.full((height, width, 3), 255 if spec.cutout.fill_uint8 < 128 else 0, np.uint8)


def read_cutout(spec: AugSpec, pixels: np.ndarray) -> Readings:
    hole = np.abs(pixels[..., 2] - spec.cutout.fill_uint8) < 64
    hole_h, hole_w = hole.any(2).sum(1), hole.any(1).sum(1)
    return {
        "cutout": hole.any((1, 2)),
        "hole": hole,
        "hole_h": hole_h,
        "hole_w": hole_w,
        "hole_is_rectangle": hole.sum((1, 2)) == hole_h * hole_w,
    }


def expect_cutout(spec: AugSpec, height: int, width: int) -> list[Expectation]:
    cutout = spec.cutout
    sizes = range(cutout.min_px, cutout.max_px + 1)

    def line(length: int) -> np.ndarray:
        """P(pixel in the hole) along one axis: size uniform, start uniform in [0, length - size]."""
        out = np.zeros(length)
        for size in sizes:
            for start in range(length - size + 1):
                out[start : start + size] += 1 / (len(sizes) * (length - size + 1))
        return out

    return [
        Rate("cutout", cutout.p),
        Discrete("hole_h", uniform_integers(cutout.min_px, cutout.max_px), given="cutout"),
        Discrete("hole_w", uniform_integers(cutout.min_px, cutout.max_px), given="cutout"),
        Coverage("hole", cutout.p * np.outer(line(height), line(width))),
        Holds("hole_is_rectangle"),
    ]


def hole(y: int, x: int, h: int, w: int) -> dict[str, Any]:
    return {"cutout": True, "hole_y": y, "hole_x": x, "hole_h": h, "hole_w": w}


HOLES = ((0, 0, 1, 1), (20, 20, 12, 12), (5, 17, 3, 9), (31, 0, 1, 12), (10, 31, 12, 1), (8, 12, 4, 10))


def transposed(row: Mapping[str, Any]) -> dict[str, Any]:
    """Rows and columns swapped: what mixing up (y, x) and albumentations' (x, y) hole corners gives."""
    return hole(row["hole_x"], row["hole_y"], row["hole_w"], row["hole_h"])


PROBES = {
    "ssr": Probe(
        ramp_image,
        read_ssr,
        expect_ssr,
        SSR_ROWS,
        conventions=(
            Convention("rotation direction", TURNED, lambda row: {**row, "angle": -row["angle"]}),
            # half a pixel off: what mixing DALI's pixel-corner and OpenCV's pixel-centre conventions gives
            Convention("pixel centres", TURNED, lambda row: {**row, "shift_x": 0.5, "shift_y": 0.5}),
        ),
    ),
    "flip": Probe(
        ramp_image,
        read_flip,
        lambda spec, height, width: [Rate("flip", spec.flip.p), Holds("mirror_or_identity")],
        ({"flip": True}, {"flip": False}),
    ),
    "pad_crop": Probe(
        ramp_image,
        read_pad_crop,
        expect_pad_crop,
        WINDOWS,
        on={"px": 4},
        conventions=(
            # the window moved the other way (the content moved by crop instead of by -crop)
            Convention("crop direction", WINDOWS[1:5], lambda r: {"crop_x": -r["crop_x"], "crop_y": -r["crop_y"]}),
        ),
    ),
    "cutout": Probe(
        cutout_image,
        read_cutout,
        expect_cutout,
        tuple(hole(*h) for h in HOLES),
        conventions=(Convention("hole axes", tuple(hole(*h) for h in HOLES[2:]), transposed),),
    ),
}


def probe_spec(unit: Aug) -> AugSpec:
    """The unit alone: its defaults and its probe's settings, every other unit off."""
    settings = dataclasses.replace(type(unit)(), **PROBES[unit.name].on)
    return dataclasses.replace(AugSpec.none(), **{unit.name: settings})


# The seed's spec, and one that includes every unit (pad-and-crop is off by default) at its probe settings.
SPECS = {
    "seed": AugSpec(),
    "every-unit": AugSpec(**{u.name: dataclasses.replace(u, **PROBES[u.name].on) for u in UNITS}),
}


def to_pixels(x: torch.Tensor, spec: AugSpec) -> np.ndarray:
    """Normalized [B,3,H,W] back to [0, 255] HWC float64, unrounded."""
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x.detach().cpu().double() * std + mean) * 255).permute(0, 2, 3, 1).numpy()


# --- 1. identity --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_every_probability_zero_gives_the_plain_normalized_image(variant):
    images = smooth_images(40, seed=2)
    loader = build_loader(variant, images, np.zeros(40, np.int64), 16, spec=AugSpec.none(), shuffle=False)
    out = torch.cat([x.cpu() for x, _ in loader])
    expected = (torch.from_numpy(images).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(out.permute(0, 2, 3, 1), expected, rtol=0, atol=1e-6)


# --- 2. explicit parameters -----------------------------------------------------------------------------------------


def grid(spec: AugSpec) -> list[dict]:
    """Every row of every unit the spec includes, alone and combined with one row of each other unit (cycled
    through their rows), plus the empty row."""
    units = spec.included
    rows: list[dict] = []
    for unit in units:
        for i, row in enumerate(PROBES[unit.name].rows):
            combined = {}
            for other in units:
                others = PROBES[other.name].rows
                combined.update(row if other is unit else others[i % len(others)])
            rows += [dict(row), combined]
    return [*rows, {}]


def dali_fixed(variant: str, spec: AugSpec, images: np.ndarray, rows: list[dict]) -> np.ndarray:
    loader = build_loader(variant, images[:1], np.zeros(1, np.int64), len(rows), spec=spec)
    return to_pixels(loader.run_fixed(images, AugParams.fixed(rows, device=loader.device)), spec)


def albu_fixed(spec: AugSpec, images: np.ndarray, rows: list[dict]) -> np.ndarray:
    """The loader's albumentations transforms, each applied by its unit with the row's explicit parameters (a key
    a row leaves out takes its 'not applied' value)."""
    *twins, normalize = build_transform(spec, *images.shape[1:3]).transforms
    out = []
    for image, row in zip(images, rows, strict=True):
        assert {spec.unit_of_column(name).name for name in row} <= {unit.name for unit in spec.included}
        for unit, transform in zip(spec.included, twins, strict=True):
            image = unit.albu_apply(transform, image, {name: row.get(name, d) for name, d in unit.columns.items()})
        out.append(normalize.apply(image))
    return to_pixels(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2), spec)


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("variant", DALI_VARIANTS)
def test_explicit_parameters_match_albumentations(variant, spec_name):
    spec = SPECS[spec_name]
    rows = grid(spec)
    images = smooth_images(len(rows), seed=3)
    dali, albu = dali_fixed(variant, spec, images, rows), albu_fixed(spec, images, rows)
    diff = np.abs(dali - albu) / 255  # in [0, 1] image units
    interior = diff[:, 2:-2, 2:-2]
    worst = int(interior.max(axis=(1, 2, 3)).argmax())
    assert interior.max() <= 2 / 255, f"interior differs by {interior.max() * 255:.2f}/255 for {rows[worst]}"
    per_image_mean = diff.mean(axis=(1, 2, 3))
    assert per_image_mean.max() <= 0.5 / 255, (
        f"mean |diff| {per_image_mean.max() * 255:.3f}/255 for {rows[int(per_image_mean.argmax())]}"
    )


CONVENTIONS = [(unit, c) for unit in UNITS for c in PROBES[unit.name].conventions]


@pytest.mark.parametrize("variant", DALI_VARIANTS)
@pytest.mark.parametrize("unit, convention", CONVENTIONS, ids=[f"{u.name}-{c.what}" for u, c in CONVENTIONS])
def test_conventions_are_albumentations(variant, unit, convention):
    """Found by test, not assumed: what mixing up a convention would draw must match albumentations clearly worse
    than the chosen convention (and the chosen one must match well)."""
    spec = SPECS["every-unit"]
    rows = list(convention.rows)
    images = smooth_images(len(rows), seed=4)
    albu = albu_fixed(spec, images, rows)

    def error(candidate: list[dict]) -> float:
        return float(np.abs(dali_fixed(variant, spec, images, candidate) - albu)[:, 3:-3, 3:-3].mean())

    chosen, mistaken = error(rows), error([convention.mistake(row) for row in rows])
    assert chosen < 0.5 and mistaken > 10 * chosen, f"{convention.what}: {chosen:.3f} vs mistaken {mistaken:.3f}"


# --- 3. distributions of random parameters, read back from each unit's probe image ----------------------------------

SAMPLES = 20_000
ALPHA = 0.001  # every distribution test rejects at this level
Z_999 = 3.2905  # two-sided 99.9% normal quantile


_measured: dict[tuple[str, str], Readings] = {}


def measured(unit: Aug, variant: str) -> Readings:
    key = (unit.name, variant)
    if key not in _measured:
        spec = probe_spec(unit)
        probe = PROBES[unit.name]
        images = np.broadcast_to(probe.image(spec, SIZE, SIZE), (SAMPLES, SIZE, SIZE, 3)).copy()
        workers = {"workers": 2} if variant == "cpu" else {}
        loader = build_loader(variant, images, np.zeros(SAMPLES, np.int64), 1000, seed=11, spec=spec, **workers)
        _measured[key] = probe.read(spec, np.concatenate([to_pixels(x, spec) for x, _ in loader]))
    return _measured[key]


def selected(readings: Readings, key: str, given: str | None) -> np.ndarray:
    return readings[key] if given is None else readings[key][readings[given]]


def follows(e: Expectation, m: Readings) -> str | None:
    """Why readings `m` do not follow expectation `e`, or None."""
    if isinstance(e, Rate):
        count, p = int(m[e.key].sum()), e.p
        if abs(count / SAMPLES - p) > Z_999 * math.sqrt(p * (1 - p) / SAMPLES) + 1e-12:
            return f"{count}/{SAMPLES} applied, spec p={p}"
    elif isinstance(e, Uniform):
        values = selected(m, e.key, e.given)
        if values.min() < e.lo - e.slack or values.max() > e.hi + e.slack:
            return f"range [{values.min():.4g}, {values.max():.4g}] outside [{e.lo}, {e.hi}]"
        if e.hi > e.lo and (p := scipy.stats.kstest(values, "uniform", args=(e.lo, e.hi - e.lo)).pvalue) < ALPHA:
            return f"not uniform on [{e.lo}, {e.hi}]: KS p={p:.2g}"
    elif isinstance(e, Discrete):
        values = selected(m, e.key, e.given)
        support = sorted(e.probs)
        if not np.isin(values, support).all():
            return f"values {sorted(set(values.tolist()) - set(support))} outside {support}"
        counts = np.array([(values == v).sum() for v in support])
        expected = len(values) * np.array([e.probs[v] for v in support])
        if len(support) > 1 and (p := scipy.stats.chisquare(counts, expected).pvalue) < ALPHA:
            return f"counts {counts.tolist()} vs expected {np.round(expected).tolist()}: chi2 p={p:.2g}"
    elif isinstance(e, Coverage):
        observed = m[e.key].mean(0)
        z = np.abs(observed - e.expected) / np.sqrt(np.maximum(e.expected * (1 - e.expected), 1e-12) / SAMPLES)
        if z.max() >= 4.5:
            return f"pixel {np.unravel_index(z.argmax(), z.shape)}: z={z.max():.1f}"
    elif isinstance(e, Holds) and not m[e.key].all():
        return f"fails for {int((~m[e.key]).sum())} images"
    return None


def same_draws(e: Expectation, a: Readings, b: Readings) -> str | None:
    """Why readings `a` (DALI) and `b` (albumentations) do not look drawn from one distribution, or None."""
    if isinstance(e, Rate):
        pa, pb = a[e.key].mean(), b[e.key].mean()
        pooled = (pa + pb) / 2
        if abs(pa - pb) > Z_999 * math.sqrt(max(pooled * (1 - pooled), 1e-12) * 2 / SAMPLES):
            return f"rates {pa:.4f} vs {pb:.4f}"
    elif isinstance(e, Uniform):
        p = scipy.stats.ks_2samp(selected(a, e.key, e.given), selected(b, e.key, e.given)).pvalue
        if p < ALPHA:
            return f"two-sample KS p={p:.2g}"
    elif isinstance(e, Discrete):
        va, vb = selected(a, e.key, e.given), selected(b, e.key, e.given)
        support = sorted(set(va.tolist()) | set(vb.tolist()))
        table = np.array([[(v == s).sum() for s in support] for v in (va, vb)])
        if len(support) > 1 and (p := scipy.stats.chi2_contingency(table).pvalue) < ALPHA:
            return f"counts {table.tolist()}: chi2 homogeneity p={p:.2g}"
    elif isinstance(e, Coverage):
        observed, reference = a[e.key].mean(0), b[e.key].mean(0)
        pooled = (observed + reference) / 2
        z = np.abs(observed - reference) / np.sqrt(np.maximum(pooled * (1 - pooled), 1e-9) * 2 / SAMPLES)
        if z.max() >= 4.5:
            return f"pixel {np.unravel_index(z.argmax(), z.shape)}: z={z.max():.1f}"
    return None


EXPECTATIONS = [(unit, e) for unit in UNITS for e in PROBES[unit.name].expect(probe_spec(unit), SIZE, SIZE)]
EXPECTATION_IDS = [f"{unit.name}-{type(e).__name__}-{e.key}" for unit, e in EXPECTATIONS]


def test_every_unit_has_a_probe_that_tests_its_draws():
    for unit in UNITS:
        kinds = {type(e) for u, e in EXPECTATIONS if u is unit}
        assert kinds & {Rate, Uniform, Discrete}, f"{unit.name}'s probe tests none of its draws"
        assert PROBES[unit.name].rows, f"{unit.name} has no explicit-parameter rows"


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
@pytest.mark.parametrize("unit, expectation", EXPECTATIONS, ids=EXPECTATION_IDS)
def test_draws_follow_the_spec(variant, unit, expectation):
    problem = follows(expectation, measured(unit, variant))
    assert problem is None, f"{unit.name} {expectation}: {problem}"


@pytest.mark.parametrize("variant", DALI_VARIANTS)
@pytest.mark.parametrize("unit, expectation", EXPECTATIONS, ids=EXPECTATION_IDS)
def test_dali_draws_match_albumentations(variant, unit, expectation):
    problem = same_draws(expectation, measured(unit, variant), measured(unit, "cpu"))
    assert problem is None, f"{unit.name} {expectation}: {problem}"


# --- the benchmark peers (bench/peers.py) ---------------------------------------------------------------------------
# The benchmark peers (bench/peers.py) on the CPU: they iterate like the project's loaders, and they augment by the
# same AugSpec. The torch peer is held to albumentations as DALI is (tests/test_parity.py's explicit rows, conventions
# and every unit's distributions); the kornia peer draws its own parameters, so it is held to the spec's rates, and to
# every expectation of the units whose law it takes from the spec.


@pytest.mark.parametrize("kind", PEERS)
def test_batches_are_channels_last_and_every_image_comes_once_per_epoch(kind):
    n, batch = 100, 32
    images, labels = indexed_images(n), np.arange(n) % 10
    loader = PeerLoader(kind, images, labels, batch, spec=AugSpec.none(), seed=3)
    assert len(loader) == 4 and loader.num_samples == n
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(x) for x, _ in batches] == [32, 32, 32, 4]
        for x, y in batches:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
            assert x.is_contiguous(memory_format=torch.channels_last)
        order = np.concatenate([decode_index(x) for x, _ in batches])
        assert sorted(order) == list(range(n))
        assert (np.concatenate([y.numpy() for _, y in batches]) == labels[order]).all()
        epochs.append(order)
    assert (epochs[0] != epochs[1]).any()  # each pass is the next epoch, reshuffled
    loader.set_epoch(0)
    assert (np.concatenate([decode_index(x) for x, _ in loader]) == epochs[0]).all()
    dropped = PeerLoader(kind, images, labels, batch, spec=AugSpec.none(), drop_last=True)
    assert len(dropped) == 3 and [len(x) for x, _ in dropped] == [32, 32, 32]


@pytest.mark.parametrize("kind", PEERS)
def test_a_peer_epoch_holds_the_loaders_images_in_the_loaders_batches(kind):
    """The peers take the loaders' order (pipeline/order.py): for a seed and an epoch, the same images in the same
    batches as make_loader's loaders, so a benchmark row of a peer and one of DALI time the same epoch."""
    from pipeline import Order, make_loader

    n, batch = 100, 32
    images, labels = indexed_images(n), np.arange(n) % 10
    peer = PeerLoader(kind, images, labels, batch, spec=AugSpec.none(), seed=5)
    loader = make_loader("cpu", images, labels, batch, spec=AugSpec.none(), order=Order(seed=5), workers=0)
    for epoch in (0, 1):
        peer.set_epoch(epoch)
        loader.set_epoch(epoch)
        mine = [decode_index(x).tolist() for x, _ in peer]
        theirs = [decode_index(x).tolist() for x, _ in loader]
        assert mine == theirs, f"epoch {epoch}"


@pytest.mark.parametrize("kind", PEERS)
def test_a_peer_with_every_probability_zero_gives_the_plain_normalized_image(kind):
    images = smooth_images(40, seed=2)
    out = torch.cat([x for x, _ in PeerLoader(kind, images, np.zeros(40), 16, spec=AugSpec.none(), shuffle=False)])
    expected = (torch.from_numpy(images).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(out.permute(0, 2, 3, 1), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", PEERS)
def test_a_spec_that_cannot_work_on_the_images_is_refused(kind):
    with pytest.raises(ValueError, match="cutout_max_px"):
        PeerLoader(kind, smooth_images(4, size=8), np.zeros(4), 2, spec=AugSpec())  # 12-px holes in 8-px images


def torch_peer_fixed(spec: AugSpec, images: np.ndarray, rows: list[dict]) -> np.ndarray:
    """The torch peer's pixels ([0, 255] HWC float64) for explicit parameter rows."""
    params = AugParams.fixed(rows)
    theta = grid_matrices(sampling_matrices(params, SIZE, SIZE), SIZE, SIZE)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    x = torch_augment(
        torch.from_numpy(images), theta, grid_shifts(params), hole_boxes(params), spec, 1 / (255 * std), -mean / std
    )
    return to_pixels(x, spec)


@pytest.mark.parametrize("spec_name", SPECS)
def test_torch_peer_matches_albumentations_on_explicit_parameters(spec_name):
    spec = SPECS[spec_name]
    rows = grid(spec)
    images = smooth_images(len(rows), seed=3)
    diff = np.abs(torch_peer_fixed(spec, images, rows) - albu_fixed(spec, images, rows))  # in uint8 levels
    worst = int(diff.max(axis=(1, 2, 3)).argmax())
    # Exact but for albumentations' rounding to uint8 (0.5) and OpenCV's 1/32-pixel interpolation weights.
    assert diff.max() <= 1.0, f"differs by {diff.max():.2f}/255 for {rows[worst]}"
    assert diff.mean(axis=(1, 2, 3)).max() <= 0.3


@pytest.mark.parametrize("unit, convention", CONVENTIONS, ids=[f"{u.name}-{c.what}" for u, c in CONVENTIONS])
def test_torch_peer_conventions_are_albumentations(unit, convention):
    """A mixed-up convention (a half-pixel slip of the pixel centres, a mirrored angle, ...) would be seen."""
    spec = SPECS["every-unit"]
    rows = list(convention.rows)
    images = smooth_images(len(rows), seed=4)
    albu = albu_fixed(spec, images, rows)

    def error(candidate: list[dict]) -> float:
        return float(np.abs(torch_peer_fixed(spec, images, candidate) - albu)[:, 3:-3, 3:-3].mean())

    chosen, mistaken = error(rows), error([convention.mistake(row) for row in rows])
    assert chosen < 0.5 and mistaken > 10 * chosen, f"{convention.what}: {chosen:.3f} vs mistaken {mistaken:.3f}"


_peer_measured: dict[tuple[str, str], dict] = {}


def peer_measured(unit, kind: str) -> dict:  # unit: a pipeline.augs unit
    """Each unit alone (its probe's spec), SAMPLES draws of its probe image through peer `kind`, read back."""
    if (unit.name, kind) not in _peer_measured:
        spec = probe_spec(unit)
        images = np.broadcast_to(PROBES[unit.name].image(spec, SIZE, SIZE), (SAMPLES, SIZE, SIZE, 3)).copy()
        torch.manual_seed(11)  # kornia draws from torch's global generator
        loader = PeerLoader(kind, images, np.zeros(SAMPLES), 1000, spec=spec, seed=11)
        _peer_measured[unit.name, kind] = PROBES[unit.name].read(
            spec, np.concatenate([to_pixels(x, spec) for x, _ in loader])
        )
    return _peer_measured[unit.name, kind]


# The kornia peer draws every parameter by the spec's law but shift-scale-rotate's shift, which kornia draws
# continuous (U(-f, f) * size, not truncated to whole pixels): those expectations alone are left out (measured:
# kornia's shifts read back as -2 .. 2 px where the spec gives -1 .. 1).
KORNIA_CONTINUOUS_SHIFT = {"shift_x", "shift_y", "whole_pixel_shifts"}
KORNIA = [(u, e) for u, e in EXPECTATIONS if not (u.name == "ssr" and e.key in KORNIA_CONTINUOUS_SHIFT)]


@pytest.mark.slow
@pytest.mark.parametrize("unit, expectation", EXPECTATIONS, ids=EXPECTATION_IDS)
def test_torch_peer_draws_follow_the_spec(unit, expectation):
    problem = follows(expectation, peer_measured(unit, "torch"))
    assert problem is None, f"{unit.name} {expectation}: {problem}"


@pytest.mark.slow
@pytest.mark.parametrize("unit, expectation", KORNIA, ids=[f"{u.name}-{type(e).__name__}-{e.key}" for u, e in KORNIA])
def test_kornia_peer_draws_follow_the_spec(unit, expectation):
    problem = follows(expectation, peer_measured(unit, "kornia"))
    assert problem is None, f"{unit.name} {expectation}: {problem}"


def test_kornia_peer_is_refused_without_kornia(monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[bench\]'"):
        PeerLoader("kornia", smooth_images(4), np.zeros(4), 2)
    PeerLoader("torch", smooth_images(4), np.zeros(4), 2)  # plain torch needs nothing more


def test_kornia_peer_refuses_a_unit_it_has_no_twin_for(monkeypatch):
    """A unit added to pipeline/augs/ without a kornia twin is refused, not silently left out of the benchmark."""
    import bench.peers

    pytest.importorskip("kornia")
    monkeypatch.setattr(bench.peers, "KORNIA_TWINS", ("ssr", "pad_crop", "cutout"))
    with pytest.raises(ValueError, match="no twin for flip"):
        bench.peers.kornia_augment(AugSpec(), SIZE, SIZE)
