"""The benchmark chart: images per second of each loader per batch size, with the model's own step as the ceiling."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _label(row: dict) -> str:
    if row["loader"] == "cpu":
        return f"albumentations, {row['workers']} workers"
    return {"dali-gpu": "DALI GPU", "dali-cpu": "DALI CPU mode"}.get(row["loader"], row["loader"])


def plot_report(report: dict, path: Path) -> None:
    rows = report["results"]
    sizes = sorted({r["batch_size"] for r in rows})
    labels = sorted({_label(r) for r in rows if r["loader"] not in (None, "model-only", "model-compiled")})
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, what, title in ((axes[0], "loader", "loader alone"), (axes[1], "epoch", "training epoch")):
        series = {}
        for r in rows:
            if r["what"] == what and r["loader"] not in (None, "model-only", "model-compiled"):
                series.setdefault(_label(r), {})[r["batch_size"]] = r["img_per_s"]
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(sizes))
        for i, (label, values) in enumerate(series.items()):
            heights = [values.get(s, np.nan) for s in sizes]
            ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label, color=colors[label])
        ceiling = {
            r["batch_size"]: r["img_per_s"]
            for r in rows
            if (r["what"] == "model") or (r["what"] == "epoch" and r["loader"] == "model-only")
        }
        if ceiling:
            ax.plot(x, [ceiling.get(s, np.nan) for s in sizes], "k--o", label="model step alone (ceiling)")
        if not series:
            ax.text(0.5, 0.5, f"{title}: not measured in this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ax.set_xticks(x, [str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_yscale("log")
        ax.set_title(f"{title}: {report['device']}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['model']} net, torch {report['torch']}, DALI {report['dali']}, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
