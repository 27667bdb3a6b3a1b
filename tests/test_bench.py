"""`python -m bench`: its flags, what it prints and writes, its chart; bench/gpu_session.sh's plan and its $OUT under
a kill; pytest-benchmark timings of the CPU-side loaders (`pytest --benchmark-only` runs just those)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_loader, dali_available, smooth_images

import bench.__main__
from bench.__main__ import DEFAULT_OUT, check_flags, default_loaders, main, parse_args
from bench.core import LOADERS, MODEL_ONLY, Result

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


# --- flags: refused in one line, before any work ---------------------------------------------------------------------

BENCH = [
    ["--batch-sizes", "0"],
    ["--batch-sizes", "-64"],
    ["--batch-sizes", "64", "0"],
    ["--batch-sizes", "1.5"],
    ["--images", "0"],
    ["--repeats", "0"],
    ["--model-steps", "-1"],
    ["--workers", "-1"],
    ["--workers", "100000"],
    ["--workers", "8", "100000"],
    ["--batch-sizes", "100000"],  # more than the 50,000 --images: one smaller batch an epoch
    ["--images", "10000000000"],  # 28 TiB of uint8: refused before numpy tries
    ["--model", "no-such-net"],
    ["--loaders", "no-such-loader"],
    ["--what", "everything"],
    ["--device", "tpu"],
    ["--steps", "warp"],
    ["--compile-mode", "reduce-overhead"],  # without --compile it would do nothing
    ["--compile-mode", "fastest"],
    ["--out", ""],  # an unset shell variable: not the current folder
]


@pytest.mark.parametrize("argv", BENCH, ids=" ".join)
def test_bench_refuses_impossible_flags(argv, refused):
    assert argv[0] in refused(main, [*argv, "--device", "cpu"] if "--device" not in argv else argv)


def test_bench_refuses_an_out_that_is_a_file(tmp_path, refused):
    (tmp_path / "a-file").write_text("not a folder")
    assert "is a file" in refused(main, ["--quick", "--out", str(tmp_path / "a-file" / "sub")])
    assert "is a file" in refused(main, ["--quick", "--out", str(tmp_path / "a-file")])


def test_bench_batch_beyond_the_images_is_refused_only_where_an_epoch_is_cut(tmp_path):
    """Model rows step on one random batch of their own, so --what model takes any batch size; loader and epoch rows
    go through --images and refuse a batch larger than it, saying what would help (under --quick, which fixes
    --images at 256, raising --images would not)."""
    cpu = torch.device("cpu")

    def check(*argv: str) -> None:
        check_flags(parse_args([*argv, "--out", str(tmp_path)]), cpu, dali=True)

    check("--quick", "--batch-sizes", "512", "--what", "model")
    check("--batch-sizes", "512", "--images", "256", "--what", "model")
    with pytest.raises(ValueError, match="leave out --quick"):
        check("--quick", "--batch-sizes", "512", "--images", "4096")
    with pytest.raises(ValueError, match="raise --images"):
        check("--batch-sizes", "512", "--images", "256", "--what", "loader")


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_bench_refuses_what_needs_a_gpu(refused):
    assert "no CUDA GPU" in refused(main, ["--quick", "--device", "cuda"])
    assert "needs a CUDA GPU" in refused(main, ["--quick", "--device", "cpu", "--steps", "graph"])
    assert "needs a CUDA GPU" in refused(main, ["--quick", "--loaders", "dali-gpu", "--device", "cpu"])


def test_bench_refuses_an_out_it_cannot_write_before_measuring(tmp_path, monkeypatch, refused):
    import errno

    import pipeline.files

    def refusing(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(pipeline.files, "prove_writable", refusing)
    monkeypatch.setattr(bench.__main__, "bench_model", _never)
    line = refused(main, ["--quick", "--device", "cpu", "--what", "model", "--out", str(tmp_path)])
    assert "--out" in line and "Read-only file system" in line, line


def test_bench_refuses_kornia_when_it_is_not_installed(monkeypatch, refused):
    assert "kornia" in default_loaders(torch.device("cpu"), dali=True)
    monkeypatch.setitem(sys.modules, "kornia", None)  # as if not installed
    assert "pip install -e '.[bench]'" in refused(main, ["--quick", "--loaders", "kornia", "--device", "cpu"])
    assert default_loaders(torch.device("cpu"), dali=True) == ["cpu", "dali-cpu", "torch"]


def test_bench_default_loaders_are_what_this_machine_can_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_loaders(cpu, dali=True) == ["cpu", "dali-cpu", "kornia", "torch"]
    assert default_loaders(cuda, dali=True) == ["cpu", "dali-gpu", "dali-cpu", "kornia", "torch"]
    assert default_loaders(cuda, dali=False) == ["cpu", "kornia", "torch"]


# --- what a run prints and keeps (the measurements replaced by instant ones) ---------------------------------------


def _never(*args, **kwargs):
    pytest.fail("work started before the flags were checked")


@pytest.fixture
def instant(monkeypatch):
    """bench's three measurements replaced by instant fakes; the list holds the rows measured."""
    measured: list[Result] = []

    def fake(what: str):
        def measure(*args, **kwargs) -> Result:
            loader = args[0] if what != "model" and args[0] else MODEL_ONLY
            bs = args[1] if what == "model" else args[3] if what == "loader" else args[4]
            result = Result(what, loader, bs, None, 256, [0.5, 0.4, 0.6], step=None if what == "loader" else "eager")
            measured.append(result)
            return result

        return measure

    for what in ("model", "loader", "epoch"):
        monkeypatch.setattr(bench.__main__, f"bench_{what}", fake(what))
    return measured


def test_bench_prints_an_estimate_a_header_with_units_and_one_line_per_row(instant, tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--loaders", "torch", "--batch-sizes", "32", "--out", str(tmp_path)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("what"))
    assert any("about" in line and "in all" in line for line in lines[:header])  # the estimate, before any row
    assert lines[0].startswith("SMOKE RUN (--quick)")
    assert lines[header].split()[5:] == ["img/s", "spread", "%", "epoch", "s", "left", "s"]
    rows = lines[header + 1 : header + 1 + len(instant)]
    assert [row.split()[:2] for row in rows] == [
        ["model", "model-only"],
        ["loader", "torch"],
        ["epoch", "model-only"],
        ["epoch", "torch"],
    ]
    for row in rows:
        assert "[" not in row and row.split()[5] == "512"  # 256 images in the median 0.5 s; one unit a column
        assert row.split()[6] == "41.7"  # spread: (640 - 427) / 512 img/s
    assert lines[-1].endswith("(smoke run)")


def test_bench_says_kornia_is_left_out_in_one_line(instant, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kornia", None)
    assert main(["--quick", "--device", "cpu", "--what", "loader", "--batch-sizes", "32", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if " kornia" in f" {line}"] == [
        "kornia: not installed, left out (pip install -e '.[bench]' to measure it)"
    ]


def test_ctrl_c_is_one_line_and_keeps_the_rows_measured(instant, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.__main__, "bench_loader", interrupted)
    argv = ["--quick", "--device", "cpu", "--loaders", "torch", "--batch-sizes", "32", "--out", str(tmp_path)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stopped (Ctrl-C) after 1 of 4 rows"), err
    (report,) = tmp_path.glob("*.json")
    assert [row["what"] for row in json.loads(report.read_text())["results"]] == ["model"]


def test_bench_says_in_one_line_what_it_kept_when_the_disk_fills_up(instant, tmp_path, monkeypatch, refused):
    import errno

    from pipeline.files import write_whole

    calls = []

    def full_after_one(path, write):
        calls.append(path)
        if len(calls) > 1:  # the first row is written; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_whole(path, write)

    monkeypatch.setattr(bench.__main__, "write_whole", full_after_one)
    line = refused(main, ["--quick", "--device", "cpu", "--what", "model", "--out", str(tmp_path)])
    assert "No space left on device" in line and "holds the 1 row(s) measured before" in line, line
    (report,) = tmp_path.glob("*.json")
    assert len(json.loads(report.read_text())["results"]) == 1  # the row before the disk filled up, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [report.name]  # no temporaries left behind


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_cpu_mode_is_named_before_the_table_not_inside_it(monkeypatch, capsys):
    import pipeline.dali_loader
    from bench.core import loader_for

    monkeypatch.setattr(pipeline.dali_loader, "_warned_cpu_mode", False)  # the notice comes once a process
    images = np.zeros((64, 32, 32, 3), np.uint8)
    loader_for("dali-cpu", images, np.zeros(64, np.int64), 32, 1, torch.device("cpu"))
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_bench_quick_writes_json_and_png(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--device", "cpu", "--batch-sizes", "32", "--workers", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "bench", *argv], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    (report_path,) = tmp_path.glob("*-quick.json")
    report = json.loads(report_path.read_text())
    assert {"device", "torch", "dali", "cpu_count", "results"} <= set(report) and report["quick"] is True
    kinds = {(r["what"], r["loader"]) for r in report["results"]}
    # every kind of row: the model step, each loader alone, an epoch with each loader (kornia: the test extra has it)
    loaders = ["cpu", "dali-cpu", "kornia", "torch"]
    assert kinds == {("model", "model-only"), ("epoch", "model-only")} | {
        (what, name) for what in ("loader", "epoch") for name in loaders
    }
    for row in report["results"]:
        assert row["loader"] in LOADERS + (MODEL_ONLY,)
        assert row["img_per_s"] > 0 and row["batch_size"] == 32
        assert (row["epoch_s"] is not None) == (row["what"] == "epoch")
        assert (row["warmup_s"] is not None and row["warmup_s"] > 0) == (row["what"] == "model")
    png = report_path.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DALI: no GPU in use" not in result.stdout and result.stderr == ""


def test_bench_writes_into_a_folder_of_the_current_directory_by_default(instant, tmp_path, monkeypatch, capsys):
    committed = sorted((ROOT / "bench" / "results").rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--what", "model", "--batch-sizes", "8", "--device", "cpu"]) == 0
    assert len(list((tmp_path / "bench-results").glob("*-quick.json"))) == 1
    assert sorted((ROOT / "bench" / "results").rglob("*")) == committed  # the package's folder is left alone
    assert parse_args([]).out == DEFAULT_OUT and not DEFAULT_OUT.is_absolute()


# --- the chart ---------------------------------------------------------------------------------------------------


def _row(what: str, loader: str, bs: int, img_per_s: float, workers: int | None = None, step: str = "eager") -> dict:
    step = None if what == "loader" else step
    return {"what": what, "loader": loader, "batch_size": bs, "workers": workers, "img_per_s": img_per_s, "step": step}


def _figure(report: dict, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from bench.plot import plot_report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    plot_report(
        {"device": "cpu", "model": "seed", "torch": "2", "dali": "2", "date": "today", **report}, tmp_path / "c.png"
    )
    monkeypatch.undo()
    (figure,) = figures
    figure.canvas.draw()
    return figure


def test_chart_ceilings_legend_and_labels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

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
    figure = _figure({"results": rows}, tmp_path, monkeypatch)
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


def test_chart_is_linear_with_each_bar_labelled_and_no_blank_panel(tmp_path, monkeypatch):
    """A log axis starting near the smallest bar made a 3.4x ratio look like 30x: linear from 0, each bar's value on
    it; a run of loaders alone gets one panel, not a blank second one; a --quick run says it is a smoke run."""
    import matplotlib.pyplot as plt

    rows = [_row("loader", "cpu", 128, 5_115.0, workers=2), _row("loader", "torch", 128, 17_400.0)]
    rows += [_row("loader", "dali-gpu", 512, 1_520_000.0), _row("model", MODEL_ONLY, 128, 9_000.0)]
    figure = _figure({"results": rows, "quick": True}, tmp_path, monkeypatch)
    (ax,) = figure.axes
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert sorted(t.get_text() for t in ax.texts if t.get_text()) == sorted(["5,115", "17k", "1.5M"])
    assert figure.get_suptitle().startswith("SMOKE RUN")
    plt.close(figure)
    model_only = _figure({"results": rows[-1:]}, tmp_path, monkeypatch)
    (ax,) = model_only.axes
    assert ax.get_title().startswith("model step alone") and [t.get_text() for t in ax.texts] == ["9,000"]
    assert not model_only.get_suptitle().startswith("SMOKE")
    plt.close(model_only)


# --- bench/gpu_session.sh -------------------------------------------------------------------------------------------


def _session(tmp_path, **env) -> subprocess.Popen:
    """gpu_session.sh started in a process group of its own; its work folder and $OUT under tmp_path."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable, **env}
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.Popen(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=env, start_new_session=True, **pipe)


def test_gpu_session_plan_fits_one_device_command(tmp_path):
    """The device runs a command for at most 600 s and needs ~60 s of it to return $OUT: the plan fits 540."""
    session = _session(tmp_path, PLAN="1")
    out, _ = session.communicate(timeout=60)
    lines = out.splitlines()
    assert session.returncode == 0 and lines[-1].startswith("total ")
    total = int(lines[-1].split()[1])
    assert total <= 600 - 60 and [line.split()[0] for line in lines[:3]] == ["smoke", "train", "gpu-tests"]
    assert not (tmp_path / "out").exists()  # ran nothing
    refused = subprocess.run(
        ["bash", "bench/gpu_session.sh"], cwd=ROOT, env={**os.environ, "BUDGET": "700"}, text=True, capture_output=True
    )
    assert refused.returncode == 2 and refused.stderr.startswith("error: BUDGET=700")


def _shape(out: Path) -> list[str]:
    """Every file under `out`, asserted to be what the device returns: 8 files, 2 folders deep, plain names."""
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.parts) <= 3 for p in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.parts), files
    return sorted(str(p) for p in files)


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_gpu_session_killed_mid_way_returns_every_phase_finished(tmp_path, tiny_cifar):
    """QUICK=1 (the CPU-sized run), SIGKILLed once the smoke phase is packed and the next phase runs: $OUT holds the
    device's shape and the smoke phase's figures."""
    session = _session(tmp_path, QUICK="1", DATA=tiny_cifar, BUDGET="300")
    timeline = tmp_path / "out" / "timeline.txt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "start train" not in (timeline.read_text() if timeline.exists() else ""):
        time.sleep(0.5)
    time.sleep(2)  # mid-way through the train phase
    phase = int((tmp_path / "work" / "phase.pid").read_text())
    for group in (session.pid, phase):  # the script, and the phase's own process group (timeout makes one)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    session.communicate(timeout=60)
    out = tmp_path / "out"
    assert _shape(out) == ["results.tgz", "summary.txt", "timeline.txt"]
    assert "end smoke rc=0" in timeline.read_text()
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("QUICK=1: toy sizes") and "smoke: passed" in summary
    with tarfile.open(out / "results.tgz") as archive:
        assert "smoke: passed" in archive.extractfile("./logs/smoke.txt").read().decode()


def test_gpu_session_failed_phase_prints_the_end_of_its_log(tmp_path):
    session = _session(tmp_path, QUICK="1", PHASES="train", DATA=str(tmp_path / "no-data"), BUDGET="120")
    out, _ = session.communicate(timeout=300)
    assert session.returncode == 0 and "--- last lines of train's log:" in out
    assert "error:" in out.split("--- last lines of train's log:")[1]  # train's own one-line refusal
    assert _shape(tmp_path / "out") == ["results.tgz", "summary.txt", "timeline.txt"]


# --- pytest-benchmark timings -------------------------------------------------------------------------------------


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
    name = {"cpu": "cpu", "dali-per-image": "dali-cpu"}[variant]
    result = benchmark.pedantic(
        lambda: bench_epoch(name, "seed", x[:512], y[:512], 128, 1, torch.device("cpu"), repeats=1, warmup=1), rounds=1
    )
    assert result.row()["img_per_s"] > 0


def test_bench_compile_measures_a_model_row_under_torch_compile(monkeypatch):
    import bench.__main__ as bench_main

    seen = []
    monkeypatch.setattr(bench_main, "bench_model", lambda *a, **k: seen.append(k))
    args = bench_main.parse_args(["--what", "model", "--compile", "--batch-sizes", "64", "--device", "cpu"])
    for _, measure in bench_main.plan(args, torch.device("cpu"), [], None, None):
        measure()
    assert [(k["graphed"], k["compile_mode"]) for k in seen] == [(False, None), (False, "default")]
