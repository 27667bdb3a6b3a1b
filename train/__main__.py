"""`python -m train --loader {dali,cpu} ...` (see --help). Errors the user can fix are one line and exit code 2.

SIGINT (Ctrl-C) and SIGTERM (what schedulers send to stop a job) end the run in one line that says what its folder
holds and how to continue, with exit code 128 + the signal's number (130, 143): what a shell reports for a process
the signal killed, so a scheduler reads the same status as without the handler (train/outdir.py).
"""

from __future__ import annotations

import os
import sys

from pipeline.cli import one_line, one_line_on_out_of_memory, say_error
from pipeline.dali_loader import DaliUnavailable
from pipeline.data import DataError
from train.checkpoint import CheckpointError, OutputError
from train.config import ConfigError, parse_config
from train.dist import lost_contact_message, lost_peer
from train.loop import Diverged
from train.outdir import Interrupted, exit_code, stop_signals


@one_line_on_out_of_memory("--batch-size (last.pt, if written, holds the last finished epoch: --resume auto)")
def cli(argv: list[str] | None = None) -> int:
    try:
        with stop_signals():
            cfg = parse_config(argv)
            from train.run import main

            main(cfg)
    except (ConfigError, DataError, CheckpointError, OutputError, DaliUnavailable) as err:
        say_error(str(err))
        return 2
    except Diverged as err:
        say_error(str(err))
        return 1
    except RuntimeError as err:  # after Diverged and DaliUnavailable, which are RuntimeErrors too
        if not lost_peer(err):
            raise  # a bug keeps its traceback
        print(one_line(lost_contact_message(err, os.environ.get("RANK", "?"))), file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(one_line(str(stop)), file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt as stop:  # before the run folder was opened
        print("interrupted before the run started; nothing was written", file=sys.stderr)
        return exit_code(stop)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
