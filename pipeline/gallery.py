"""`python -m pipeline.gallery`: the same training images raw, through albumentations and through DALI.

Writes augmentations.png: per image, draws of both loaders from the spec `--aug` gives, then each augmentation unit
alone and always applied, in both loaders. Both are built from one AugSpec, so each pair should look alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from pipeline import AugSpec, Order, check_seed, make_loader
from pipeline.cli import OneLineParser, given_path, one_line_errors, output_file, positive_int, writable_folder
from pipeline.data import CLASSES, download, load_cifar10, resolve_root
from pipeline.errors import ConfigError, OutputError
from pipeline.files import os_reason, write_whole

DPI = 100  # every image cell is one inch: 100 x 100 px
TITLE_ROWS = 0.4  # the column titles' band above the grid, in cells


def grid_columns(draws: int) -> int:
    """Cells per row of the grid `main` draws: the raw image, `draws` of each loader, each unit alone in both."""
    return 1 + 2 * draws + 2 * len(AugSpec().units)


def grid_fits(rows: int, draws: int) -> None:
    """ConfigError unless the grid fits the 2**16 px per side that matplotlib's Agg draws: before the draws."""
    if max(rows + TITLE_ROWS, grid_columns(draws)) * DPI >= 2**16:
        raise ConfigError(
            f"--images {rows} and --draws {draws}: a grid of {rows} x {grid_columns(draws)} cells of {DPI} px does not "
            "fit matplotlib's limit of 65,536 px per side; lower them"
        )


def draws(kind: str, images: np.ndarray, spec: AugSpec, n_draws: int, seed: int, device: str) -> np.ndarray:
    """[n_draws, N, H, W, 3] uint8: each image augmented n_draws times by loader `kind`, back in pixel units."""
    repeated = np.concatenate([images] * n_draws)
    loader = make_loader(
        kind,
        repeated,
        np.zeros(len(repeated), np.int64),
        len(repeated),
        spec=spec,
        order=Order(seed=seed, shuffle=False),
        device=device if kind == "dali" else "cpu",
        workers=0 if kind == "cpu" else 2,
    )
    ((x, _),) = list(loader)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    pixels = ((x.cpu() * std + mean) * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return pixels.reshape(n_draws, len(images), *images.shape[1:])


def render(images: np.ndarray, labels: np.ndarray, columns: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One row per image: the raw image, then each (title, [N, H, W, 3] uint8) column."""
    n, cols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n, cols, figsize=(cols, n + TITLE_ROWS), squeeze=False)
    for row in range(n):
        cells = [("raw", images[row])] + [(title, column[row]) for title, column in columns]
        for col, (title, cell) in enumerate(cells):
            ax = axes[row, col]
            ax.imshow(cell, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=7)
        axes[row, 0].set_ylabel(CLASSES[labels[row]], fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.3 / (n + TITLE_ROWS), bottom=0.01, wspace=0.05, hspace=0.05)
    try:
        write_whole(path, lambda f: fig.savefig(f, format="png", dpi=DPI))  # whole or not at all
    except OSError as err:  # the disk filled up or went read-only since the check
        raise OutputError(f"could not write {path} ({os_reason(err)}); free space or choose another --out") from None
    finally:
        plt.close(fig)


@one_line_errors("--images or --draws")
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="python -m pipeline.gallery", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", type=given_path, default=None, help="CIFAR-10 folder (default $CIFAR10_ROOT, else ~/data/cifar10)"
    )
    p.add_argument("--download", action="store_true", help="fetch and verify the official archive if missing")
    p.add_argument("--allow-small-data", action="store_true", help="accept a small copy (tests)")
    p.add_argument("--out", type=output_file, default=Path("augmentations.png"), help="PNG to write")
    p.add_argument("--images", type=positive_int, default=8, help="how many training images (rows)")
    p.add_argument("--draws", type=positive_int, default=3, help="augmented draws per loader")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws, an integer in [0, 2**63 - 1]")
    p.add_argument("--aug", action="append", default=[], metavar="KEY=VALUE", help="override an AugSpec field")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where DALI runs")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device cpu (DALI's CPU operators)")
    try:
        spec = AugSpec.from_overrides(args.aug)
        check_seed(args.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    grid_fits(args.images, args.draws)
    root = resolve_root(args.data_dir)
    train_x, train_y, _, _ = load_cifar10(download(root) if args.download else root, allow_small=args.allow_small_data)
    writable_folder(args.out.parent, "--out")  # before the draws, not after them
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    images, labels = train_x[: args.images], train_y[: args.images]
    dali_label = "DALI GPU" if device == "cuda" else "DALI (CPU mode)"
    columns = [("albumentations", d) for d in draws("cpu", images, spec, args.draws, args.seed, device)]
    columns += [(dali_label, d) for d in draws("dali", images, spec, args.draws, args.seed, device)]
    for unit in spec.units:
        only = spec.alone(unit.name)
        columns.append((f"{unit.name}: albu", draws("cpu", images, only, 1, args.seed, device)[0]))
        columns.append((f"{unit.name}: DALI", draws("dali", images, only, 1, args.seed, device)[0]))
    assert 1 + len(columns) == grid_columns(args.draws)  # what grid_fits checked is what is drawn
    render(images, labels, columns, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
