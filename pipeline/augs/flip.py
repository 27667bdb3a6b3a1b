"""Horizontal flip: x -> (width - 1) - x with probability flip_p (the seed's HorizontalFlip(p=0.5))."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.augs.probe import Holds, Probe, Rate, fit_sampling, ramp_image
from pipeline.augs.unit import Aug, Columns, Field, Warp, check_probability, no_image_limits

if TYPE_CHECKING:
    from pipeline.spec import AugSpec


def check(spec: AugSpec) -> None:
    check_probability(spec, "flip_p")


def draw(spec: AugSpec, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    return {"flip": u[0] < spec.flip_p}


def matrix(columns: Columns, height: int, width: int) -> torch.Tensor:
    """(N, 2, 3): x -> (width - 1) - x where flipped (it maps the pixel grid onto itself: no border of its own)."""
    flip = columns["flip"]
    m = torch.zeros((len(flip), 2, 3), dtype=torch.float64, device=flip.device)
    m[:, 0, 0] = torch.where(flip, -1.0, 1.0)
    m[:, 0, 2] = torch.where(flip, width - 1.0, 0.0)
    m[:, 1, 1] = 1.0
    return m


def albu(spec: AugSpec, height: int, width: int) -> Any:
    import albumentations as A  # (imported on use: slow to import, and the DALI path never needs it)

    return A.HorizontalFlip(p=spec.flip_p)


def albu_apply(transform: Any, image: np.ndarray, row: Mapping[str, Any]) -> np.ndarray:
    return transform.apply(image) if row["flip"] else image


def read(spec: AugSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    a, b, c, d, e, f = fit_sampling(pixels)
    width = pixels.shape[2]
    flip = a < 0
    return {
        "flip": flip,
        # nothing else moved: exactly the identity or exactly the mirror image
        "mirror_or_identity": (np.abs(np.abs(a) - 1) < 1e-3)
        & (np.abs(b) + np.abs(d) + np.abs(e - 1) + np.abs(f) < 1e-3)
        & (np.abs(c - np.where(flip, width - 1, 0)) < 1e-2),
    }


UNIT = Aug(
    name="flip",
    fields=(Field("flip_p", 0.5, "probability of a horizontal flip"),),
    check=check,
    check_image=no_image_limits,
    off={"flip_p": 0.0},
    shown=lambda spec: {"flip_p": 1.0},
    columns={"flip": False},
    uniforms=1,
    draw=draw,
    effect=Warp(matrix),
    albu=albu,
    albu_apply=albu_apply,
    probe=Probe(
        image=ramp_image,
        read=read,
        expect=lambda spec, height, width: [Rate("flip", spec.flip_p), Holds("mirror_or_identity")],
        rows=({"flip": True}, {"flip": False}),
    ),
)
