"""`python -m bench.host_ops`: the report a GPU session reads (tests/test_loaders.py holds the loader to its counts)."""

from __future__ import annotations

import pytest
import torch
from conftest import dali_available

from bench.host_ops import main


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_reports_per_batch_and_per_chunk_host_work(capsys):
    from pipeline.dali_loader import CHUNK_IMAGES, CPU_CHUNK_IMAGES

    assert main(["--batch-size", "64", "--images", "640"]) == 0
    out = capsys.readouterr().out
    chunk = (CHUNK_IMAGES if torch.cuda.is_available() else CPU_CHUNK_IMAGES) // 64  # the graph main() gets
    assert "10 batches" in out and f"1 chunk(s) (DALI iterations) of up to {chunk} batches" in out
    assert "per batch between chunk boundaries (9 batches): torch ops 0; DALI calls 0" in out
    assert "per chunk, DALI: DALI calls 5 (feed_input x3, schedule_run x1, outputs x1)" in out


def test_the_cpu_loader_has_no_chunks(capsys):
    assert main(["--loader", "cpu", "--batch-size", "64", "--images", "200"]) == 0
    out = capsys.readouterr().out
    assert "per batch: torch ops" in out and "chunk" not in out


def test_bad_sizes_are_refused_in_one_line(capsys):
    assert main(["--batch-size", "64", "--images", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
