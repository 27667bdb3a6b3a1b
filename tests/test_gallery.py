"""`python -m pipeline.gallery` refuses what it cannot draw or write in one line, before any draw, and fetches data
like train does."""

from __future__ import annotations

import errno
import urllib.error
import urllib.request

import pytest
import torch

import pipeline.files
import pipeline.gallery
from pipeline.gallery import main

IMPOSSIBLE = [
    ["--images", "0"],
    ["--images", "-1"],
    ["--draws", "0"],
    ["--seed", "-1"],
    ["--seed", str(2**63)],
    ["--images", "two"],
    ["--images", "100000"],  # rows past matplotlib's 2**16 px per side: refused before any draw
    ["--draws", "100000"],
    ["--out", ""],
]


@pytest.fixture
def no_drawing(monkeypatch):
    """Refusals must come before any draw: building a loader fails the test."""
    monkeypatch.setattr(pipeline.gallery, "make_loader", lambda *a, **k: pytest.fail("a draw started"))


@pytest.mark.parametrize("argv", IMPOSSIBLE, ids=" ".join)
def test_impossible_flags_are_refused(argv, refused, tiny_cifar, no_drawing):
    assert argv[0] in refused(main, [*argv, "--data-dir", tiny_cifar, "--allow-small-data"])


def test_the_seeds_train_refuses_are_refused_before_the_data_is_read(refused):
    for seed in ("-1", str(2**63)):
        line = refused(main, ["--seed", seed, "--data-dir", "/nonexistent/cifar"])
        assert "--seed must be an integer in [0, 2**63 - 1]" in line


def test_an_out_it_cannot_write_is_refused_before_drawing(tmp_path, refused, tiny_cifar, no_drawing, monkeypatch):
    data = ["--data-dir", tiny_cifar, "--allow-small-data", "--device", "cpu"]
    assert "is a folder" in refused(main, [*data, "--out", str(tmp_path)])
    (tmp_path / "a-file").write_text("")
    assert "is a file" in refused(main, [*data, "--out", str(tmp_path / "a-file" / "gallery.png")])

    def read_only(folder, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(pipeline.files, "prove_writable", read_only)
    line = refused(main, [*data, "--out", str(tmp_path / "g.png")])
    assert "--out" in line and "Read-only file system" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(refused, tiny_cifar):
    assert "no CUDA GPU" in refused(main, ["--device", "cuda", "--data-dir", tiny_cifar, "--allow-small-data"])


def test_missing_data_suggests_download_and_download_is_taken(tmp_path, refused, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "cifar10"
    assert "add --download" in refused(main, ["--data-dir", str(root), "--device", "cpu"])
    line = refused(main, ["--data-dir", str(root), "--device", "cpu", "--download"])
    assert "download failed" in line and f"put cifar-10-python.tar.gz in {root}" in line
