"""The benchmark peers (bench/peers.py) on the CPU: they iterate like the project's loaders, and they augment by the
same AugSpec. The torch peer is held to albumentations as DALI is (tests/test_parity.py's explicit rows, conventions
and every unit's distributions); the kornia peer draws its own parameters, so it is held to the spec's rates, and to
every expectation of the units whose law it takes from the spec."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import decode_index, indexed_images, smooth_images
from test_parity import (
    CONVENTIONS,
    EXPECTATION_IDS,
    EXPECTATIONS,
    SAMPLES,
    SIZE,
    SPECS,
    albu_fixed,
    follows,
    grid,
    probe_spec,
    to_pixels,
)

from bench.peers import PEERS, PeerLoader, grid_matrices, torch_augment
from pipeline.errors import ConfigError
from pipeline.params import AugParams, grid_shifts, hole_boxes, sampling_matrices
from pipeline.spec import AugSpec


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
def test_every_probability_zero_gives_the_plain_normalized_image(kind):
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


_measured: dict[tuple[str, str], dict] = {}


def measured(unit, kind: str) -> dict:  # unit: a pipeline.augs unit
    """Each unit alone (its probe's spec), SAMPLES draws of its probe image through peer `kind`, read back."""
    if (unit.name, kind) not in _measured:
        spec = probe_spec(unit)
        images = np.broadcast_to(unit.probe.image(spec, SIZE, SIZE), (SAMPLES, SIZE, SIZE, 3)).copy()
        torch.manual_seed(11)  # kornia draws from torch's global generator
        loader = PeerLoader(kind, images, np.zeros(SAMPLES), 1000, spec=spec, seed=11)
        _measured[unit.name, kind] = unit.probe.read(spec, np.concatenate([to_pixels(x, spec) for x, _ in loader]))
    return _measured[unit.name, kind]


# The kornia peer draws every parameter by the spec's law but shift-scale-rotate's shift, which kornia draws
# continuous (U(-f, f) * size, not truncated to whole pixels): those expectations alone are left out (measured:
# kornia's shifts read back as -2 .. 2 px where the spec gives -1 .. 1).
KORNIA_CONTINUOUS_SHIFT = {"shift_x", "shift_y", "whole_pixel_shifts"}
KORNIA = [(u, e) for u, e in EXPECTATIONS if not (u.name == "ssr" and e.key in KORNIA_CONTINUOUS_SHIFT)]


@pytest.mark.slow
@pytest.mark.parametrize("unit, expectation", EXPECTATIONS, ids=EXPECTATION_IDS)
def test_torch_peer_draws_follow_the_spec(unit, expectation):
    problem = follows(expectation, measured(unit, "torch"))
    assert problem is None, f"{unit.name} {expectation}: {problem}"


@pytest.mark.slow
@pytest.mark.parametrize("unit, expectation", KORNIA, ids=[f"{u.name}-{type(e).__name__}-{e.key}" for u, e in KORNIA])
def test_kornia_peer_draws_follow_the_spec(unit, expectation):
    problem = follows(expectation, measured(unit, "kornia"))
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
