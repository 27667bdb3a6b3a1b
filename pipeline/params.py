"""Per-image augmentation parameters for the DALI loader: drawn densely, a whole epoch per call, on the device.

Why here and not inside the DALI graph: DALI's random operators feed *argument* inputs from the CPU, one sample at a
time, which caps a 32x32 pipeline near 46k img/s (see README, "The DALI pipeline"). One torch
pass per epoch draws every parameter for every image on the GPU; DALI then applies them. The distributions are the
ones albumentations 2.x draws from for the same AugSpec (tests/test_parity.py checks them against each other):

  flip, ssr, cutout   Bernoulli(flip_p), Bernoulli(ssr_p), Bernoulli(cutout_p)
  shift_x, shift_y    trunc(U(-f, f) * size) whole pixels (albumentations' Affine does int() of the fraction * size)
  scale               U(1 - d, 1 + d), isotropic
  angle               U(-r, r) degrees
  hole_h, hole_w      integers uniform in [cutout_min_px, cutout_max_px] (capped at the image size)
  hole_y, hole_x      integers uniform in [0, size - hole], so the hole lies fully inside the image

The same numbers can also be given explicitly (`AugParams.fixed`): that is the seam the parity tests use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from pipeline.spec import AugSpec


@dataclass
class AugParams:
    """One row per image. Booleans say whether an augmentation applies; the rest are its values."""

    flip: torch.Tensor  # bool
    ssr: torch.Tensor  # bool
    shift_x: torch.Tensor  # float, whole pixels
    shift_y: torch.Tensor
    scale: torch.Tensor
    angle: torch.Tensor  # degrees
    cutout: torch.Tensor  # bool
    hole_y: torch.Tensor  # float, whole pixels: top-left corner and size
    hole_x: torch.Tensor
    hole_h: torch.Tensor
    hole_w: torch.Tensor

    def __len__(self) -> int:
        return len(self.flip)

    def row(self, i: int) -> dict[str, float | bool]:
        return {f.name: getattr(self, f.name)[i].item() for f in fields(self)}

    @classmethod
    def fixed(cls, rows: list[dict[str, float | bool]], device: str | torch.device = "cpu") -> AugParams:
        """Explicit parameters (missing keys mean 'not applied'), for tests and for looking at one augmentation."""
        defaults = {
            "flip": False,
            "ssr": False,
            "shift_x": 0.0,
            "shift_y": 0.0,
            "scale": 1.0,
            "angle": 0.0,
            "cutout": False,
            "hole_y": 0.0,
            "hole_x": 0.0,
            "hole_h": 0.0,
            "hole_w": 0.0,
        }
        unknown = {k for r in rows for k in r} - defaults.keys()
        if unknown:
            raise ValueError(f"unknown augmentation parameters {sorted(unknown)}")
        columns = {}
        for name, default in defaults.items():
            values = [r.get(name, default) for r in rows]
            dtype = torch.bool if isinstance(default, bool) else torch.float32
            columns[name] = torch.tensor(values, dtype=dtype, device=device)
        return cls(**columns)


def draw_params(
    spec: AugSpec, n: int, height: int, width: int, generator: torch.Generator, device: torch.device | str
) -> AugParams:
    """Draw the parameters of `n` images in one pass (11 uniforms per image)."""
    u = torch.rand((11, n), generator=generator, device=device)
    ssr = u[1] < spec.ssr_p
    hole_h_max = min(spec.cutout_max_px, height)
    hole_w_max = min(spec.cutout_max_px, width)
    hole_h = spec.cutout_min_px + torch.floor(u[7] * (hole_h_max - spec.cutout_min_px + 1))
    hole_w = spec.cutout_min_px + torch.floor(u[8] * (hole_w_max - spec.cutout_min_px + 1))
    # Where SSR is off the warp is the identity, so an image without SSR is never resampled.
    return AugParams(
        flip=u[0] < spec.flip_p,
        ssr=ssr,
        shift_x=torch.where(ssr, torch.trunc((2 * u[2] - 1) * spec.shift_max_frac * width), 0.0),
        shift_y=torch.where(ssr, torch.trunc((2 * u[3] - 1) * spec.shift_max_frac * height), 0.0),
        scale=torch.where(ssr, 1 + (2 * u[4] - 1) * spec.scale_max_delta, 1.0),
        angle=torch.where(ssr, (2 * u[5] - 1) * spec.rotate_max_deg, 0.0),
        cutout=u[6] < spec.cutout_p,
        hole_h=hole_h,
        hole_w=hole_w,
        hole_y=torch.floor(u[9] * (height - hole_h + 1)),
        hole_x=torch.floor(u[10] * (width - hole_w + 1)),
    )


def sampling_matrices(params: AugParams, height: int, width: int) -> torch.Tensor:
    """The (N, 2, 3) destination->source matrices of the whole geometric part (SSR, then flip), pixel centres.

    For each output pixel (x, y) the source position is A @ (x, y, 1). The flip is folded in: out(x, y) =
    warped(w - 1 - x, y), so A = inverse(SSR) @ F with F(x, y) = (w - 1 - x, y). Double precision here, float32 out.
    """
    cx, cy = width / 2 - 0.5, height / 2 - 0.5
    rad = torch.deg2rad(params.angle.double())
    inv_s = 1.0 / params.scale.double()
    # inverse of dst = c + t + s R (src - c):  src = c + (1/s) R^T (dst - c - t),  R^T = [[cos, -sin], [sin, cos]]
    a, b = torch.cos(rad) * inv_s, -torch.sin(rad) * inv_s
    d, e = torch.sin(rad) * inv_s, torch.cos(rad) * inv_s
    ox, oy = cx + params.shift_x.double(), cy + params.shift_y.double()
    c = cx - (a * ox + b * oy)
    f = cy - (d * ox + e * oy)
    # fold the flip in: x -> (w - 1) - x
    flip = params.flip
    c = torch.where(flip, c + a * (width - 1), c)
    f = torch.where(flip, f + d * (width - 1), f)
    a = torch.where(flip, -a, a)
    d = torch.where(flip, -d, d)
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], -2).float()


def hole_boxes(params: AugParams) -> torch.Tensor:
    """(N, 4) float [y0, x0, y1, x1) of the cutout hole in output pixels; an empty box where cutout is off."""
    y0 = torch.where(params.cutout, params.hole_y, 0.0)
    x0 = torch.where(params.cutout, params.hole_x, 0.0)
    y1 = torch.where(params.cutout, params.hole_y + params.hole_h, 0.0)
    x1 = torch.where(params.cutout, params.hole_x + params.hole_w, 0.0)
    return torch.stack([y0, x0, y1, x1], -1).float()


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
