"""Trust: resume after SIGKILL, atomic outputs, clear refusals, determinism, and the pictures a run leaves behind."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch
from runs import ROOT, epochs_of, run_train, small_run_args

# Every test here runs `python -m train` (or torchrun) end to end: the full run in .ci/run has them all.
pytestmark = pytest.mark.slow


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_cifar, tmp_path):
    args = ["--loader", "dali", "--epochs", "4", "--batch-size", "16"]
    reference = tmp_path / "reference"
    assert run_train(*small_run_args(tiny_cifar, reference, *args)).returncode == 0

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "train", *small_run_args(tiny_cifar, out, *args)]
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.monotonic() + 240
    while not (out / "metrics.json").exists() or len(epochs_of(out)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # in epoch 3, with epochs 1-2 saved
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before_kill = len(epochs_of(out))
    assert done_before_kill < 4

    resumed = run_train(*small_run_args(tiny_cifar, out, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out / 'last.pt'} after epoch {done_before_kill}" in resumed.stdout
    assert epochs_of(out) == epochs_of(reference)  # identical, to the last digit
    assert not list(out.glob(".*.partial"))  # no half-written files left behind


def test_corrupt_checkpoint_is_a_clear_error_not_a_fresh_start(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    assert run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1")).returncode == 0
    checkpoint = out / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    result = run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--resume", "auto"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "last.pt: truncated or corrupt checkpoint" in line


def test_resume_refuses_other_settings_and_missing_checkpoints(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    assert run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1")).returncode == 0
    other = run_train(
        *small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1", "--lr", "0.1", "--resume", "auto")
    )
    assert other.returncode == 2 and "was written with other settings (lr: 0.05 -> 0.1)" in other.stderr
    finished = run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1", "--resume", "auto"))
    assert finished.returncode == 2 and "already finished all 1 epochs" in finished.stderr
    missing = run_train(*small_run_args(tiny_cifar, tmp_path / "empty", "--loader", "cpu", "--resume", "auto"))
    assert missing.returncode == 2 and "no checkpoint there to resume from" in missing.stderr


def test_out_holding_another_run_is_refused_unless_asked(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    assert run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1")).returncode == 0
    before = (out / "metrics.json").read_text()
    refused = run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1"))
    assert refused.returncode == 2 and "already holds another run" in refused.stderr
    assert (out / "metrics.json").read_text() == before
    assert (
        run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1", "--overwrite")).returncode == 0
    )


def test_non_finite_loss_stops_with_epoch_and_batch(tiny_cifar, tmp_path):
    result = run_train(
        *small_run_args(
            tiny_cifar, tmp_path / "nan", "--loader", "cpu", "--lr", "1e30", "--no-nesterov", "--warmup-frac", "0"
        )
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "loss became non-finite" in line and "epoch 1, batch" in line and "Lower --lr" in line


@pytest.mark.parametrize("loader", ["cpu", "dali"])
def test_same_seed_same_metrics(tiny_cifar, tmp_path, loader):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert run_train(*small_run_args(tiny_cifar, out, "--loader", loader, "--seed", "7")).returncode == 0
    assert epochs_of(runs[0]) == epochs_of(runs[1])


def _broken_copy(tiny_cifar: str, tmp_path: Path, breaking) -> str:
    folder = tmp_path / "data" / "cifar-10-batches-py"
    shutil.copytree(Path(tiny_cifar) / "cifar-10-batches-py", folder)
    breaking(folder)
    return str(tmp_path / "data")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:777])


def _rewrite(path: Path, changes: dict) -> None:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    path.write_bytes(pickle.dumps({**batch, **changes}))


@pytest.mark.parametrize(
    "breaking, message",
    [
        (lambda f: (f / "test_batch").unlink(), "test_batch: file missing"),
        (lambda f: _truncate(f / "data_batch_5"), "data_batch_5: truncated or corrupt pickle"),
        (lambda f: (f / "data_batch_1").write_bytes(b"\x80\x04garbage"), "data_batch_1: truncated or corrupt"),
        (lambda f: _rewrite(f / "data_batch_2", {b"labels": [None] * 60}), "data_batch_2: label 0 is None"),
        (lambda f: _rewrite(f / "test_batch", {b"labels": [2**70] * 100}), "test_batch: 100 labels outside 0..9"),
    ],
)
def test_bad_data_through_the_cli(tiny_cifar, tmp_path, breaking, message):
    data = _broken_copy(tiny_cifar, tmp_path, breaking)
    result = run_train("--data-dir", data, "--allow-small-data", "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert message in line and "Traceback" not in result.stderr


def test_download_offline_through_the_cli(tmp_path):
    """No network (every proxy a closed local port): one line that says what to do, and no folder left behind."""
    closed = "http://127.0.0.1:9"
    proxies = {"https_proxy": closed, "http_proxy": closed, "HTTPS_PROXY": closed, "HTTP_PROXY": closed}
    data = tmp_path / "fresh" / "cifar10"
    result = run_train(
        "--download", "--data-dir", str(data), "--out", str(tmp_path / "out"), "--device", "cpu",
        env={**proxies, "no_proxy": "", "NO_PROXY": ""},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "download failed" in line and f"tar -xzf cifar-10-python.tar.gz -C {data}" in line
    assert not (tmp_path / "fresh").exists()


def test_small_data_without_the_flag_through_the_cli(tiny_cifar, tmp_path):
    result = run_train("--data-dir", tiny_cifar, "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 2 and "has 300 images, CIFAR-10 has 50,000" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu(tiny_cifar, tmp_path):
    result = run_train(*small_run_args(tiny_cifar, tmp_path / "o"), "--device", "cuda")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--device cuda: no CUDA GPU is visible" in line


def test_loader_dali_without_dali_installed(tiny_cifar, tmp_path):
    hide_dali = (
        "import sys; sys.modules['nvidia.dali'] = None; from train.__main__ import cli; "
        f"sys.exit(cli({small_run_args(tiny_cifar, tmp_path / 'o', '--loader', 'dali')!r}))"
    )
    result = subprocess.run([sys.executable, "-c", hide_dali], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "NVIDIA DALI is not installed" in line and "pip install nvidia-dali-cuda130" in line
    assert "--loader cpu" in line


def _png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 5_000
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_a_run_leaves_curves_confusion_and_mistakes(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    assert run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu")).returncode == 0
    assert _png_size(out / "curves.png") == (1200, 450)
    assert _png_size(out / "confusion.png") == (700, 600)
    assert _png_size(out / "misclassified.png") == (1000, 1100)
    # and the report tool overlays several runs
    other = tmp_path / "other"
    shutil.copytree(out, other)
    report = subprocess.run(
        [sys.executable, "-m", "train.report", str(out), str(other), "--out", str(tmp_path / "both")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    assert _png_size(tmp_path / "both" / "compare.png") == (1200, 450)


def test_gallery_shows_both_loaders(tiny_cifar, tmp_path):
    out = tmp_path / "augmentations.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.gallery",
            "--data-dir",
            tiny_cifar,
            "--allow-small-data",
            "--out",
            str(out),
            "--draws",
            "3",
            "--device",
            "cpu",
            "--aug",
            "pad_crop_px=2",  # an opt-in unit on in the main columns too
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    from pipeline.spec import AugSpec

    # 8 rows x (raw + 3 albumentations + 3 DALI + an albumentations and a DALI cell per unit alone), 100 px a cell
    assert _png_size(out) == (100 * (1 + 3 + 3 + 2 * len(AugSpec().units)), 840)


def test_tensorboard_without_the_extra_is_one_line(tiny_cifar, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    result = run_train(*small_run_args(tiny_cifar, tmp_path / "tb", "--loader", "cpu", "--tensorboard"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--tensorboard needs the tensorboard package" in line and "[tensorboard]" in line
