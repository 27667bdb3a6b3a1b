"""Atomic files: checkpoints and metrics are written to a temporary file and renamed, so a crash never leaves half."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_json(obj: object, path: Path) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_checkpoint(state: dict, path: Path) -> None:
    _atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there to resume from. Drop --resume to start a new run.")
    try:
        # weights_only: a checkpoint is data, never code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, ...: all mean the file is unusable
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:120]}). "
            "Delete it to start over (--overwrite), or resume from another checkpoint."
        ) from None
    missing = {"model", "optimizer", "scheduler", "epoch", "config", "history"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this tool (missing {', '.join(sorted(missing))}).")
    return state
