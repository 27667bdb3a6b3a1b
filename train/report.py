"""Pictures of a run: `python -m train.report RUN_DIR [RUN_DIR ...]`.

curves.png        train and evaluation loss and accuracy per epoch
confusion.png     the confusion matrix of the final model on the evaluation set, with class names
misclassified.png the evaluation images the model got most wrong, with true and predicted labels
compare.png       with several runs: their curves overlaid (in the current folder, or --out; never a run's folder)

A training run writes the first three into its --out at the end (from metrics.json and predictions.npz). Every file
is written whole or not at all (train/checkpoint.py `atomic_write`), never through a link planted under its name.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from pipeline.cli import OneLineParser, given_path, one_line_errors, output_dir
from pipeline.data import CLASSES
from pipeline.errors import DataError, OutputError
from pipeline.files import os_reason
from train.checkpoint import atomic_write
from train.outdir import PLOT_FILES

CURVES_SIZE = (12, 4.5)  # inches at DPI: 1200 x 450 px
CONFUSION_SIZE = (7, 6)  # 700 x 600 px
GRID_SIZE = (10, 11)  # 1000 x 1100 px
DPI = 100
WORST = 48  # images in misclassified.png
COMPARE_FILE = "compare.png"  # the curves of several runs: a name no run writes, so no run's file is replaced


def _save(fig, path: Path) -> None:  # fig: a matplotlib Figure
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    plt.close(fig)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_epochs(run: Path) -> list[dict]:
    """metrics.json's per-epoch rows, each checked to hold what the curves plot (numbers, not strings a plot would
    draw as categories): DataError otherwise, never a traceback from inside matplotlib."""
    path = run / "metrics.json"
    try:
        epochs = json.loads(path.read_text())["epochs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: cannot be read as a run's metrics ({type(err).__name__}: {err})") from None
    if not isinstance(epochs, list):
        raise DataError(f"{path}: 'epochs' is not a list of per-epoch rows (a {type(epochs).__name__})")
    if not epochs:
        raise DataError(f"{path}: no epoch recorded yet")
    for i, row in enumerate(epochs):
        if not isinstance(row, dict):
            raise DataError(f"{path}: epochs[{i}] is not a per-epoch row (a {type(row).__name__})")
        ev = "val" if "val_acc" in row else "test"
        needed = ["epoch", "train_loss", "train_acc"] + ([f"{ev}_loss", f"{ev}_acc"] if f"{ev}_acc" in row else [])
        for key in needed:
            if not _is_number(row.get(key)):
                raise DataError(f"{path}: epochs[{i}] has no number {key!r} (found {row.get(key)!r})")
    return epochs


def plot_curves(runs: list[Path], path: Path) -> None:
    """Loss and accuracy per epoch of each run in `runs`. Within a run, train and evaluation differ in colour (a pale
    and a dark shade of the run's hue) and in marker, so that even one epoch (one point per series) tells them apart;
    the epoch axis has whole-number ticks. Raises DataError (metrics.json) or OutputError (`path`)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=CURVES_SIZE)
    shades = plt.get_cmap("tab20")(np.arange(20))  # pairs of (dark, pale) shades of one hue
    last = 1
    for i, run in enumerate(runs):
        epochs = _read_epochs(run)
        ev = "val" if any("val_acc" in e for e in epochs) else "test"
        evaluated = [e for e in epochs if f"{ev}_acc" in e]  # with --eval-every, not every epoch is evaluated
        name = f"{run.name} " if len(runs) > 1 else ""
        dark, pale = shades[2 * i % 20], shades[(2 * i + 1) % 20]
        # a ring around a square: where train and test coincide (a one-epoch run at chance), both stay visible
        train = dict(color=pale, marker="o", markersize=9, markerfacecolor="none", mew=2, ls="--", label=f"{name}train")
        test = dict(color=dark, marker="s", markersize=5, ls="-", label=f"{name}{ev}")
        for ax, key, scale in ((ax_loss, "loss", 1), (ax_acc, "acc", 100)):
            ax.plot([e["epoch"] for e in epochs], [scale * e[f"train_{key}"] for e in epochs], **train)
            ax.plot([e["epoch"] for e in evaluated], [scale * e[f"{ev}_{key}"] for e in evaluated], **test)
        last = max(last, epochs[-1]["epoch"])
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlim(0.5, last + 0.5)
        ax.set_ylim(bottom=0)  # from zero: a single point is not blown up to fill the axis
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    matrix = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    fig, ax = plt.subplots(figsize=CONFUSION_SIZE)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    title = f"confusion matrix ({(labels == predicted).mean():.2%} correct of {len(labels):,})"
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    _save(fig, path)


def plot_misclassified(
    images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, path: Path
) -> None:
    fig, axes = plt.subplots(WORST // 8, 8, figsize=GRID_SIZE)  # one grid for any count: cells of one size
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, true, pred, conf in zip(axes.flat, images, labels, predicted, confidence, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"{CLASSES[true]}\n→ {CLASSES[pred]} {conf:.0%}", fontsize=8, color="firebrick")
    fig.suptitle("most confidently wrong (true → predicted, confidence)")
    fig.tight_layout()
    _save(fig, path)


def write_run_plots(run: Path, out: Path | None = None) -> list[Path]:
    """curves.png, and confusion.png and misclassified.png when `run` has predictions.npz, into `out` (default: the
    run's folder); returns the paths written. Raises DataError (a file that cannot be read) or OutputError (one that
    cannot be written)."""
    run = Path(run)
    curves, confusion, misclassified = (Path(out or run) / name for name in PLOT_FILES)
    plot_curves([run], curves)
    predictions = run / "predictions.npz"
    if not predictions.exists():
        return [curves]
    p = _read_predictions(predictions)
    plot_confusion(p["labels"], p["predicted"], confusion)
    plot_misclassified(p["worst_images"], p["worst_labels"], p["worst_predicted"], p["worst_confidence"], misclassified)
    return [curves, confusion, misclassified]


PREDICTION_KEYS = ("labels", "predicted", "worst_images", "worst_labels", "worst_predicted", "worst_confidence")


# What predictions.npz may expand to (a 60,000-image split and WORST images take under 1 MB): a file whose arrays claim
# more was not written by this tool, and is refused before it is expanded (a few MB of zeros compress to GBs).
PREDICTIONS_MAX_BYTES = 64 * 2**20


def _read_predictions(path: Path) -> dict[str, np.ndarray]:
    """predictions.npz's arrays (PREDICTION_KEYS), checked to be what `save_predictions` writes: DataError
    otherwise (corrupt, too large, or arrays whose shapes, types or class indices the pictures cannot draw)."""
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
        if expanded > PREDICTIONS_MAX_BYTES:
            raise DataError(
                f"{path}: its arrays expand to {expanded:,} bytes, more than the {PREDICTIONS_MAX_BYTES:,} this tool "
                "ever writes; it is not a run's predictions: delete it to plot the curves alone"
            )
        with np.load(path) as found:
            p = {key: found[key] for key in PREDICTION_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{path}: truncated or corrupt ({type(err).__name__}: {err}); delete it to plot the curves alone"
        ) from None
    problem = _predictions_problem(p)
    if problem:
        raise DataError(f"{path}: not what a run writes ({problem}); delete it to plot the curves alone")
    return p


def _predictions_problem(p: dict[str, np.ndarray]) -> str | None:
    """What in predictions.npz's arrays the pictures could not draw truthfully (None: nothing)."""
    classes = len(CLASSES)
    for key in ("labels", "predicted", "worst_labels", "worst_predicted"):
        a = p[key]
        if a.ndim != 1 or a.dtype.kind not in "iu":
            return f"{key} is a {a.dtype} array of shape {list(a.shape)}, not a 1-D array of class indices"
        if a.size and (a.min() < 0 or a.max() >= classes):
            return f"{key} holds class indices outside 0..{classes - 1}"
    if len(p["labels"]) != len(p["predicted"]):
        return f"labels ({len(p['labels'])}) and predicted ({len(p['predicted'])}) differ in length"
    worst = len(p["worst_labels"])
    images, confidence = p["worst_images"], p["worst_confidence"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        return f"worst_images is a {images.dtype} array of shape {list(images.shape)}, not uint8 [N, H, W, 3]"
    if confidence.ndim != 1 or confidence.dtype.kind != "f":
        return f"worst_confidence is a {confidence.dtype} array of shape {list(confidence.shape)}, not 1-D floats"
    lengths = {len(images), len(p["worst_predicted"]), len(confidence)}
    if lengths != {worst} or worst > WORST:
        return f"the worst_* arrays hold {sorted(lengths | {worst})} entries, not one length of at most {WORST}"
    return None


def save_predictions(path: Path, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> None:
    """What the pictures need from the final model: every prediction, and the worst mistakes' images (uint8 NHWC),
    as an .npz with PREDICTION_KEYS, written atomically."""
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:WORST]
    worst_of = {"images": images, "labels": labels, "predicted": predicted, "confidence": probabilities.max(1)}
    arrays = {"labels": labels, "predicted": predicted, **{f"worst_{k}": v[worst] for k, v in worst_of.items()}}
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


@one_line_errors("the number of runs")
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="python -m train.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", type=given_path, help="run folders (each with metrics.json)")
    p.add_argument("--out", type=output_dir, help="folder to write into (default: one run's own; several runs': .)")
    args = p.parse_args(argv)
    runs, compare = args.runs, len(args.runs) > 1
    out = args.out or (Path(".") if compare else runs[0])
    if (out / "metrics.json").exists() and (compare or out.resolve() != runs[0].resolve()):
        p.error(f"--out {out} is a training run's folder, whose files are that run's own; give --out another folder")
    for run in runs:
        if not (run / "metrics.json").is_file():
            raise DataError(f"{run}/metrics.json not found: is {run} a training run's --out?")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot create the folder ({os_reason(err)})") from None
    written = [out / COMPARE_FILE] if compare else write_run_plots(runs[0], out)
    if compare:
        plot_curves(runs, written[0])
    print("\n".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
