"""`python -m bench.host_ops`: the report a GPU session reads (tests/test_loaders.py holds the loader to its counts)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import dali_available

from bench.host_ops import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_reports_per_batch_and_per_chunk_host_work(capsys):
    from pipeline.dali_loader import CHUNK_IMAGES, CPU_CHUNK_IMAGES

    assert main(["--batch-size", "64", "--images", "640"]) == 0
    out = capsys.readouterr().out
    chunk = (CHUNK_IMAGES if torch.cuda.is_available() else CPU_CHUNK_IMAGES) // 64  # the graph main() gets
    assert f"10 batches in 1 DALI chunk(s) of up to {chunk}" in out
    assert re.search(r"^between chunk boundaries +9 +0\.00 +0\.00 +\d+\.\d{3}$", out, re.MULTILINE), out
    assert "DALI calls in the epoch, most frequent: feed_input x3, schedule_run x1, outputs x1" in out


def test_the_cpu_loader_has_no_chunks(capsys):
    assert main(["--loader", "cpu", "--batch-size", "64", "--images", "200"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^whole epoch +4 ", out, re.MULTILINE) and "chunk" not in out


def test_one_unit_a_column_and_no_library_noise():
    """The profiler's own lines (USDT profiler_start, ERROR gpuGetDeviceCount on a CPU) stay out, and every host
    time is in ms with 3 decimals (not 0.00314 ms beside 1.54e+03 ms)."""
    argv = ["--loader", "cpu", "--batch-size", "64", "--images", "256"]
    result = subprocess.run(
        [sys.executable, "-m", "bench.host_ops", *argv], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    header, *rows = [line for line in result.stdout.splitlines() if line.startswith(("batches", "whole"))]
    assert "host ms" in header
    assert rows and all(re.fullmatch(r"\d+\.\d{3}", row.split()[-1]) for row in rows), rows


HOST_OPS = [
    ["--batch-size", "0"],
    ["--batch-size", "x"],
    ["--images", "0.5"],
    ["--loader", "kornia"],
    ["--images", "10000000000"],
    ["--batch-size", "100000"],
]


@pytest.mark.parametrize("argv", HOST_OPS, ids=" ".join)
def test_impossible_flags_are_refused_in_one_line(argv, refused):
    assert argv[0] in refused(main, argv)
