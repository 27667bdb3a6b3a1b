"""Files written whole or not at all, for every tool of the project: a reader sees the old file or the new one.

The bytes go to a fresh temporary beside the final name (O_EXCL: nothing planted there is written through), are
fsynced and renamed onto the final name (a link there is replaced, not followed), and the folder is fsynced.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Temporaries are named .<final name>.<8 random characters><TEMP_SUFFIX>, so that the run that owns a folder can
# recognise and remove the ones a killed run left behind (train/outdir.py).
TEMP_SUFFIX = ".partial"


def write_whole(
    path: str | os.PathLike, write: Callable[[BinaryIO], object], *, at_stage: Callable[[str], None] | None = None
) -> None:
    """Write file `path` whole or not at all with `write(f)`; an existing `path` (a link too) is replaced.

    `at_stage(stage)` is called at "written" (the temporary complete) and "replaced" (a hook for tests that kill the
    process there). Raises OSError when the system refuses (no space, read-only, ...), leaving no temporary.
    """
    path = Path(path)
    # Filled in memory first: writers such as torch's zip writer hide a failed write (disk full) under their own
    # RuntimeError, while os.write reports the OSError itself. Every file written here is a few MB.
    buffer = io.BytesIO()
    write(buffer)
    # The name cut to fit NAME_MAX (255 bytes) with what is added; mode 0o666 lets the umask apply, as open() does.
    tmp = path.with_name(f".{path.name.encode()[:230].decode(errors='ignore')}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(fd)
        if at_stage is not None:
            at_stage("written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    if at_stage is not None:
        at_stage("replaced")


def os_reason(err: OSError) -> str:
    """'No space left on device, ENOSPC': the operating system's words and the errno name, for messages."""
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason}, {name}" if name else reason


def fsync_folder(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable (POSIX leaves the order of directory updates to the filesystem)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prove_writable(folder: Path, prefix: str = ".write-check.") -> None:
    """Create `folder` if missing and prove it writable (a fresh file, one byte fsynced, removed); OSError if not."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=folder)
    try:
        os.write(fd, b"\0")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)
