"""A UserError that reaches an entry point is one `error:` line with its kind's exit code (pipeline/cli.py)."""

from __future__ import annotations

import pytest

from pipeline.cli import one_line_errors
from pipeline.errors import ConfigError, DataError, Diverged, OutputError, UserError


@pytest.mark.parametrize("kind", [ConfigError, DataError, OutputError, Diverged], ids=lambda kind: kind.__name__)
def test_a_user_error_is_one_line_with_its_exit_code(kind: type[UserError], refused):
    @one_line_errors("--batch-size")
    def main(argv: list[str]) -> int:
        raise kind("what is wrong\nand a path with a line break")

    line = refused(main, [], exit_code=kind.exit_code)
    assert line == "error: what is wrong\\nand a path with a line break"


def test_a_bug_keeps_its_traceback():
    @one_line_errors("--batch-size")
    def main(argv: list[str]) -> int:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        main([])
