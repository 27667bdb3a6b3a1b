"""`python -m train --loader {dali,cpu} ...` (see --help). Errors the user can fix are one line and exit code 2."""

from __future__ import annotations

import os
import sys

from pipeline.dali_loader import DaliUnavailable
from pipeline.data import DataError
from train.checkpoint import CheckpointError
from train.config import ConfigError, parse_config
from train.dist import lost_contact_message, lost_peer
from train.loop import Diverged


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        from train.run import main

        main(cfg)
    except (ConfigError, DataError, CheckpointError, DaliUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # after Diverged and DaliUnavailable, which are RuntimeErrors too
        if not lost_peer(err):
            raise  # a bug keeps its traceback
        print(lost_contact_message(err, os.environ.get("RANK", "?")), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is in <out>/last.pt; continue with --resume auto", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
