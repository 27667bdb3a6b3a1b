"""`python -m bench` writes its report and chart; pytest-benchmark timings of the CPU-side loaders.

The benchmarks are small enough to run in the default test run; `pytest --benchmark-only` runs just them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_loader, smooth_images

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_json_and_png(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--batch-sizes",
            "32",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    (report_path,) = tmp_path.glob("*-quick.json")
    report = json.loads(report_path.read_text())
    assert {"device", "torch", "dali", "cpu_count", "results"} <= set(report)
    kinds = {(r["what"], r["loader"]) for r in report["results"]}
    assert {
        ("model", None),
        ("loader", "cpu"),
        ("loader", "dali-cpu"),
        ("epoch", "model-only"),
        ("epoch", "cpu"),
        ("epoch", "dali-cpu"),
    } <= kinds
    for row in report["results"]:
        assert {"what", "loader", "batch_size", "workers", "img_per_s", "epoch_s", "repeats"} <= set(row)
        assert row["img_per_s"] > 0 and row["batch_size"] == 32
        assert (row["epoch_s"] is not None) == (row["what"] == "epoch")
    png = report_path.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "img/s" in result.stdout


def test_bench_refuses_dali_gpu_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--loaders", "dali-gpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


@pytest.fixture(scope="module")
def images():
    return smooth_images(2048, seed=9), np.zeros(2048, np.int64)


@pytest.mark.parametrize("variant", ["cpu", "dali-per-image"])
def test_benchmark_one_batch(benchmark, variant, images):
    loader = build_loader(variant, *images, 256)
    it = iter(loader)

    def one_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    x, _ = benchmark.pedantic(one_batch, rounds=5, warmup_rounds=1)
    assert x.shape == (256, 3, 32, 32)


@pytest.mark.parametrize("variant", ["cpu", "dali-per-image"])
def test_benchmark_epoch_slice(benchmark, variant, images):
    """A slice of a training epoch: 512 images through the loader and the seed net's training step on the CPU."""
    from bench.core import bench_epoch

    x, y = images
    result = benchmark.pedantic(
        lambda: bench_epoch(
            {"cpu": "cpu", "dali-per-image": "dali-cpu"}[variant],
            "seed",
            x[:512],
            y[:512],
            128,
            1,
            torch.device("cpu"),
            repeats=1,
        ),
        rounds=1,
    )
    assert result.row()["img_per_s"] > 0
