"""The benchmark chart: images per second per batch size on a linear axis, each bar labelled with its value.

A panel per kind of row measured, loaders alone and epochs, each with its ceiling line (the model step alone, the
model-only epoch); the model step alone has a panel only when it is all there is. Legends sit outside the axes.
"""

from __future__ import annotations

import math
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
    MODEL_ONLY: "model step",
}
# what: (title, the `what` of its ceiling's rows, the ceiling's name)
PANELS = {
    "loader": ("loader alone", "model", "model step alone"),
    "epoch": ("training epoch", "epoch", "model-only epoch"),
    "model": ("model step alone", None, None),
}
GRAPH = ", CUDA graph"  # graph-step bars are hatched, and each kind of step has its own ceiling line


def _loader_label(row: dict) -> str:
    if row["loader"] == "cpu":
        return f"albumentations, {row['workers']} worker{'' if row['workers'] == 1 else 's'}"
    return NAMES.get(row["loader"], row["loader"])


def _short(value: float) -> str:
    """A bar's label: 605k, 1.5M, 5,115 (empty where nothing was measured)."""
    if math.isnan(value):
        return ""
    return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.0f}k" if value >= 1e4 else f"{value:,.0f}"


def plot_report(report: dict, path: str | os.PathLike | BinaryIO) -> None:
    """Draw `report` (bench's JSON: rows with what, loader, batch_size, workers, step, img_per_s) into the PNG
    `path` (a file name, or a file open for writing)."""
    rows = report["results"]
    sizes = sorted({r["batch_size"] for r in rows})
    whats = [w for w in ("loader", "epoch") if any(r["what"] == w and r["loader"] != MODEL_ONLY for r in rows)]
    whats = whats or ["model"]
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(sorted({_loader_label(r) for r in rows}))}
    fig, axes = plt.subplots(1, len(whats), figsize=(7.5 * len(whats) + 2, 4.8), layout="constrained", squeeze=False)
    x = np.arange(len(sizes))
    for ax, what in zip(axes[0], whats, strict=True):
        title, ceiling_what, ceiling_name = PANELS[what]
        series: dict[str, tuple[dict, dict[int, float]]] = {}
        for r in rows:
            if r["what"] == what and (what == "model" or r["loader"] != MODEL_ONLY):
                label = _loader_label(r) + (GRAPH if r.get("step") == "graph" else "")
                series.setdefault(label, (r, {}))[1][r["batch_size"]] = r["img_per_s"]
        width = 0.8 / len(series)
        for i, (label, (first, values)) in enumerate(series.items()):
            heights = [values.get(s, np.nan) for s in sizes]
            hatch = "//" if first.get("step") == "graph" else None
            offset = (i - (len(series) - 1) / 2) * width
            bars = ax.bar(x + offset, heights, width, label=label, color=colors[_loader_label(first)], hatch=hatch)
            ax.bar_label(bars, labels=[_short(h) for h in heights], rotation=90, fontsize=7, padding=2)
        ceilings: dict[str | None, dict[int, float]] = {}
        for r in rows:
            if r["what"] == ceiling_what and r["loader"] == MODEL_ONLY:
                ceilings.setdefault(r.get("step"), {})[r["batch_size"]] = r["img_per_s"]
        for step, ceiling in ceilings.items():
            label = f"{ceiling_name}{GRAPH if step == 'graph' else ''} (ceiling)"
            ax.plot(x, [ceiling.get(s, np.nan) for s in sizes], "k:s" if step == "graph" else "k--o", label=label)
        ax.margins(y=0.18)  # room above the tallest bar for its label
        ax.set_ylim(bottom=0)
        ax.set_xticks(x, [str(s) for s in sizes])
        ax.set(xlabel="batch size", ylabel="images / s", title=f"{title}: {report['device']}")
        ax.yaxis.set_major_formatter("{x:,.0f}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    smoke = "SMOKE RUN (--quick): a few batches each, not a measurement\n" if report.get("quick") else ""
    fig.suptitle(f"{smoke}{report['model']} net, torch {report['torch']}, DALI {report['dali']}, {report['date']}")
    try:
        fig.savefig(path, format="png", dpi=110)
    finally:  # a refused write (disk full) must not leave the figure open in a long-lived process
        plt.close(fig)
