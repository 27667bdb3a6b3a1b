"""Every error a user can fix, one type per kind; each entry point prints one as one line and exits with `exit_code`.

A leaf module (it imports nothing of the project), so pipeline, model, train and bench all raise from here.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names what is wrong and what to do."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A flag value that cannot work (alone, or on this device or torchrun world)."""


class DataError(UserError):
    """Missing or bad data: the message names the file, what is wrong and what to do."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: which file, what is wrong, what to do."""


class OutputError(UserError):
    """A file could not be written (disk full, read-only folder, ...): the file and the operating system's reason."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class DaliUnavailable(UserError, RuntimeError):
    """NVIDIA DALI cannot be imported on this machine."""


class Diverged(UserError, RuntimeError):
    """The loss stopped being finite (exit code 1: the flags were valid, the run was not)."""

    exit_code = 1
