"""Command-line plumbing shared by every entry point (`python -m train`, `bench`, `bench.host_ops`,
`pipeline.gallery`, `train.report`): one parser class and the argparse types that refuse impossible flag values.

A leaf module (standard library only at import; torch only inside `out_of_memory`) in `pipeline`, the package every
entry point already imports, so that no entry point pulls in another's dependencies to parse its flags and
`pipeline` never imports `train` or `bench`.

A bad value is reported the same way everywhere: one line on stderr, `error: argument --flag: what is wrong (see
--help)`, exit code 2, before any data is read or any loader is built. The types are argparse's own extension point
(a callable that raises `argparse.ArgumentTypeError`), so the message names the flag without extra code.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters written as escapes (a path may hold a newline: `--out
    $'a\\nb'`), so that an error that quotes it is still one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def say_error(message: str) -> None:
    """Print `error: MESSAGE` on stderr as one line (`one_line`): how every entry point reports a mistake."""
    print(f"error: {one_line(message)}", file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit code 2, and flags are spelled out: no
    abbreviations (an abbreviation is a second spelling of a flag, which changes meaning as soon as another flag
    with the same prefix is added)."""

    def __init__(self, *args, **kwargs) -> None:  # argparse.ArgumentParser's own
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # never returns
        self.exit(2, f"error: {one_line(message)} (see --help)\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help, except where the help already says its default or there is none
    to show (None, False, a suppressed default): argparse's own formatter would print "(default: None)" there."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (counts and sizes: batch size, images, repeats, steps).

    Raises argparse.ArgumentTypeError (argparse turns it into a one-line error naming the flag)."""
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text}")
    return value


def worker_count(text: str) -> int:
    """argparse type: a worker-process or thread count, >= 0 and at most pipeline.WORKERS_PER_CORE_MAX per usable
    core (pipeline.check_workers, the bound every loader applies).

    Raises argparse.ArgumentTypeError."""
    from pipeline import check_workers  # the package's own __init__, loaded by the time a flag is parsed

    value = _integer(text)
    try:
        check_workers(value, "")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).strip()) from None
    return value


def output_dir(text: str) -> Path:
    """argparse type: a folder to write into (created later if missing); refused if it or a parent is a file.

    Raises argparse.ArgumentTypeError."""
    if not text:  # Path("") is the current folder: an unset shell variable would write there
        raise argparse.ArgumentTypeError("is empty; give a folder (. for the current one)")
    path = Path(text)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be a folder: {str(blocker)!r} is a file")
    return path


def output_file(text: str) -> Path:
    """argparse type: a file to write (its folder created later if missing); refused if it is an existing folder or
    a parent is a file. Raises argparse.ArgumentTypeError."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a file name")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name, e.g. {str(path / 'out.png')!r}")
    output_dir(str(path.parent))
    return path


def writable_folder(path: Path, flag: str) -> None:
    """Create folder `path` if it is missing and prove it writable (pipeline/files.py `prove_writable`), before any
    work: a read-only or full file system, or one where the user may not write, is one line then, not a traceback
    after the measurements or draws the command was run for. Raises ValueError (one line naming `flag`)."""
    from pipeline.files import os_reason, prove_writable

    try:
        prove_writable(path)
    except OSError as err:
        raise ValueError(
            f"{flag} {str(path)!r}: cannot write there ({os_reason(err)}); choose a folder you can write to"
        ) from None


def given_path(text: str) -> Path:
    """argparse type: a path to read, refused when empty (Path("") would silently be the current folder).

    Raises argparse.ArgumentTypeError."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a path")
    return Path(text)


def physical_memory_bytes() -> int | None:
    """This machine's RAM in bytes (POSIX sysconf: pages x page size), None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """Refuse, before allocating, an array that could not fit: more than half of this machine's RAM (half: the loader,
    its worker processes or DALI's buffers and the model need the rest). A value near the limit can still run out of
    memory later; this refuses the impossible ones before the kernel's out-of-memory killer ends the process without
    a word. Raises ValueError (one line) naming `what` (the flags that set the size)."""
    ram = physical_memory_bytes()
    if ram is not None and nbytes > ram // 2:
        raise ValueError(
            f"{what} needs {nbytes / 2**30:,.1f} GiB of memory, more than half of this machine's "
            f"{ram / 2**30:,.1f} GiB; lower it"
        )


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation that failed: numpy's MemoryError, torch's OutOfMemoryError (CUDA), or the
    RuntimeError torch's CPU allocator raises ("DefaultCPUAllocator: can't allocate memory"). Entry points turn these
    into one line that says which flag to lower, instead of a traceback: the code is not at fault, the size is."""
    if isinstance(err, MemoryError):
        return True
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def out_of_memory_message(err: BaseException, flags: str) -> str:
    """`error: out of memory (...)` in one line: the first line of what the allocator said and which flags to lower."""
    said = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"error: out of memory ({one_line(said[:200])}); lower {flags}"


def one_line_on_out_of_memory(flags: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for an entry point's `main(argv) -> int`: an allocation that fails anywhere in it (`out_of_memory`)
    ends the command with one line naming `flags` (what sets the sizes) and exit code 1; every other exception
    passes through untouched (a bug keeps its traceback)."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: object, **kwargs: object) -> int:
            try:
                return main(*args, **kwargs)
            except (MemoryError, RuntimeError) as err:
                if not out_of_memory(err):
                    raise
                print(out_of_memory_message(err, flags), file=sys.stderr)
                return 1

        return run

    return wrap
