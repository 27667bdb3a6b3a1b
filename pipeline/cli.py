"""Command-line plumbing of every entry point: a mistake is one line on stderr, `error: ...`, with its exit code.

argparse's refusals go through `OneLineParser` (exit 2), a UserError or a failed allocation through `one_line_errors`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ConfigError, OutputError, UserError


def one_line(text: str) -> str:
    """`text` with control characters escaped (a path may hold a newline), so that a message quoting it is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def say_error(message: str) -> None:
    """Print `error: MESSAGE` on stderr as one line."""
    print(f"error: {one_line(message)}", file=sys.stderr)


def report(err: UserError) -> int:
    """Print `err` as one `error:` line on stderr; returns its exit code (what an entry point's main returns)."""
    say_error(str(err))
    return err.exit_code


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block), exit code 2, and abbreviations are off: an
    abbreviation would change meaning as soon as another flag with the same prefix is added."""

    def __init__(self, *args, **kwargs) -> None:  # argparse.ArgumentParser's own
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # never returns
        self.exit(2, f"error: {one_line(message)} (see --help)\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help says it already or there is none (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (counts and sizes). Raises argparse.ArgumentTypeError."""
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text}")
    return value


def worker_count(text: str) -> int:
    """argparse type: a worker count that every loader accepts (pipeline.check_workers). Raises ArgumentTypeError."""
    from pipeline import check_workers  # the package's own __init__, loaded by the time a flag is parsed

    value = _integer(text)
    try:
        check_workers(value, "")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).strip()) from None
    return value


def output_dir(text: str) -> Path:
    """argparse type: a folder to write into (created later if missing); refused if it or a parent is a file."""
    if not text:  # Path("") is the current folder: an unset shell variable would write there
        raise argparse.ArgumentTypeError("is empty; give a folder (. for the current one)")
    path = Path(text)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be a folder: {str(blocker)!r} is a file")
    return path


def output_file(text: str) -> Path:
    """argparse type: a file to write; refused if it is a folder or a parent is a file."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a file name")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name, e.g. {str(path / 'out.png')!r}")
    output_dir(str(path.parent))
    return path


def given_path(text: str) -> Path:
    """argparse type: a path to read, refused when empty (Path("") would silently be the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a path")
    return Path(text)


def writable_folder(path: Path, flag: str) -> None:
    """Create folder `path` if missing and prove it writable before any work. Raises OutputError naming `flag`."""
    from pipeline.files import os_reason, prove_writable

    try:
        prove_writable(path)
    except OSError as err:
        raise OutputError(
            f"{flag} {str(path)!r}: cannot write there ({os_reason(err)}); choose a folder you can write to"
        ) from None


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """ConfigError naming `what` for an array of more than half this machine's RAM, before it is allocated (the
    kernel's out-of-memory killer would end the process without a word)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # the platform does not say
        return
    if nbytes > ram // 2:
        raise ConfigError(
            f"{what} needs {nbytes / 2**30:,.1f} GiB of memory, more than half of this machine's "
            f"{ram / 2**30:,.1f} GiB; lower it"
        )


def one_line_errors(flags: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for an entry point's `main(argv) -> int`: a UserError ends it as one line with its exit code, a
    failed allocation (numpy's MemoryError, torch's OutOfMemoryError or CPU allocator's RuntimeError) as one line
    naming `flags` (what sets the sizes) with exit code 1. Every other exception keeps its traceback (a bug)."""
    import torch

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: object, **kwargs: object) -> int:
            try:
                return main(*args, **kwargs)
            except UserError as err:
                return report(err)
            except (MemoryError, RuntimeError) as err:
                allocation = isinstance(err, (MemoryError, torch.OutOfMemoryError))
                if not allocation and "can't allocate memory" not in str(err):  # what torch's CPU allocator says
                    raise
                said = (str(err).strip().splitlines() or [type(err).__name__])[0]
                say_error(f"out of memory ({said[:200]}); lower {flags}")
                return 1

        return run

    return wrap
