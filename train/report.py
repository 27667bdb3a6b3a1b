"""Pictures of a run: `python -m train.report RUN_DIR [RUN_DIR ...]`.

curves.png        train and evaluation loss and accuracy per epoch (several runs overlaid)
confusion.png     the confusion matrix of the final model on the evaluation set, with class names
misclassified.png the evaluation images the model got most wrong, with true and predicted labels

A training run writes all three into its --out at the end (from metrics.json and predictions.npz).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.data import CLASSES  # noqa: E402

CURVES_SIZE = (12, 4.5)  # inches at DPI: 1200 x 450 px
CONFUSION_SIZE = (7, 6)  # 700 x 600 px
GRID_SIZE = (10, 11)  # 1000 x 1100 px
DPI = 100
WORST = 48  # images in misclassified.png


def _eval_key(epochs: list[dict]) -> str:
    return "val" if any("val_acc" in e for e in epochs) else "test"


def plot_curves(runs: list[Path], path: Path) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=CURVES_SIZE)
    for run in runs:
        epochs = json.loads((run / "metrics.json").read_text())["epochs"]
        ev = _eval_key(epochs)
        x = [e["epoch"] for e in epochs]
        name = run.name if len(runs) > 1 else ""
        line = ax_loss.plot(x, [e["train_loss"] for e in epochs], "--", label=f"{name} train".strip())[0]
        evaluated = [e for e in epochs if f"{ev}_acc" in e]  # with --eval-every, not every epoch is evaluated
        x_eval = [e["epoch"] for e in evaluated]
        ax_loss.plot(
            x_eval, [e[f"{ev}_loss"] for e in evaluated], "-", color=line.get_color(), label=f"{name} {ev}".strip()
        )
        ax_acc.plot(
            x, [100 * e["train_acc"] for e in epochs], "--", color=line.get_color(), label=f"{name} train".strip()
        )
        ax_acc.plot(
            x_eval, [100 * e[f"{ev}_acc"] for e in evaluated], "-", color=line.get_color(), label=f"{name} {ev}".strip()
        )
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    matrix = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    fig, ax = plt.subplots(figsize=CONFUSION_SIZE)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > matrix.max() / 2 else "black",
        )
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"confusion matrix ({(labels == predicted).mean():.2%} correct of {len(labels):,})",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_misclassified(
    images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, path: Path
) -> None:
    cols = 8
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=GRID_SIZE, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, true, pred, conf in zip(axes.flat, images, labels, predicted, confidence, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"{CLASSES[true]}\n→ {CLASSES[pred]} {conf:.0%}", fontsize=8, color="firebrick")
    fig.suptitle("most confidently wrong (true → predicted, confidence)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_run_plots(run: Path) -> list[Path]:
    run = Path(run)
    written = [run / "curves.png"]
    plot_curves([run], written[0])
    predictions = run / "predictions.npz"
    if predictions.exists():
        p = np.load(predictions)
        plot_confusion(p["labels"], p["predicted"], run / "confusion.png")
        plot_misclassified(
            p["worst_images"], p["worst_labels"], p["worst_predicted"], p["worst_confidence"], run / "misclassified.png"
        )
        written += [run / "confusion.png", run / "misclassified.png"]
    return written


def save_predictions(path: Path, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> None:
    """What the pictures need from the final model: every prediction, and the worst mistakes' images."""
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:WORST]
    np.savez_compressed(
        path,
        labels=labels,
        predicted=predicted,
        worst_images=images[worst],
        worst_labels=labels[worst],
        worst_predicted=predicted[worst],
        worst_confidence=probabilities[worst, predicted[worst]],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.json)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write (default: the run folder; with several runs, curves.png goes to the first)",
    )
    args = p.parse_args(argv)
    for run in args.runs:
        if not (run / "metrics.json").is_file():
            print(f"error: {run}/metrics.json not found: is {run} a training run's --out?", file=sys.stderr)
            return 2
    if len(args.runs) == 1 and args.out is None:
        for path in write_run_plots(args.runs[0]):
            print(path)
        return 0
    out = args.out or args.runs[0]
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(args.runs, out / "curves.png")
    print(out / "curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
