"""Command-line plumbing shared by every entry point (`python -m train`, `bench`, `bench.host_ops`,
`pipeline.gallery`, `train.report`): one parser class and the argparse types that refuse impossible flag values.

A leaf module (standard library only) in `pipeline`, the package every entry point already imports, so that no
entry point pulls in another's dependencies to parse its flags and `pipeline` never imports `train` or `bench`.

A bad value is reported the same way everywhere: one line on stderr, `error: argument --flag: what is wrong (see
--help)`, exit code 2, before any data is read or any loader is built. The types are argparse's own extension point
(a callable that raises `argparse.ArgumentTypeError`), so the message names the flag without extra code.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit code 2, and flags are spelled out: no
    abbreviations (an abbreviation is a second spelling of a flag, which changes meaning as soon as another flag
    with the same prefix is added)."""

    def __init__(self, *args, **kwargs) -> None:  # argparse.ArgumentParser's own
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # never returns
        self.exit(2, f"error: {message} (see --help)\n")


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


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (where 0 means something: worker processes, a seed).

    Raises argparse.ArgumentTypeError."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def output_dir(text: str) -> Path:
    """argparse type: a folder to write into (created later if missing); refused if it or a parent is a file.

    Raises argparse.ArgumentTypeError."""
    path = Path(text)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be a folder: {str(blocker)!r} is a file")
    return path


def output_file(text: str) -> Path:
    """argparse type: a file to write (its folder created later if missing); refused if it is an existing folder or
    a parent is a file. Raises argparse.ArgumentTypeError."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name, e.g. {str(path / 'out.png')!r}")
    output_dir(str(path.parent))
    return path
