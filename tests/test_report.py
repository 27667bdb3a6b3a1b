"""`python -m train.report`: the curves of a run are visible even when the run is one epoch long."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np


def test_a_one_epoch_run_draws_a_visible_point_per_series(tmp_path, monkeypatch):
    epoch = {"epoch": 1, "train_loss": 2.0, "train_acc": 0.25, "test_loss": 1.8, "test_acc": 0.3}
    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": [epoch]}))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure the report draws, to look at it
    from train.report import main

    assert main([str(tmp_path)]) == 0
    (figure,) = figures
    lines = [line for ax in figure.axes for line in ax.get_lines()]
    assert len(lines) == 4  # train and test, loss and accuracy
    for line in lines:
        assert len(line.get_xdata()) == 1
        # One point and no marker draws nothing: a line needs two points.
        assert line.get_marker() not in (None, "", " ", "None") and line.get_markersize() > 0, line.get_label()
    # And in the picture: each axes holds coloured (non-grey) pixels of its series beyond the legend's samples.
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    coloured = (pixels.max(-1) - pixels.min(-1)) > 60
    for ax in figure.axes:
        box = ax.get_window_extent()
        legend = ax.get_legend().get_window_extent()
        height = pixels.shape[0]
        inside = np.zeros_like(coloured)
        inside[int(height - box.y1) : int(height - box.y0), int(box.x0) : int(box.x1)] = True
        inside[int(height - legend.y1) : int(height - legend.y0), int(legend.x0) : int(legend.x1)] = False
        assert (coloured & inside).sum() > 10, ax.get_title()
    assert (tmp_path / "curves.png").stat().st_size > 0
    monkeypatch.undo()
    plt.close(figure)
