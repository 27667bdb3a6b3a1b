"""DALI against the albumentations reference, unit by unit (pipeline/augs/): identity, explicit parameters, each
unit's conventions, and the distributions of random draws read back from each unit's probe image.

Every DALI graph is held to albumentations: the per-image CPU graph, the batched GPU graph run on the CPU with
OpenCV standing in for its GPU-only remap, and (when a GPU is present) the batched graph on the GPU itself. Nothing
here names an augmentation: the tests loop over the units and what each one declares.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import LOADER_VARIANTS, build_loader, smooth_images

from pipeline.albu_loader import apply_fixed
from pipeline.augs import UNITS, Aug, units_of
from pipeline.augs.probe import Coverage, Discrete, Expectation, Holds, Rate, Readings, Uniform
from pipeline.params import AugParams
from pipeline.spec import AugSpec

DALI_VARIANTS = [v for v in LOADER_VARIANTS if v.startswith("dali")]
SIZE = 32
# The seed's spec, and one that includes every unit (pad-and-crop is off by default) at its probe settings.
SPECS = {
    "seed": AugSpec(),
    "every-unit": AugSpec(**{name: value for unit in UNITS for name, value in unit.probe.on.items()}),
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
    units = units_of(spec)
    rows: list[dict] = []
    for unit in units:
        for i, row in enumerate(unit.probe.rows):
            combined = {}
            for other in units:
                combined.update(row if other is unit else other.probe.rows[i % len(other.probe.rows)])
            rows += [dict(row), combined]
    return [*rows, {}]


def dali_fixed(variant: str, spec: AugSpec, images: np.ndarray, rows: list[dict]) -> np.ndarray:
    loader = build_loader(variant, images[:1], np.zeros(1, np.int64), len(rows), spec=spec)
    return to_pixels(loader.run_fixed(images, AugParams.fixed(rows, device=loader.device)), spec)


def albu_fixed(spec: AugSpec, images: np.ndarray, rows: list[dict]) -> np.ndarray:
    out = np.stack([apply_fixed(spec, image, row) for image, row in zip(images, rows, strict=True)])
    return to_pixels(torch.from_numpy(out).permute(0, 3, 1, 2), spec)


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


CONVENTIONS = [(unit, c) for unit in UNITS for c in unit.probe.conventions]


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


def probe_spec(unit: Aug) -> AugSpec:
    """The unit alone: its fields at their defaults and its probe's settings, every other unit off."""
    return AugSpec.none(**{**{f.name: f.default for f in unit.fields}, **unit.probe.on})


_measured: dict[tuple[str, str], Readings] = {}


def measured(unit: Aug, variant: str) -> Readings:
    key = (unit.name, variant)
    if key not in _measured:
        spec = probe_spec(unit)
        images = np.broadcast_to(unit.probe.image(spec, SIZE, SIZE), (SAMPLES, SIZE, SIZE, 3)).copy()
        workers = {"workers": 2} if variant == "cpu" else {}
        loader = build_loader(variant, images, np.zeros(SAMPLES, np.int64), 1000, seed=11, spec=spec, **workers)
        _measured[key] = unit.probe.read(spec, np.concatenate([to_pixels(x, spec) for x, _ in loader]))
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


EXPECTATIONS = [(unit, e) for unit in UNITS for e in unit.probe.expect(probe_spec(unit), SIZE, SIZE)]
EXPECTATION_IDS = [f"{unit.name}-{type(e).__name__}-{e.key}" for unit, e in EXPECTATIONS]


def test_every_unit_has_a_probe_that_tests_its_draws():
    for unit in UNITS:
        kinds = {type(e) for u, e in EXPECTATIONS if u is unit}
        assert kinds & {Rate, Uniform, Discrete}, f"{unit.name}'s probe tests none of its draws"
        assert unit.probe.rows, f"{unit.name} has no explicit-parameter rows"


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
