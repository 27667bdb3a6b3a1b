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

from bench.core import LOADERS, MODEL_ONLY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
    # every kind of row: the model step, each loader alone, an epoch with each loader (kornia: the test extra has it)
    loaders = ["cpu", "dali-cpu", "kornia", "torch"]
    assert kinds == {("model", "model-only"), ("epoch", "model-only")} | {
        (what, name) for what in ("loader", "epoch") for name in loaders
    }
    for row in report["results"]:
        assert row["loader"] in LOADERS + (MODEL_ONLY,)
        assert {"what", "loader", "batch_size", "workers", "img_per_s", "epoch_s", "repeats"} <= set(row)
        assert row["img_per_s"] > 0 and row["batch_size"] == 32
        assert (row["epoch_s"] is not None) == (row["what"] == "epoch")
        assert row["compiled"] is False and row["compile_mode"] is None
    for row in report["results"]:  # the model rows say what their warm-up (capture, compilation) cost
        assert (row["warmup_s"] is not None and row["warmup_s"] > 0) == (row["what"] == "model")
    png = report_path.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "img/s" in result.stdout


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_writes_into_a_folder_of_the_current_directory_by_default(tmp_path, monkeypatch, capsys):
    from bench.__main__ import DEFAULT_OUT, main, parse_args

    committed = sorted((ROOT / "bench" / "results").rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--what", "model", "--batch-sizes", "8", "--device", "cpu"]) == 0
    assert len(list((tmp_path / "bench-results").glob("*-quick.json"))) == 1
    assert sorted((ROOT / "bench" / "results").rglob("*")) == committed  # the package's folder is left alone
    assert parse_args([]).out == DEFAULT_OUT and not DEFAULT_OUT.is_absolute()
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "./bench-results, in the current directory" in " ".join(capsys.readouterr().out.split())


def test_bench_refuses_kornia_when_it_is_not_installed(monkeypatch, capsys):
    from bench.__main__ import default_loaders, main

    assert "kornia" in default_loaders(torch.device("cpu"), dali=True)
    monkeypatch.setitem(sys.modules, "kornia", None)  # as if not installed
    assert main(["--quick", "--loaders", "kornia", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "pip install -e '.[bench]'" in err
    assert default_loaders(torch.device("cpu"), dali=True) == ["cpu", "dali-cpu", "torch"]


def test_bench_default_loaders_are_what_this_machine_can_run(capsys):
    from bench.__main__ import default_loaders, main

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_loaders(cpu, dali=True) == ["cpu", "dali-cpu", "kornia", "torch"]
    assert default_loaders(cuda, dali=True) == ["cpu", "dali-gpu", "dali-cpu", "kornia", "torch"]
    assert default_loaders(cuda, dali=False) == ["cpu", "kornia", "torch"]
    if torch.cuda.is_available():
        return
    assert main(["--quick", "--loaders", "dali-gpu", "--device", "cpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _row(what: str, loader: str, bs: int, img_per_s: float, workers: int | None = None, step: str = "eager") -> dict:
    return {
        "what": what,
        "loader": loader,
        "batch_size": bs,
        "workers": workers,
        "img_per_s": img_per_s,
        "step": None if what == "loader" else step,
    }


def test_chart_ceilings_legend_and_labels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from bench.plot import plot_report

    sizes, model_step, epoch = [128, 512], {128: 9_000.0, 512: 20_000.0}, {128: 3_000.0, 512: 4_000.0}
    graph = {"model": 2.0, "epoch": 1.5}  # the CUDA-graph step's rows: this much faster
    rows = []
    for bs in sizes:
        for step in ("eager", "graph"):
            speedup = graph["model"] if step == "graph" else 1
            rows.append(_row("model", MODEL_ONLY, bs, model_step[bs] * speedup, step=step))
            rows.append(
                _row("epoch", MODEL_ONLY, bs, epoch[bs] * (graph["epoch"] if step == "graph" else 1), step=step)
            )
        for what in ("loader", "epoch"):
            top = 40_000.0 if what == "loader" else epoch[bs]  # bars up to the top: a legend inside would cover one
            rows += [_row(what, "cpu", bs, 0.8 * top, workers=w) for w in (1, 2)]
            rows += [_row(what, name, bs, top) for name in ("dali-cpu", "kornia", "torch")]
    rows.append(_row("epoch", "kornia", 128, 5_000.0, step="graph"))
    report = {"results": rows, "device": "cpu", "model": "seed", "torch": "2", "dali": "2", "date": "today"}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    plot_report(report, tmp_path / "chart.png")
    monkeypatch.undo()
    (figure,) = figures
    figure.canvas.draw()
    loader_ax, epoch_ax = figure.axes
    for ax, ceiling, name, what in (
        (loader_ax, model_step, "model step alone", "model"),
        (epoch_ax, epoch, "model-only epoch", "epoch"),
    ):
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert lines == {
            f"{name} (ceiling)": [ceiling[bs] for bs in sizes],
            f"{name}, CUDA graph (ceiling)": [ceiling[bs] * graph[what] for bs in sizes],
        }, ax.get_title()
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert "albumentations, 1 worker" in labels and "albumentations, 2 workers" in labels
        assert {"kornia (tensors on the device)", "plain torch (affine_grid + grid_sample)"} <= set(labels)
        legend = ax.get_legend().get_window_extent()
        for bar in ax.patches:
            assert not legend.overlaps(bar.get_window_extent()), f"the legend covers a bar in {ax.get_title()}"
    assert "kornia (tensors on the device), CUDA graph" in [t.get_text() for t in epoch_ax.get_legend().get_texts()]
    plt.close(figure)


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


@pytest.mark.slow
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
            warmup=1,
        ),
        rounds=1,
    )
    assert result.row()["img_per_s"] > 0


def test_gpu_session_summary_tells_compiled_rows_apart(tmp_path):
    """gpu_session.sh's summary (its packing step alone: PHASES names no phase) names a compiled row's mode and
    every model row's warm-up seconds: the compile phase's eager and reduce-overhead rows both say step eager."""
    rows = [
        {
            "what": "model",
            "loader": "model-only",
            "batch_size": 512,
            "step": step,
            "workers": None,
            "img_per_s": rate,
            "epoch_s": None,
            "compiled": mode is not None,
            "compile_mode": mode,
            "warmup_s": warmup,
        }
        for step, mode, rate, warmup in [
            ("eager", None, 1000.0, 0.5),
            ("graph", None, 3000.0, 0.25),
            ("eager", "reduce-overhead", 2500.0, 40.0),
        ]
    ]
    (tmp_path / "bench-compile").mkdir()
    (tmp_path / "bench-compile" / "gpu.json").write_text(json.dumps({"results": rows}))
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "OUT": str(tmp_path),
        "PHASES": "none",
        "PYTHON": sys.executable,
    }
    result = subprocess.run(
        ["bash", "bench/gpu_session.sh"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in (tmp_path / "summary.txt").read_text().splitlines() if line.startswith("model")]
    assert len(lines) == 3
    assert "compile" not in lines[0] and "warmup 0.50s" in lines[0]
    assert "compile reduce-overhead" in lines[2] and "warmup 40.00s" in lines[2]
