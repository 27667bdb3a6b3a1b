"""Every entry point refuses an impossible flag value the same way: one line on stderr, `error: ...`, exit code 2,
before any work, never a traceback (the shared parser and types of pipeline/cli.py)."""

from __future__ import annotations

import pytest
import torch

NO_GPU = not torch.cuda.is_available()


def refused(main, argv: list[str], capsys) -> str:
    """Run an entry point's main(argv) in this process; assert it refused with exit code 2 and one error line."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, f"{argv}: exit code {code}, stderr {captured.err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{argv}: stderr {captured.err!r}"
    return lines[0]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


BENCH = [
    ["--batch-sizes", "0"],
    ["--batch-sizes", "-64"],
    ["--batch-sizes", "64", "0"],
    ["--batch-sizes", "1.5"],
    ["--images", "0"],
    ["--repeats", "0"],
    ["--model-steps", "-1"],
    ["--workers", "-1"],
    ["--model", "no-such-net"],
    ["--loaders", "no-such-loader"],
    ["--what", "everything"],
    ["--device", "tpu"],
    ["--steps", "warp"],
]


@pytest.mark.parametrize("argv", BENCH, ids=" ".join)
def test_bench_refuses_impossible_flags(argv, capsys):
    from bench.__main__ import main

    message = refused(main, [*argv, "--device", "cpu"] if "--device" not in argv else argv, capsys)
    assert argv[0] in message


def test_bench_refuses_an_out_that_is_a_file(a_file, capsys):
    from bench.__main__ import main

    assert "is a file" in refused(main, ["--quick", "--out", str(a_file / "sub")], capsys)
    assert "is a file" in refused(main, ["--quick", "--out", str(a_file)], capsys)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_bench_refuses_cuda_without_a_gpu(capsys):
    from bench.__main__ import main

    assert "no CUDA GPU" in refused(main, ["--quick", "--device", "cuda"], capsys)


HOST_OPS = [["--batch-size", "0"], ["--batch-size", "x"], ["--images", "0.5"], ["--loader", "kornia"]]


@pytest.mark.parametrize("argv", HOST_OPS, ids=" ".join)
def test_host_ops_refuses_impossible_flags(argv, capsys):
    from bench.host_ops import main

    assert argv[0] in refused(main, argv, capsys)


GALLERY = [["--images", "0"], ["--images", "-1"], ["--draws", "0"], ["--seed", "-1"], ["--images", "two"]]


@pytest.mark.parametrize("argv", GALLERY, ids=" ".join)
def test_gallery_refuses_impossible_flags(argv, capsys, tiny_cifar):
    from pipeline.gallery import main

    assert argv[0] in refused(main, [*argv, "--data-dir", tiny_cifar, "--allow-small-data"], capsys)


def test_gallery_refuses_an_out_it_cannot_write(tmp_path, a_file, capsys, tiny_cifar):
    from pipeline.gallery import main

    data = ["--data-dir", tiny_cifar, "--allow-small-data"]
    assert "is a folder" in refused(main, [*data, "--out", str(tmp_path)], capsys)
    assert "is a file" in refused(main, [*data, "--out", str(a_file / "gallery.png")], capsys)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_gallery_refuses_cuda_without_a_gpu(capsys, tiny_cifar):
    from pipeline.gallery import main

    assert "no CUDA GPU" in refused(main, ["--device", "cuda", "--data-dir", tiny_cifar, "--allow-small-data"], capsys)


@pytest.mark.parametrize("argv", [["--out"], ["--outdir", "x"], []], ids=repr)
def test_report_refuses_impossible_flags(argv, tmp_path, capsys):
    """(Run folders that are not finished runs are refused by train.report itself: tests/test_outputs.py.)"""
    from train.report import main

    refused(main, [str(tmp_path), *argv] if argv else argv, capsys)


def test_train_uses_the_shared_one_line_parser(capsys):
    """python -m train already refused bad flags in one line; it now does so through the same parser class."""
    from pipeline.cli import OneLineParser
    from train.config import build_parser, parse_config

    assert isinstance(build_parser(), OneLineParser)
    assert "--batch-size" in refused(parse_config, ["--batch-size", "zero"], capsys)
