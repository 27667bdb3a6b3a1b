"""A run's files, each written whole or not at all (`atomic_write`), and its checkpoints: their schema (FIELDS),
verification (`load_checkpoint`: every zip member's CRC-32, then torch.load(weights_only=True), then the fields) and
restore into the state the run built (`restore`: load_state_dict(strict=True) names what does not fit)."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from torch import nn

from pipeline.errors import CheckpointError, OutputError
from pipeline.files import os_reason, write_whole

if TYPE_CHECKING:
    from train.config import TrainConfig

# The checkpoint's schema: its keys (`contents` fills them) and the type of each.
FIELDS: dict[str, type | tuple[type, ...]] = {
    "run_id": str,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "ema": (dict, type(None)),
    "epoch": int,
    "config": dict,
    "history": list,
    "commands": list,
    "rng": dict,
}
ADVICE = "Start a new run in another --out, or in this one with --overwrite."


@dataclass
class RunState:
    """What a checkpoint holds and a resumed run restores."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: torch.optim.swa_utils.AveragedModel | None
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    commands: list[dict] = field(default_factory=list)  # each command of the run: its command line and wall seconds


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` whole or not at all (pipeline/files.py `write_whole`). Raises OutputError when the operating
    system refuses (no space, read-only, ...); other exceptions propagate."""
    try:
        write_whole(path, write)
    except OSError as err:
        raise OutputError(f"could not write {path} ({os_reason(err)})", err.errno) from None


def save_json(obj: object, path: Path) -> None:
    """`obj` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_checkpoint(state: dict, path: Path) -> None:
    """`state` with torch.save (a zip with a CRC-32 per member, loadable with weights_only=True), atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def contents(state: RunState, cfg: TrainConfig, device: torch.device, run_id: str) -> dict:
    """The checkpoint of `state` (FIELDS): everything a resumed run needs to compute exactly what an uninterrupted one
    would have. The loaders need no state: they derive order and augmentations from (seed, epoch)."""
    return {
        "run_id": run_id,
        "model": state.net.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "epoch": len(state.history),
        "config": asdict(cfg),
        "history": state.history,
        "commands": state.commands,
        "rng": rng_state(device),
    }


def load_checkpoint(path: Path, advice: str = ADVICE) -> dict:
    """The checkpoint at `path`, verified: every zip member's CRC-32, torch.load(weights_only=True) onto the CPU,
    the FIELDS and their types, and `epoch` == len(history) >= 1. Raises CheckpointError '<path>: <what>. <advice>'."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there to resume from. Drop --resume to start a new run.")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"corrupt checkpoint: the CRC-32 of its member {bad} does not match its contents")
        state = torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint is data, never code
        if isinstance(state, dict):
            state.setdefault("commands", [])  # checkpoints of earlier versions did not record the commands
        problem = _field_problem(state)
        if problem:
            raise CheckpointError(f"not a checkpoint of this tool: {problem}")
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}. {advice}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({os_reason(err)}). {advice}") from None
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain Python data, which torch.load(weights_only=True) "
            f"refuses to run; this tool never writes such a file. {advice}"
        ) from None
    except Exception as err:  # anything else zipfile or torch cannot decode (BadZipFile, ...): the file is unusable
        first_line = (str(err).splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {first_line}). {advice}"
        ) from None
    return state


def _field_problem(state: object) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    for key, kind in FIELDS.items():
        if key not in state:
            return f"it lacks {key}"
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            return f"its {key} is {type(state[key]).__name__}, not {names}"
    if not 1 <= state["epoch"] == len(state["history"]):
        return f"its epoch is {state['epoch']} but its history has {len(state['history'])} epochs"
    if any(not isinstance(row, dict) or row.get("epoch") != i + 1 for i, row in enumerate(state["history"])):
        return "its history is not one metrics row per epoch, numbered 1, 2, ..."
    return None


def restore(state: RunState, saved: dict, path: Path, device: torch.device) -> None:
    """Put checkpoint `saved` (read from `path`) back into `state`, the state this run's settings built: strictly, so
    that weights of another shape or network are refused. Raises CheckpointError naming what does not fit."""
    try:
        if (state.ema is None) != (saved["ema"] is None):
            raise ValueError(f"the checkpoint has {'no ' if saved['ema'] is None else ''}weight EMA, the run does")
        state.net.load_state_dict(saved["model"], strict=True)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        if state.ema is not None:
            state.ema.load_state_dict(saved["ema"], strict=True)
        set_rng_state(saved["rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:] or [str(err)])
        raise CheckpointError(
            f"{path}: does not fit the run these settings build ({detail[:300]}). Resume from a checkpoint this tool "
            "wrote with the same settings, or start a new run in another --out."
        ) from None
    state.history, state.commands = list(saved["history"]), list(saved["commands"])


def rng_state(device: torch.device) -> dict:
    """torch's CPU generator and, on CUDA, the device's: the random state a run carries between epochs."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(saved: dict, device: torch.device) -> None:
    """Go back to a state from `rng_state`."""
    torch.set_rng_state(saved["torch"])
    if device.type == "cuda" and saved.get("cuda") is not None:
        torch.cuda.set_rng_state(saved["cuda"], device)
