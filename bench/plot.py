"""The benchmark chart: images per second of each loader per batch size, against the model's own ceiling.

Left panel, each loader alone; its ceiling is the model's training step alone (rows what="model"). Right panel, a
training epoch fed by each loader; its ceiling is the model-only epoch (what="epoch", loader="model-only"): the same
epoch fed from one tensor already on the device. The legends sit outside the axes so that no bar is hidden.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.core import MODEL_ONLY

NAMES = {
    "dali-gpu": "DALI GPU",
    "dali-cpu": "DALI CPU mode",
    "kornia": "kornia (tensors on the device)",
    "torch": "plain torch (affine_grid + grid_sample)",
}
PANELS = (
    ("loader", "loader alone", "model", "model step alone"),
    ("epoch", "training epoch", "epoch", "model-only epoch"),
)
# Model and epoch rows come with an eager training step and, on CUDA, one replayed as a CUDA graph (train/step.py):
# the same loader's bars share a colour, graph bars are hatched, and each kind of step has its own ceiling line.
GRAPH = ", CUDA graph"
CEILING_STYLES = {"graph": "k:s"}  # eager (or a report from before the graph step existed): "k--o"


def _loader_label(row: dict) -> str:
    if row["loader"] == "cpu":
        workers = row["workers"]
        return f"albumentations, {workers} worker{'' if workers == 1 else 's'}"
    return NAMES.get(row["loader"], row["loader"])


def _label(row: dict) -> str:
    return _loader_label(row) + (GRAPH if row.get("step") == "graph" else "")


def plot_report(report: dict, path: str | os.PathLike | BinaryIO) -> None:
    """Draw `report` (bench's JSON: rows with what, loader, batch_size, workers, step, img_per_s) into the PNG
    `path` (a file name, or a file open for writing)."""
    rows = [r for r in report["results"] if not r.get("compiled")]
    sizes = sorted({r["batch_size"] for r in rows})
    loader_labels = sorted({_loader_label(r) for r in rows if r["loader"] != MODEL_ONLY})
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(loader_labels)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), layout="constrained")
    for ax, (what, title, ceiling_what, ceiling_name) in zip(axes, PANELS, strict=True):
        series: dict[str, tuple[dict, dict[int, float]]] = {}
        for r in rows:
            if r["what"] == what and r["loader"] != MODEL_ONLY:
                series.setdefault(_label(r), (r, {}))[1][r["batch_size"]] = r["img_per_s"]
        if not series:
            ax.text(0.5, 0.5, f"{title}: not measured in this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        width = 0.8 / len(series)
        x = np.arange(len(sizes))
        for i, (label, (first, values)) in enumerate(series.items()):
            heights = [values.get(s, np.nan) for s in sizes]
            offset = (i - (len(series) - 1) / 2) * width
            hatch = "//" if first.get("step") == "graph" else None
            ax.bar(x + offset, heights, width, label=label, color=colors[_loader_label(first)], hatch=hatch)
        ceilings: dict[str | None, dict[int, float]] = {}
        for r in rows:
            if r["what"] == ceiling_what and r["loader"] == MODEL_ONLY:
                ceilings.setdefault(r.get("step"), {})[r["batch_size"]] = r["img_per_s"]
        for step, ceiling in ceilings.items():
            label = ceiling_name + (GRAPH if step == "graph" else "") + " (ceiling)"
            ax.plot(x, [ceiling.get(s, np.nan) for s in sizes], CEILING_STYLES.get(step, "k--o"), label=label)
        ax.set_xticks(x, [str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_yscale("log")
        ax.set_title(f"{title}: {report['device']}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.suptitle(f"{report['model']} net, torch {report['torch']}, DALI {report['dali']}, {report['date']}")
    try:
        fig.savefig(path, format="png", dpi=110)
    finally:  # a refused write (disk full) must not leave the figure open in a long-lived process
        plt.close(fig)
