"""Every entry point refuses an impossible flag value the same way: one line on stderr, `error: ...`, exit code 2,
before any work, never a traceback (the shared parser and types of pipeline/cli.py)."""

from __future__ import annotations

import pytest
import torch

NO_GPU = not torch.cuda.is_available()


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def test_train_uses_the_shared_one_line_parser(refused):
    """python -m train already refused bad flags in one line; it now does so through the same parser class."""
    from pipeline.cli import OneLineParser
    from train.config import build_parser, parse_config

    assert isinstance(build_parser(), OneLineParser)
    assert "--batch-size" in refused(parse_config, ["--batch-size", "zero"])


# --- an allocation that fails is one line, not a traceback, in every entry point ---


def test_out_of_memory_is_one_line_and_other_errors_keep_their_traceback(capsys):
    from pipeline.cli import one_line_errors

    def failing(err: BaseException):
        @one_line_errors("--batch-size")
        def main() -> int:
            raise err

        return main

    for err in (
        MemoryError("Unable to allocate 27.9 TiB for an array"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
    ):
        assert failing(err)() == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: out of memory (") and "lower --batch-size" in lines[0]
    for err in (RuntimeError("a bug"), ValueError("another")):
        with pytest.raises(type(err)):
            failing(err)()


@pytest.mark.parametrize("entry", ["train", "bench", "host_ops", "gallery"])
def test_every_entry_point_reports_out_of_memory_in_one_line(entry, monkeypatch, tmp_path, tiny_cifar, capsys):
    """The allocation fails where each command makes its first big array (a loader, the first benchmark row)."""

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.00 TiB for an array")

    if entry == "train":
        import train.run
        from train.__main__ import cli as main

        monkeypatch.setattr(train.run, "make_train_loader", no_memory)
        argv = ["--data-dir", tiny_cifar, "--allow-small-data", "--out", str(tmp_path / "o"), "--device", "cpu"]
        argv += ["--loader", "cpu"]  # (runs where DALI is not installed too)
    elif entry == "bench":
        import bench.__main__
        from bench.__main__ import main

        monkeypatch.setattr(bench.__main__, "bench_model", no_memory)
        argv = ["--quick", "--device", "cpu", "--out", str(tmp_path)]
    elif entry == "host_ops":
        import bench.host_ops
        from bench.host_ops import main

        monkeypatch.setattr(bench.host_ops, "make_loader", no_memory)
        argv = ["--images", "1024", "--batch-size", "512"]
    else:
        import pipeline.gallery
        from pipeline.gallery import main

        monkeypatch.setattr(pipeline.gallery, "make_loader", no_memory)
        argv = ["--data-dir", tiny_cifar, "--allow-small-data", "--out", str(tmp_path / "g.png"), "--device", "cpu"]
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: out of memory (Unable to allocate 1.00 TiB") and "lower --" in lines[-1]


# --- an --out the system will not write is refused before the work, and a file is written whole or not at all ---


@pytest.fixture
def read_only(monkeypatch, tmp_path):
    """A folder under tmp_path where creating any file fails as on a read-only file system (root ignores chmod)."""
    import errno
    import os

    import pipeline.cli

    folder = tmp_path / "read-only"
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(pipeline.cli.os, "open", refusing_open)
    return folder


def _never(*args, **kwargs):
    pytest.fail("work started before --out was checked")


def test_write_whole_leaves_the_old_file_or_the_new_one(tmp_path):
    from pipeline.files import write_whole

    path = tmp_path / "report.json"
    write_whole(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_whole(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    path.unlink()
    path.symlink_to(target)  # a link planted under the name is replaced, never written through
    write_whole(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and not path.is_symlink() and target.read_bytes() == b"keep"


def test_empty_paths_to_read_are_refused(refused, tiny_cifar):
    from pipeline.gallery import main as gallery
    from train.report import main as report

    assert "argument runs: is empty" in refused(report, [""])
    assert "argument --data-dir: is empty" in refused(gallery, ["--data-dir", "", "--device", "cpu"])


def test_a_path_with_a_line_break_still_gives_one_error_line(tmp_path, refused):
    """A path may hold a newline ($'a\\nb'); an error that quotes it escapes it, so it stays one line, everywhere."""
    from bench.__main__ import main as bench
    from pipeline.gallery import main as gallery
    from train.__main__ import cli as train
    from train.report import main as report

    odd = str(tmp_path / "no\nsuch")
    line = refused(train, ["--data-dir", odd, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert "no\\nsuch: folder not found" in line, line
    assert "no\\nsuch" in refused(report, [odd])
    assert "no\\nsuch: folder not found" in refused(gallery, ["--data-dir", odd, "--device", "cpu"])
    (tmp_path / "a-file").write_text("")
    assert "no\\nsuch" in refused(bench, ["--quick", "--out", str(tmp_path / "a-file" / "no\nsuch")])


def test_write_whole_takes_the_longest_legal_file_name(tmp_path):
    """The temporary is the final name plus 18 characters; a final name of up to 255 bytes (NAME_MAX) must still be
    written (it failed as "File name too long" after all the gallery's draws)."""
    from pipeline.files import write_whole

    for name in ("a" * 251 + ".png", "é" * 125 + ".png"):  # 255 bytes, ASCII and two-byte UTF-8
        path = tmp_path / name
        write_whole(path, lambda f: f.write(b"png"))
        assert path.read_bytes() == b"png"
    assert len(list(tmp_path.iterdir())) == 2  # and no temporary left
