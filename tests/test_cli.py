"""`python -m train` as a user runs it: a smoke run that writes its outputs, and refusals that are one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
    )


def small_run_args(data: str, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir",
        data,
        "--allow-small-data",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.parametrize("loader", ["cpu", "dali"])
def test_smoke_run_writes_metrics_and_checkpoints(tiny_cifar, tmp_path, loader):
    out = tmp_path / loader
    result = run_train(*small_run_args(tiny_cifar, out, "--loader", loader))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loader"] == loader and metrics["config"]["epochs"] == 2
    assert {"torch", "dali", "device", "cpu_count"} <= set(metrics["env"])
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for epoch in metrics["epochs"]:
        assert {"train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img_per_s"} <= set(epoch)
        assert 0 <= epoch["test_acc"] <= 1 and 0 <= epoch["train_acc"] <= 1
    assert metrics["train_seconds"] > 0 and metrics["params"] == 190_880
    assert metrics["warmup_seconds"] > 0 and metrics["compile_seconds"] == 0  # warm-up is timed apart
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        assert state["epoch"] in (1, 2) and "model" in state
    assert "final test accuracy" in result.stdout
    if loader == "dali":
        assert result.stdout.count("running DALI's CPU operators") == 1  # said once, not per loader


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--batch-size", "-4"], "--batch-size must be > 0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--model", "vgg"], "--model 'vgg' is unknown"),
        (["--loader", "ffcv"], "invalid choice: 'ffcv'"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--aug", "flip_p=3"], "flip_p must be a probability in [0, 1], got 3.0"),
        (["--aug", "wobble=1"], "--aug expects KEY=VALUE"),
        (["--aug", "cutout_min_px=40", "--aug", "cutout_max_px=40"], "cutout_min_px=40 does not fit a 32x32 image"),
        (["--aug", "cutout_max_px=33"], "cutout_max_px=33 does not fit a 32x32 image"),
        (["--aug", "scale_max_delta=0.99"], "scale_max_delta=0.99 can shrink a 32x32 image"),
        (["--aug", "pad_crop_px=32"], "pad_crop_px=32 lets the crop miss a 32x32 image"),
        (["--aug", "pad_crop_px=2.5"], "pad_crop_px: '2.5' is not a whole number"),
        (["--aug", "std=inf"], "std must be finite per channel"),
        (["--aug", "mean=nan"], "mean must be finite per channel"),
        (["--aug", "std=1e-40"], "beyond float32"),
        (["--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar: folder not found"),
    ],
)
def test_bad_flags_are_refused_in_one_line(args, message, tmp_path):
    result = run_train(*args, "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_help_explains_every_flag():
    result = run_train("--help")
    assert result.returncode == 0
    for flag in (
        "--loader",
        "--model",
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--schedule",
        "--data-dir",
        "--download",
        "--out",
        "--seed",
        "--device",
        "--workers",
        "--limit-train",
        "--amp",
        "--channels-last",
        "--compile",
        "--recipe",
        "--val-split",
        "--tta",
        "--resume",
    ):
        assert flag in result.stdout


def test_data_dir_from_environment(tiny_cifar, tmp_path):
    result = run_train(
        "--allow-small-data",
        "--out",
        str(tmp_path / "o"),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--loader",
        "cpu",
        "--limit-train",
        "64",
        "--device",
        "cpu",
        env={"CIFAR10_ROOT": tiny_cifar},
    )
    assert result.returncode == 0, result.stderr


def test_recipes_set_defaults_and_flags_override_them():
    from train.config import RECIPES, parse_config

    cfg = parse_config(["--recipe", "fast"])
    for key, value in RECIPES["fast"].items():
        assert getattr(cfg, key) == value
    assert cfg.recipe == "fast"
    cfg = parse_config(["--recipe", "fast", "--epochs", "3", "--no-amp"])
    assert cfg.epochs == 3 and cfg.amp is False and cfg.batch_size == RECIPES["fast"]["batch_size"]
    seed = parse_config(["--recipe", "seed"])
    assert (seed.model, seed.batch_size, seed.epochs) == ("seed", 128, 60)
