"""`python -m train.report`: a run's curves tell train from test at any epoch count, a comparison of runs never
replaces a run's file, and files the pictures cannot draw are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba


def _curves(tmp_path, monkeypatch, epochs: list[dict], argv: list[str] | None = None):
    """The figure `train.report` draws for a run with these metrics rows (kept open to look at)."""
    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": epochs}))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure the report draws, to look at it
    from train.report import main

    assert main(argv or [str(tmp_path)]) == 0
    monkeypatch.undo()
    return figures[0]


def _row(epoch: int, acc: float) -> dict:
    return {"epoch": epoch, "train_loss": 2.0, "train_acc": acc, "test_loss": 2.0, "test_acc": acc}


def _shown_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_a_one_epoch_run_draws_train_and_test_apart(tmp_path, monkeypatch):
    """One epoch: one point per series, where train and test may even coincide (a smoke run at chance)."""
    figure = _curves(tmp_path, monkeypatch, [_row(1, 0.1)])
    for ax in figure.axes:
        train, test = ax.get_lines()
        assert len(train.get_xdata()) == len(test.get_xdata()) == 1
        # One point and no marker draws nothing: a line needs two points.
        for line in (train, test):
            assert line.get_marker() not in (None, "", " ", "None") and line.get_markersize() > 0, line.get_label()
        assert train.get_marker() != test.get_marker() and to_rgba(train.get_color()) != to_rgba(test.get_color())
        assert _shown_ticks(ax) == [1] and ax.get_ylim()[0] == 0  # not an axis from 0.96 to 1.04
    # And in the picture, where train and test coincide: pixels of both series' colours outside the legend.
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    height = pixels.shape[0]
    for ax in figure.axes:
        box, legend = ax.get_window_extent(), ax.get_legend().get_window_extent()
        inside = np.zeros(pixels.shape[:2], bool)
        inside[int(height - box.y1) : int(height - box.y0), int(box.x0) : int(box.x1)] = True
        inside[int(height - legend.y1) : int(height - legend.y0), int(legend.x0) : int(legend.x1)] = False
        for line in ax.get_lines():
            colour = np.array(to_rgba(line.get_color())[:3]) * 255
            assert (inside & (np.abs(pixels - colour).max(-1) < 12)).sum() > 10, (ax.get_title(), line.get_label())
    assert (tmp_path / "curves.png").stat().st_size > 0
    plt.close(figure)


@pytest.mark.parametrize("epochs", [3, 7, 60])
def test_the_epoch_axis_has_whole_epoch_ticks(tmp_path, monkeypatch, epochs):
    figure = _curves(tmp_path, monkeypatch, [_row(e, e / epochs) for e in range(1, epochs + 1)])
    for ax in figure.axes:
        shown = _shown_ticks(ax)
        assert len(shown) >= 2 and all(float(t).is_integer() for t in shown), shown
    plt.close(figure)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_comparing_runs_writes_a_file_of_its_own_and_no_runs_file(tmp_path, monkeypatch):
    from train.report import main

    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"epochs": [GOOD_EPOCH]}))
        (run / "curves.png").write_bytes(b"the run's own")
    before = _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["a", "b"]) == 0
    assert _files(tmp_path) == {**before, "compare.png": (tmp_path / "compare.png").read_bytes()}
    assert main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "both")]) == 0
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["compare.png"]


def test_a_report_into_a_runs_folder_is_refused(tmp_path, monkeypatch, refused):
    from train.report import main

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"epochs": [GOOD_EPOCH]}))
    before = _files(tmp_path)
    monkeypatch.chdir(tmp_path / "a")
    assert "is a training run's folder" in refused(main, [".", "../b"])  # the comparison would land in run a
    assert "is a training run's folder" in refused(main, ["../b", "--out", "."])  # b's pictures into run a
    assert _files(tmp_path) == before


@pytest.mark.parametrize("argv", [["--out"], ["--outdir", "x"], [], ["--out", ""]], ids=repr)
def test_report_refuses_impossible_flags(argv, tmp_path, refused):
    """(Run folders that are not finished runs are refused by train.report itself: tests/test_outputs.py.)"""
    from train.report import main

    refused(main, [str(tmp_path), *argv] if argv else argv)


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
