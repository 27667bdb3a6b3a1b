"""`python -m train.report`: the curves of a run are visible even when the run is one epoch long."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest


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


GOOD_EPOCH = {"epoch": 1, "train_loss": 2.0, "train_acc": 0.25, "test_loss": 1.8, "test_acc": 0.3}


def _predictions(**changes) -> dict[str, np.ndarray]:
    arrays = {
        "labels": np.zeros(5, np.int64),
        "predicted": np.ones(5, np.int64),
        "worst_images": np.zeros((2, 32, 32, 3), np.uint8),
        "worst_labels": np.zeros(2, np.int64),
        "worst_predicted": np.ones(2, np.int64),
        "worst_confidence": np.ones(2, np.float32),
    }
    return {**arrays, **changes}


@pytest.mark.parametrize(
    "metrics, message",
    [
        ({"epochs": [{"epoch": 1}]}, "epochs[0] has no number 'train_loss'"),
        ({"epochs": [{**GOOD_EPOCH, "train_loss": "x"}]}, "epochs[0] has no number 'train_loss'"),
        ({"epochs": [{**GOOD_EPOCH, "test_loss": None}]}, "epochs[0] has no number 'test_loss'"),
        ({"epochs": {"x": 1}}, "'epochs' is not a list"),
        ({"epochs": "abc"}, "'epochs' is not a list"),
        ({"epochs": [1]}, "epochs[0] is not a per-epoch row"),
    ],
)
def test_metrics_the_curves_cannot_draw_are_one_line(tmp_path, capsys, metrics, message):
    from train.report import main

    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main([str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"labels": np.array([0, 1, 2, 3, 10])}, "labels holds class indices outside 0..9"),
        ({"worst_labels": np.array([0, -20])}, "worst_labels holds class indices outside 0..9"),
        ({"labels": np.zeros(4, np.int64)}, "labels (4) and predicted (5) differ in length"),
        ({"labels": np.array(list("abcde"))}, "labels is a <U1 array"),
        ({"worst_images": np.zeros((2, 5), np.uint8)}, "worst_images is a uint8 array of shape [2, 5]"),
        ({"worst_images": np.zeros((200, 32, 32, 3), np.uint8)}, "the worst_* arrays hold [2, 200] entries"),
        ({"worst_confidence": np.ones((2, 2), np.float32)}, "worst_confidence is a float32 array of shape [2, 2]"),
    ],
)
def test_predictions_the_pictures_cannot_draw_are_one_line(tmp_path, capsys, changes, message):
    from train.report import main

    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": [GOOD_EPOCH]}))
    np.savez(tmp_path / "predictions.npz", **_predictions(**changes))
    assert main([str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'predictions.npz'}: not what a run writes") and message in line, line


def test_predictions_that_would_expand_past_the_bound_are_refused_unread(tmp_path, capsys, monkeypatch):
    import train.report as report

    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": [GOOD_EPOCH]}))
    # labels of 10**6 zeros: 8 MB expanded, a few kB on disk; the bound lowered to 1 MB stands for the real one
    np.savez_compressed(tmp_path / "predictions.npz", **_predictions(labels=np.zeros(10**6, np.int64)))
    assert (tmp_path / "predictions.npz").stat().st_size < 100_000
    monkeypatch.setattr(report, "PREDICTIONS_MAX_BYTES", 2**20)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("expanded before the size was checked"))
    assert report.main([str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "more than the 1,048,576 this tool ever writes" in line, line


def test_valid_predictions_draw_all_three_pictures(tmp_path):
    from train.report import main

    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": [GOOD_EPOCH]}))
    np.savez(tmp_path / "predictions.npz", **_predictions())
    assert main([str(tmp_path)]) == 0
    assert all((tmp_path / name).stat().st_size > 0 for name in ("curves.png", "confusion.png", "misclassified.png"))
