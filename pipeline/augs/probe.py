"""How the parity tests see one augmentation: a probe image, a reader, and what the readings must follow.

Each unit's `probe` says which image makes its effect readable from the output pixels alone, how to read its
parameters back per image, and which distributions those readings follow for a given AugSpec. tests/test_parity.py
runs every unit alone (every other unit off) through every loader, reads the parameters back, and holds each loader
to these expectations and DALI to albumentations. Numpy only: readings come from pixels, never from the loaders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.spec import AugSpec

Readings = dict[str, np.ndarray]  # name -> one value per image (or (N, H, W) for a per-pixel reading)


@dataclass(frozen=True)
class Rate:
    """The boolean reading `key` is True with probability `p` (binomial test)."""

    key: str
    p: float


@dataclass(frozen=True)
class Uniform:
    """Reading `key`, on the images where reading `given` is True, is uniform on [lo, hi] (Kolmogorov-Smirnov).

    `slack` is the measurement error of a reading taken from uint8 pixels, allowed beyond the ends."""

    key: str
    lo: float
    hi: float
    given: str | None = None
    slack: float = 0.0


@dataclass(frozen=True)
class Discrete:
    """Reading `key` (integers), on the images where `given` is True, takes value v with probability probs[v]
    (chi-square goodness of fit; a value outside `probs` fails)."""

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
    """A convention the explicit-parameter test must be able to see: applying `mistake` to each of `rows` (what
    mixing up the convention would draw) must match albumentations clearly worse than the rows themselves."""

    what: str
    rows: tuple[Mapping[str, Any], ...]
    mistake: Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Probe:
    """One unit's parity probe.

    on:          AugSpec values for the probe run, on top of the unit's defaults with every other unit off.
    image:       (spec, height, width) -> the uint8 HWC image every probe sample starts from.
    read:        (spec, pixels) -> readings, from (N, H, W, 3) float64 output pixels in [0, 255].
    expect:      (spec, height, width) -> what the readings must follow.
    rows:        explicit-parameter rows (keys: the unit's parameter columns) for the fixed-parameter test.
    conventions: sign and origin conventions that test must be able to tell apart.
    """

    image: Callable[[AugSpec, int, int], np.ndarray]
    read: Callable[[AugSpec, np.ndarray], Readings]
    expect: Callable[[AugSpec, int, int], list[Expectation]]
    rows: tuple[Mapping[str, Any], ...]
    on: Mapping[str, object] = field(default_factory=dict)
    conventions: tuple[Convention, ...] = ()


# --- shared by the geometric probes -------------------------------------------------------------------------------

RAMP_STEP = 8  # uint8 levels per source pixel: 32 px * 8 + 4 fits in [0, 255]


def ramp_image(spec: AugSpec, height: int, width: int) -> np.ndarray:
    """R and G encode each pixel's source x and y as 8 * coordinate + 4 (bilinear resampling keeps a linear ramp
    exact), B is 0. From one output image the whole geometric map can be read back."""
    if max(height, width) * RAMP_STEP > 256:
        raise ValueError(f"the ramp probe encodes at most {256 // RAMP_STEP} px per axis, got {height}x{width}")
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
    src_x = a x + b y + c, src_y = d x + e y + f, fitted by least squares on the pixels that were not clamped at the
    border (their source lies strictly inside the image)."""
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
    """Every integer in [lo, hi] equally likely."""
    return {v: 1 / (hi - lo + 1) for v in range(lo, hi + 1)}


def truncated_uniform(limit: float) -> dict[int, float]:
    """P(k) for k = trunc(U(-limit, limit)), what albumentations' int() of a uniform fraction * size draws."""
    if limit <= 0:
        return {0: 1.0}
    probs = {0: min(1.0, limit) / limit}
    for k in range(1, math.ceil(limit)):
        probs[k] = probs[-k] = (min(k + 1, limit) - k) / (2 * limit)
    return probs
