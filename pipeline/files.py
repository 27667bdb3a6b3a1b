"""Files written whole or not at all, for every tool of the project (standard library only, so that `pipeline`,
`bench` and `train` all use this one implementation; train/checkpoint.py's `atomic_write` adds its run-folder
error type and test hooks around it).

The bytes go to a fresh temporary in the same folder (`tempfile.mkstemp`: an unpredictable name opened with O_EXCL,
so nothing planted in the folder is written through), are fsynced, and the temporary is renamed onto the final name
(`os.replace`, which replaces a planted symbolic link instead of following it); then the folder is fsynced so that
the rename survives a power cut. A reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

# Temporaries are named .<final name>.<8 random characters><TEMP_SUFFIX> (mkstemp's pattern), so that the run that
# owns a folder can recognise and remove the ones a killed run left behind (train/outdir.py).
TEMP_SUFFIX = ".partial"


def _read_umask() -> int:
    # mkstemp creates files with mode 0600; outputs get the mode open() would have given them (0666 minus the
    # umask). os.umask can only be read by setting it, so it is read once, at import, before any thread exists.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()


class _RecordingFile:
    """The temporary file as writers see it. Some writers turn a failed write into their own error (torch's zip
    writer: RuntimeError('unexpected pos ...')); this remembers the OSError underneath, so that the caller can report
    the real reason (disk full, ...)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:  # data: bytes-like
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._f.flush()

    def __getattr__(self, name: str):  # tell, seek, fileno, ... for writers that use them
        return getattr(self._f, name)


def write_whole(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    *,
    at_stage: Callable[[str], None] | None = None,
) -> None:
    """Write file `path` whole or not at all: `write(f)` fills a new temporary beside it, which is fsynced and
    renamed onto `path`; then the folder is fsynced. An existing `path` (a symbolic link too) is replaced, never
    written through. `at_stage(stage)` is called at "written" (the temporary complete, the name not yet replaced)
    and "replaced" (a hook for tests that kill the process there).

    Raises OSError when the operating system refuses (no space, read-only, not a folder, ...), also when the writer
    hid it under its own error; the temporary is removed then, as on any other exception (which propagates)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
        with open(fd, "wb") as f:
            os.fchmod(fd, FILE_MODE)
            sink = _RecordingFile(f)
            try:
                write(sink)
            except Exception:
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(fd)
        if at_stage is not None:
            at_stage("written")
        os.replace(tmp, path)
        tmp = None
        fsync_folder(path.parent)
        if at_stage is not None:
            at_stage("replaced")
    finally:
        if tmp is not None:
            with suppress(OSError):  # the folder itself is gone or unwritable: the original error says so
                os.unlink(tmp)


# The longest file name most file systems take (NAME_MAX of ext4, xfs, btrfs, tmpfs: 255 bytes), and what mkstemp
# adds to a prefix: 8 random characters and the suffix.
NAME_MAX = 255
_TEMP_EXTRA = 8 + len(TEMP_SUFFIX)


def _temp_prefix(name: str) -> str:
    """'.<name>.' for the temporary of file `name`, with `name` cut so that the temporary's whole name fits NAME_MAX
    bytes: a legal final name of 238-255 bytes must not fail as "File name too long" on its temporary. (The run
    folder's files have short names, so train/outdir.py's pattern for stale temporaries still sees them whole.)"""
    budget = NAME_MAX - 2 - _TEMP_EXTRA  # the leading and trailing dots
    encoded = name.encode()
    if len(encoded) > budget:
        name = encoded[:budget].decode(errors="ignore")  # whole characters only
    return f".{name}."


def os_reason(err: OSError) -> str:
    """'No space left on device, ENOSPC': the operating system's words and the errno name, for messages."""
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason}, {name}" if name else reason


def fsync_folder(folder: Path) -> None:
    """Make the names in `folder` (a rename, an unlink) durable: without this a power cut can undo a rename that a
    later write already depends on (POSIX leaves the order of directory updates to the filesystem)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prove_writable(folder: Path, prefix: str = ".write-check.") -> None:
    """Create `folder` if it is missing and prove it writable: a file made (a fresh name, mkstemp's O_EXCL, so no file
    of the user's is replaced), one byte written and fsynced, and the file removed. Raises OSError if the system
    refuses."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=folder)
    try:
        os.write(fd, b"\0")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)
