"""Per-image augmentation parameters for the DALI loader: drawn densely, a whole epoch per call, on the device.

Not inside the DALI graph: DALI's random operators feed *argument* inputs from the CPU, one sample at a time, which
caps a 32x32 pipeline near 46k img/s. One torch.rand per epoch draws every uniform for every image on the GPU; each
unit turns its rows into its columns with the distributions albumentations 2.x draws from (tests/test_parity.py).
`AugParams.fixed` gives them explicitly instead: the parity tests' seam.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from pipeline.augs import Aug, Box, Shift, Warp
from pipeline.errors import ConfigError
from pipeline.spec import AugSpec

EVERY_UNIT = AugSpec().units  # what a parameter column belongs to, and its effect (neither depends on settings)


@dataclass
class AugParams:
    """Parameters of n images: one (n,) tensor per parameter name (bool for "applied" flags, float32 otherwise).

    Holds the columns of some units, all of each; a unit that is absent is not applied to any image."""

    columns: dict[str, torch.Tensor]
    n: int

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.columns[name]

    @property
    def units(self) -> tuple[Aug, ...]:
        """The units these parameters are for, in composition order."""
        return tuple(unit for unit in EVERY_UNIT if next(iter(unit.columns)) in self.columns)

    @classmethod
    def fixed(cls, rows: list[Mapping[str, float | bool]], device: str | torch.device = "cpu") -> AugParams:
        """Explicit parameters, one row per image, keyed by parameter name (see each unit's `columns`). A unit any
        row names gets all its columns; a key a row leaves out takes its 'not applied' value. For tests and for
        looking at one augmentation. Raises ConfigError for an unknown name."""
        named = {AugSpec().unit_of_column(name).name for row in rows for name in row}
        columns: dict[str, torch.Tensor] = {}
        for unit in EVERY_UNIT:
            if unit.name in named:
                for name, default in unit.columns.items():
                    dtype = torch.bool if isinstance(default, bool) else torch.float32
                    columns[name] = torch.tensor([row.get(name, default) for row in rows], dtype=dtype, device=device)
        return cls(columns, len(rows))

    def for_units(self, units: Iterable[Aug], device: str | torch.device) -> AugParams:
        """The same parameters with every unit of `units` present ('not applied' where it was absent).

        Raises ConfigError if these parameters hold a unit outside `units` (a loader whose spec does not include
        an augmentation cannot apply it)."""
        names = {unit.name for unit in units}
        extra = [unit.name for unit in self.units if unit.name not in names]
        if extra:
            raise ConfigError(f"parameters for {', '.join(extra)}, which this spec does not include")
        columns = dict(self.columns)
        for unit in units:
            for name, default in unit.columns.items():
                if name not in columns:
                    dtype = torch.bool if isinstance(default, bool) else torch.float32
                    columns[name] = torch.full((self.n,), default, dtype=dtype, device=device)
        return AugParams(columns, self.n)


def draw_params(
    spec: AugSpec, n: int, height: int, width: int, generator: torch.Generator, device: torch.device | str
) -> AugParams:
    """Draw the parameters of `n` images of (height, width) px for every unit `spec` includes, in one torch.rand of
    (sum of the units' uniforms, n) float32 on `device` (11 rows for the seed's spec)."""
    units = spec.included
    u = torch.rand((sum(unit.uniforms for unit in units), n), generator=generator, device=device)
    columns: dict[str, torch.Tensor] = {}
    first = 0
    for unit in units:
        columns.update(unit.draw(u[first : first + unit.uniforms], height, width))
        first += unit.uniforms
    return AugParams(columns, n)


def sampling_matrices(params: AugParams, height: int, width: int) -> torch.Tensor:
    """The (N, 2, 3) float32 destination->source matrices of the composed warp, OpenCV's pixel-centre convention.

    For each output pixel (x, y) the source position is A @ (x, y, 1), A the product of the `Warp` units' matrices
    in application order (seed: A = inverse(SSR) @ F, F the flip x -> w - 1 - x), composed in float64. Sampling at
    the clamped source position is the replicate border. A `Shift` unit (see `grid_shifts`) applies after it."""
    a = torch.eye(3, dtype=torch.float64, device=_device(params)).expand(params.n, 3, 3)
    for unit in params.units:
        if isinstance(unit, Warp):
            m = unit.matrix(params.columns, height, width)
            a = a @ torch.cat([m, a.new_tensor([0.0, 0.0, 1.0]).expand(params.n, 1, 3)], 1)
    return a[:, :2].float()


def grid_shifts(params: AugParams) -> torch.Tensor:
    """(N, 2k) float32 (x, y) whole-pixel offsets of the k `Shift` units present (k <= 1; (N, 0) when none)."""
    parts = [unit.offsets(params.columns) for unit in params.units if isinstance(unit, Shift)]
    return torch.cat(parts, 1) if parts else torch.zeros((params.n, 0), device=_device(params))


def hole_boxes(params: AugParams) -> torch.Tensor:
    """(N, 4k) float32: for each of the k `Box` units present (the seed's: cutout), [y0, x0, y1, x1) in output
    pixels, an empty box where it is not applied."""
    parts = [unit.box(params.columns) for unit in params.units if isinstance(unit, Box)]
    return torch.cat(parts, 1) if parts else torch.zeros((params.n, 0), device=_device(params))


def _device(params: AugParams) -> torch.device:
    return next(iter(params.columns.values())).device if params.columns else torch.device("cpu")


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device | str) -> torch.Generator:
    """One generator per (seed, epoch, rank): an epoch's augmentations do not depend on what ran before it."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix(seed, epoch, rank))
    return g


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from a few small integers (so seed+1 and epoch+1 do not collide)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
