"""DALI against the albumentations reference: identity, explicit parameters, and the distributions of random ones.

Every DALI graph is held to albumentations: the per-image CPU graph, the batched GPU graph run on the CPU with
OpenCV standing in for its GPU-only remap, and (when a GPU is present) the batched graph on the GPU itself.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import LOADER_VARIANTS, build_loader, smooth_images

from pipeline.albu_loader import apply_fixed, build_transform
from pipeline.params import AugParams
from pipeline.spec import AugSpec

DALI_VARIANTS = [v for v in LOADER_VARIANTS if v.startswith("dali")]
SPEC = AugSpec()


def to_pixels(x: torch.Tensor, spec: AugSpec = SPEC) -> np.ndarray:
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


def _grid() -> list[dict]:
    rows = []
    for flip, shift, scale, angle in itertools.product(
        (False, True), ((0, 0), (1, -1), (-1, 1)), (0.95, 1.0, 1.05), (-5.0, -2.5, 0.0, 2.5, 5.0)
    ):
        rows.append(
            {
                "flip": flip,
                "ssr": True,
                "shift_x": float(shift[0]),
                "shift_y": float(shift[1]),
                "scale": scale,
                "angle": angle,
            }
        )
    holes = [(0, 0, 1, 1), (20, 20, 12, 12), (5, 17, 3, 9), (31, 0, 1, 12), (10, 31, 12, 1)]
    for k, (y, x, h, w) in enumerate(holes):
        rows.append({"cutout": True, "hole_y": y, "hole_x": x, "hole_h": h, "hole_w": w, "flip": k % 2 == 1})
        rows.append({**rows[k * 7], "cutout": True, "hole_y": y, "hole_x": x, "hole_h": h, "hole_w": w})
    rows.append({"flip": True})
    rows.append({})
    return rows


def _dali_fixed(variant: str, images: np.ndarray, rows: list[dict]) -> np.ndarray:
    loader = build_loader(variant, images[:1], np.zeros(1, np.int64), len(rows))
    return to_pixels(loader.run_fixed(images, AugParams.fixed(rows, device=loader.device)))


def _albu_fixed(images: np.ndarray, rows: list[dict]) -> np.ndarray:
    transform = build_transform(SPEC)
    out = np.stack([apply_fixed(transform, image, row) for image, row in zip(images, rows, strict=True)])
    return to_pixels(torch.from_numpy(out).permute(0, 3, 1, 2))


@pytest.mark.parametrize("variant", DALI_VARIANTS)
def test_explicit_parameters_match_albumentations(variant):
    rows = _grid()
    images = smooth_images(len(rows), seed=3)
    dali, albu = _dali_fixed(variant, images, rows), _albu_fixed(images, rows)
    diff = np.abs(dali - albu) / 255  # in [0, 1] image units
    interior = diff[:, 2:-2, 2:-2]
    worst = int(interior.max(axis=(1, 2, 3)).argmax())
    assert interior.max() <= 2 / 255, f"interior differs by {interior.max() * 255:.2f}/255 for {rows[worst]}"
    per_image_mean = diff.mean(axis=(1, 2, 3))
    assert per_image_mean.max() <= 0.5 / 255, (
        f"mean |diff| {per_image_mean.max() * 255:.3f}/255 for {rows[int(per_image_mean.argmax())]}"
    )


@pytest.mark.parametrize("variant", DALI_VARIANTS)
def test_rotation_direction_and_pixel_centres_are_albumentations(variant):
    """Found by test, not assumed: the opposite rotation sign, or a half-pixel offset of the centre (what mixing
    DALI's pixel-corner and OpenCV's pixel-centre conventions gives), must be clearly worse than the chosen one."""
    images = smooth_images(8, seed=4)
    rows = [{"ssr": True, "angle": 5.0, "scale": 1.05}] * 4 + [{"ssr": True, "angle": -5.0, "scale": 0.95}] * 4
    albu = _albu_fixed(images, rows)

    def error(candidate_rows: list[dict]) -> float:
        return float(np.abs(_dali_fixed(variant, images, candidate_rows) - albu)[:, 3:-3, 3:-3].mean())

    chosen = error(rows)
    mirrored = error([{**r, "angle": -r["angle"]} for r in rows])
    assert chosen < 0.5 and mirrored > 10 * chosen
    # A pixel-corner/pixel-centre mix-up moves the whole image by half a pixel; show that this test would see it.
    half_pixel_off = error([{**r, "shift_x": 0.5, "shift_y": 0.5} for r in rows])
    assert half_pixel_off > 10 * chosen


# --- 3. distributions of random parameters ------------------------------------------------------------------------

SAMPLES = 20_000
SIZE = 32
Z_999 = 3.2905  # two-sided 99.9% normal quantile
CHI2_999 = {2: 13.816, 11: 31.264}  # chi-square critical values at p = 0.001 for these degrees of freedom


def probe_image() -> np.ndarray:
    """R and G are ramps that encode the source x and y of every pixel (bilinear resampling keeps a linear ramp
    exact), B is 0 so the cutout's mid-grey fill stands out. From one output we read flip, the full affine map and
    the hole."""
    ramp = 8 * np.arange(SIZE) + 4
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[..., 0] = ramp[None, :]
    image[..., 1] = ramp[:, None]
    return image


def measure(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: flip, the SSR parameters it had (scale, angle, shift), and the cutout hole, read off the pixels."""
    n = len(pixels)
    hole = pixels[..., 2] > 64
    src_x, src_y = (pixels[..., 0] - 4) / 8, (pixels[..., 1] - 4) / 8
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    # fit src = A @ (x, y, 1) per image on the pixels that are neither in the hole nor clamped at the border
    use = ~hole & (src_x > 0.3) & (src_x < SIZE - 1.3) & (src_y > 0.3) & (src_y < SIZE - 1.3)
    shape = (n, SIZE, SIZE)
    basis = np.stack([np.broadcast_to(x, shape), np.broadcast_to(y, shape), np.ones(shape)], -1) * use[..., None]
    gram = np.einsum("nhwi,nhwj->nij", basis, basis)
    a, b, c = np.linalg.solve(gram, np.einsum("nhwi,nhw->ni", basis, src_x)[..., None])[..., 0].T
    d, e, f = np.linalg.solve(gram, np.einsum("nhwi,nhw->ni", basis, src_y)[..., None])[..., 0].T
    flip = a < 0
    # undo the flip (x -> W-1-x) to get the inverse of the shift-scale-rotate alone
    c, f = np.where(flip, c + a * (SIZE - 1), c), np.where(flip, f + d * (SIZE - 1), f)
    a, d = np.where(flip, -a, a), np.where(flip, -d, d)
    inv_scale = np.sqrt(a * e - b * d)
    angle = np.degrees(np.arctan2(d, a))
    # src = M dst + v with v = centre - M (centre + t)  =>  t = M^-1 (centre - v) - centre
    centre, det = SIZE / 2 - 0.5, a * e - b * d
    wx, wy = centre - c, centre - f
    shift_x = (e * wx - b * wy) / det - centre
    shift_y = (-d * wx + a * wy) / det - centre
    ssr = (np.abs(inv_scale - 1) > 1e-3) | (np.abs(angle) > 0.05) | (np.abs(shift_x) > 0.5) | (np.abs(shift_y) > 0.5)
    rows, cols = hole.any(2), hole.any(1)
    hole_h, hole_w = rows.sum(1), cols.sum(1)
    return {
        "flip": flip,
        "ssr": ssr,
        "scale": 1 / inv_scale,
        "angle": angle,
        "shift_x": np.round(shift_x),
        "shift_y": np.round(shift_y),
        "shift_err": np.maximum(np.abs(shift_x - np.round(shift_x)), np.abs(shift_y - np.round(shift_y))),
        "cutout": hole.any((1, 2)),
        "hole": hole,
        "hole_h": hole_h,
        "hole_w": hole_w,
        "hole_is_rectangle": hole.sum((1, 2)) == hole_h * hole_w,
    }


_measured: dict[str, dict[str, np.ndarray]] = {}


def measured(variant: str) -> dict[str, np.ndarray]:
    if variant not in _measured:
        images = np.broadcast_to(probe_image(), (SAMPLES, SIZE, SIZE, 3)).copy()
        loader = build_loader(
            variant, images, np.zeros(SAMPLES, np.int64), 1000, seed=11, **({"workers": 2} if variant == "cpu" else {})
        )
        _measured[variant] = measure(np.concatenate([to_pixels(x) for x, _ in loader]))
    return _measured[variant]


def within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count / n - p) <= Z_999 * math.sqrt(p * (1 - p) / n) + 1e-12


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n: int, m: int) -> float:
    return 1.95 * math.sqrt((n + m) / (n * m))  # two-sample KS at alpha = 0.001


def expected_hole_coverage(spec: AugSpec) -> np.ndarray:
    """P(pixel in hole) per pixel for CoarseDropout's placement: size uniform, top-left uniform in [0, S - size]."""
    sizes = np.arange(spec.cutout_min_px, spec.cutout_max_px + 1)
    line = np.zeros(SIZE)
    for size in sizes:
        for start in range(SIZE - size + 1):
            line[start : start + size] += 1 / (len(sizes) * (SIZE - size + 1))
    return spec.cutout_p * np.outer(line, line)


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_probe_reads_back_a_consistent_augmentation(variant):
    m = measured(variant)
    assert m["hole_is_rectangle"].all()
    ssr = m["ssr"]
    assert (m["shift_err"][ssr] < 0.1).all()  # shifts are whole pixels
    assert (np.abs(m["scale"][~ssr] - 1) < 1e-3).all() and (np.abs(m["angle"][~ssr]) < 0.05).all()


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
@pytest.mark.parametrize("what, p", [("flip", SPEC.flip_p), ("ssr", SPEC.ssr_p), ("cutout", SPEC.cutout_p)])
def test_rates_match_the_spec(variant, what, p):
    count = int(measured(variant)[what].sum())
    assert within_binomial(count, SAMPLES, p), f"{what}: {count}/{SAMPLES} applied, spec p={p}"


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_hole_sizes_are_uniform(variant):
    m = measured(variant)
    for key in ("hole_h", "hole_w"):
        sizes = m[key][m["cutout"]]
        assert sizes.min() >= SPEC.cutout_min_px and sizes.max() <= SPEC.cutout_max_px
        counts = np.bincount(sizes - SPEC.cutout_min_px, minlength=12)
        expected = len(sizes) / 12
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_999[11], f"{key} counts {counts.tolist()} (chi2 {chi2:.1f})"


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_hole_coverage_map_matches(variant):
    """Per pixel, how often it is cut out: each loader against the exact expectation, DALI against albumentations."""
    expected = expected_hole_coverage(SPEC)
    observed = measured(variant)["hole"].mean(0)
    z = (observed - expected) / np.sqrt(expected * (1 - expected) / SAMPLES)
    assert np.abs(z).max() < 4.5, f"pixel {np.unravel_index(np.abs(z).argmax(), z.shape)} z={np.abs(z).max():.1f}"
    if variant != "cpu":
        reference = measured("cpu")["hole"].mean(0)
        pooled = (observed + reference) / 2
        z = (observed - reference) / np.sqrt(np.maximum(pooled * (1 - pooled), 1e-9) * 2 / SAMPLES)
        assert np.abs(z).max() < 4.5


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_ssr_parameters_follow_the_spec(variant):
    m = measured(variant)
    ssr = m["ssr"]
    angle, scale = m["angle"][ssr], m["scale"][ssr]
    # (read back from uint8 pixels, so each value carries a small measurement error)
    assert np.abs(angle).max() <= SPEC.rotate_max_deg + 0.2
    assert np.abs(scale - 1).max() <= SPEC.scale_max_delta + 3e-3
    uniform = np.random.default_rng(0)
    for values, half_width in ((angle, SPEC.rotate_max_deg), (scale - 1, SPEC.scale_max_delta)):
        reference = uniform.uniform(-half_width, half_width, 100_000)
        assert ks_statistic(values, reference) < ks_critical(len(values), len(reference))
    # albumentations 2.x truncates U(-0.05, 0.05) * 32 px to whole pixels: -1, 0, 1 with 3/16, 5/8, 3/16
    for key in ("shift_x", "shift_y"):
        counts = np.array([(m[key][ssr] == v).sum() for v in (-1, 0, 1)])
        assert counts.sum() == ssr.sum()
        expected = ssr.sum() * np.array([3 / 16, 5 / 8, 3 / 16])
        assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_999[2], f"{key}: {counts.tolist()}"


@pytest.mark.parametrize("variant", DALI_VARIANTS)
def test_dali_parameter_distributions_match_albumentations(variant):
    dali, albu = measured(variant), measured("cpu")
    for key in ("angle", "scale"):
        a, b = dali[key][dali["ssr"]], albu[key][albu["ssr"]]
        assert ks_statistic(a, b) < ks_critical(len(a), len(b)), key
    for key in ("hole_h", "hole_w"):
        a, b = dali[key][dali["cutout"]], albu[key][albu["cutout"]]
        assert ks_statistic(a.astype(float), b.astype(float)) < ks_critical(len(a), len(b)), key
