"""`python -m train ...` (see --help). A mistake the user can fix (pipeline.errors.UserError) is one line and its
exit code; Ctrl-C and SIGTERM end the run in one line that says what its folder holds and the command that continues
it, with exit code 128 + the signal's number (130, 143), what a shell reports for a process the signal killed."""

from __future__ import annotations

import os
import sys

from pipeline.cli import one_line, one_line_errors
from train.dist import lost_contact_message, lost_peer
from train.outdir import Interrupted, stop_signals


@one_line_errors("--batch-size (last.pt, if written, holds the last finished epoch: --resume auto)")
def cli(argv: list[str] | None = None) -> int:
    try:
        with stop_signals():
            from train.run import main

            main(argv)
    except RuntimeError as err:
        if not lost_peer(err):
            raise  # a bug keeps its traceback
        print(one_line(lost_contact_message(err, os.environ.get("RANK", "?"))), file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(one_line(str(stop)), file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt as stop:  # before the run folder was opened
        print("interrupted before the run started; nothing was written", file=sys.stderr)
        return 128 + getattr(stop, "signum", 2)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
