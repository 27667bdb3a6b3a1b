"""Using a run's checkpoint: `python -m train.evaluate` scores it as the run did or classifies image files, and
`python -m train.export` writes it as an ONNX model that onnxruntime runs to the run's own predictions."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import CLASSES, load_cifar10


@pytest.fixture(scope="module")
def run(tiny_cifar, tmp_path_factory) -> Path:
    """A finished 2-epoch CPU run with a weight EMA and flip TTA (both must come from the checkpoint)."""
    from train.__main__ import cli

    out = tmp_path_factory.mktemp("use") / "run"
    flags = ["--data-dir", tiny_cifar, "--allow-small-data", "--out", str(out), "--loader", "cpu", "--device", "cpu"]
    flags += ["--epochs", "2", "--batch-size", "64", "--workers", "0", "--no-progress", "--ema", "0.9", "--tta", "flip"]
    assert cli(flags) == 0
    return out


@pytest.mark.slow
def test_evaluate_prints_the_numbers_the_run_logged_for_its_best_epoch(run, tiny_cifar, tmp_path, capsys):
    from train.evaluate import main

    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    best = max(epochs, key=lambda e: e["test_acc"])  # the earliest of equals, as best.pt
    assert main([str(run / "best.pt"), "--device", "cpu", "--json", str(tmp_path / "score.json")]) == 0
    out = capsys.readouterr().out
    assert f"loss {best['test_loss']:.4f} acc {best['test_acc']:.2%}" in out.splitlines()[1], out
    score = json.loads((tmp_path / "score.json").read_text())
    assert (score["epoch"], score["tta"], score["images"]) == (best["epoch"], "flip", best["test_images"])
    assert score["acc"] == best["test_acc"] and score["loss"] == pytest.approx(best["test_loss"], rel=1e-6)
    counts = np.bincount(load_cifar10(tiny_cifar, allow_small=True)[3], minlength=len(CLASSES))
    right = sum(score["per_class"].get(name, 0) * n for name, n in zip(CLASSES, counts, strict=True))
    assert right == pytest.approx(score["acc"] * counts.sum())


@pytest.mark.slow
def test_evaluate_classifies_image_files_of_any_size(run, tmp_path, capsys, refused):
    from train.evaluate import main

    rng = np.random.default_rng(0)
    wide, grey = tmp_path / "wide.png", tmp_path / "grey.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 90, 3), np.uint8)).save(wide)
    Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8)).save(grey)
    report = tmp_path / "top3.json"
    assert main([str(run / "last.pt"), "--images", str(wide), str(grey), "--device", "cpu", "--json", str(report)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(wide), str(grey)]
    for line in lines:
        top = [entry.rsplit(" ", 1) for entry in line.split(": ")[1].split(", ")]
        assert len(top) == 3 and all(name in CLASSES for name, _ in top), line
        chances = [float(p.rstrip("%")) for _, p in top]
        assert chances == sorted(chances, reverse=True) and sum(chances) <= 100.1, line
    saved = json.loads(report.read_text())["images"]  # --json keeps what was printed
    assert [(row["image"], len(row["top3"])) for row in saved] == [(str(wide), 3), (str(grey), 3)]
    assert "cannot be read as an image" in refused(main, [str(run / "last.pt"), "--images", str(run / "metrics.json")])


@pytest.mark.slow
def test_export_runs_in_onnxruntime_to_the_runs_predictions(run, tiny_cifar, tmp_path, capsys):
    import onnxruntime

    from train.export import main

    model = tmp_path / "models" / "net.onnx"
    assert main([str(run / "last.pt"), str(model)]) == 0  # last.pt: the model predictions.npz was made with
    images = load_cifar10(tiny_cifar, allow_small=True)[2]
    (probabilities,) = onnxruntime.InferenceSession(str(model)).run(None, {"images": images})
    saved = np.load(run / "predictions.npz")
    assert probabilities.shape == (len(images), len(CLASSES)) and probabilities.dtype == np.float32
    np.testing.assert_array_equal(probabilities.argmax(1), saved["predicted"])
    (worst,) = onnxruntime.InferenceSession(str(model)).run(None, {"images": saved["worst_images"]})
    confidence = worst[np.arange(len(worst)), saved["worst_predicted"]]
    np.testing.assert_allclose(confidence, saved["worst_confidence"], atol=1e-4)


def test_export_without_onnx_is_one_line(tmp_path, monkeypatch, refused):
    from train.export import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    line = refused(main, [str(tmp_path / "last.pt"), str(tmp_path / "net.onnx")])
    assert "pip install -e '.[export]'" in line and not (tmp_path / "net.onnx").exists()


@pytest.mark.parametrize("entry", ["train.evaluate", "train.export"])
def test_a_file_that_is_no_checkpoint_is_one_line(entry, tmp_path, refused):
    main = importlib.import_module(entry).main
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    argv = [str(tmp_path / "notes.pt")] + ([str(tmp_path / "net.onnx")] if entry == "train.export" else [])
    assert "notes.pt: " in refused(main, argv)
    assert "no checkpoint there" in refused(main, [str(tmp_path / "missing.pt"), *argv[1:]])
