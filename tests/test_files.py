"""Files appear whole or not at all (pipeline/files.py), whatever the writer does with a failed write."""

from __future__ import annotations

import os
import resource
import signal

import pytest
import torch

from pipeline.files import write_whole


@pytest.fixture
def file_size_limit():
    """Writes past 64 KiB fail with EFBIG in this process, as a full disk fails them with ENOSPC."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal that would kill the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_write_under_torch_save_is_the_os_error_and_keeps_the_old_file(tmp_path, file_size_limit):
    """torch's zip writer turns a failed write into RuntimeError('unexpected pos'); the caller must see the OSError."""
    path = tmp_path / "last.pt"
    write_whole(path, lambda f: f.write(b"old"))
    with pytest.raises(OSError, match="File too large"):
        write_whole(path, lambda f: torch.save({"w": torch.zeros(100_000)}, f))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path):
    mask = os.umask(0o027)
    try:
        write_whole(tmp_path / "a.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
