"""How a run's files are written and read back.

Every file a run writes (metrics.json, last.pt, best.pt, predictions.npz, the PNGs, also from `python -m
train.report`) goes through `atomic_write`, pipeline/files.py's `write_whole` with this package's error type and
test hooks: a reader sees the old file or the new one, never half of one.

A checkpoint is read back by `load_checkpoint`, which verifies it before anything trusts it: torch's zip container
and the CRC-32 of every member (a flipped bit anywhere is caught), then `torch.load(weights_only=True)` (data, never
code), then the types of its top-level fields. `first_difference` compares its tensors with a freshly built run's.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import zipfile
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

import torch

from pipeline.errors import CheckpointError, OutputError
from pipeline.files import os_reason, write_whole

# Test hook, for proving that a kill at any instant leaves a usable folder (tests/test_outputs.py): with
# TRAIN_TEST_KILL_AFTER=NAME:N:STAGE the process SIGKILLs itself during the N-th write of the file NAME, at STAGE
# "written" (the temporary is complete, the final name not yet replaced) or "replaced" (the rename is done).
KILL_ENV = "TRAIN_TEST_KILL_AFTER"
# Keys of a checkpoint (train/run.py `checkpoint_contents` fills them) and the type each must have.
CHECKPOINT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "run_id": str,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "ema": (dict, type(None)),
    "epoch": int,
    "config": dict,
    "history": list,
    "rng": dict,
}


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` whole or not at all (pipeline/files.py `write_whole`: a temporary beside it, fsynced, renamed
    onto it, the folder fsynced; an existing `path`, even a symbolic link, is replaced, never written through), with
    the KILL_ENV test hook at its "written" and "replaced" stages.

    Raises OutputError when the operating system refuses (no space, read-only, not a folder, ...); the temporary is
    removed then, as on any other exception (which propagates unchanged)."""
    path = Path(path)
    try:
        write_whole(path, write, at_stage=lambda stage: _test_kill(path.name, stage))
    except OSError as err:
        raise OutputError(f"could not write {path} ({os_reason(err)})", err.errno) from None


_writes: Counter[str] = Counter()


def _test_kill(name: str, stage: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    if stage == "written":
        _writes[name] += 1
    want_name, count, want_stage = spec.rsplit(":", 2)
    if (name, stage) == (want_name, want_stage) and _writes[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def save_json(obj: object, path: Path) -> None:
    """`obj` as indented JSON, atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_checkpoint(state: dict, path: Path) -> None:
    """`state` with torch.save (torch's zip format: CRC-32 per member, loadable with weights_only=True), atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


RESUME_ADVICE = "Resume from another checkpoint, or start a new run in another --out (or with --overwrite)."


def load_checkpoint(path: Path, advice: str = RESUME_ADVICE) -> dict:
    """A checkpoint written by `save_checkpoint`, verified: the zip's CRC-32s, then torch.load(weights_only=True) on
    the CPU, then the fields of CHECKPOINT_FIELDS with their types, `epoch` == len(history) >= 1 and each history row
    a dict numbered 1, 2, .... Raises CheckpointError: '<path>: <what is wrong>. <advice>'."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there to resume from. Drop --resume to start a new run.")
    try:
        state = _load_verified(path)
    except _Unusable as err:
        raise CheckpointError(f"{path}: {err}. {advice}") from None
    return state


class _Unusable(Exception):
    pass


def _load_verified(path: Path) -> dict:
    try:
        if path.stat().st_size == 0:
            raise _Unusable("the file is empty (0 bytes), not a checkpoint")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise _Unusable(f"truncated or corrupt checkpoint (not a complete zip archive: {err})") from None
    except OSError as err:
        raise _Unusable(f"cannot be read ({os_reason(err)})") from None
    if bad is not None:
        raise _Unusable(
            f"corrupt checkpoint: the CRC-32 of its member {bad} does not match its contents (the file changed after "
            "it was written)"
        )
    try:
        # weights_only: a checkpoint is data, never code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _Unusable(
            "holds objects other than tensors and plain Python data, which torch.load(weights_only=True) refuses to "
            "run; this tool never writes such a file"
        ) from None
    except Exception as err:  # anything else torch cannot decode: the file is unusable
        first_line = (str(err).splitlines() or [""])[0]
        raise _Unusable(f"truncated or corrupt checkpoint ({type(err).__name__}: {first_line})") from None
    problem = _field_problem(state)
    if problem:
        raise _Unusable(f"not a checkpoint of this tool: {problem}")
    return state


def _field_problem(state: object) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    missing = [k for k in CHECKPOINT_FIELDS if k not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    for key, kind in CHECKPOINT_FIELDS.items():
        value = state[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"its {key} is {_kind(value)}, not {_kind_name(kind)}"
    history, epoch = state["history"], state["epoch"]
    if epoch < 1 or epoch != len(history):
        return f"its epoch is {epoch} but its history has {len(history)} epochs"
    for i, row in enumerate(history):
        if not isinstance(row, dict) or row.get("epoch") != i + 1:
            return f"history row {i} is {_kind(row)}, not the metrics of epoch {i + 1}"
    return None


def first_difference(
    saved: object, expected: object, where: str, *, required: Collection[str] | None = None
) -> str | None:
    """Where `saved` differs in structure from `expected` (a freshly built state: model, optimizer, ... state dicts),
    as 'model.fc.weight is a float32 tensor of shape [10, 64], expected [10, 128]'; None when they agree. Compared:
    dict keys, list lengths, tensor shapes and dtypes, and the kind of every other value (numbers, str, bool, None);
    not the values themselves. With `required`, the dicts at this level need only hold those keys, and the others are
    compared where both have them: for state dicts whose keys change between torch versions (an optimizer's param
    groups, a scheduler), which their load_state_dict accepts."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"{where} is {_kind(saved)}, expected a tensor"
        if saved.shape != expected.shape or saved.dtype != expected.dtype:
            return f"{where} is {_kind(saved)}, expected {_kind(expected)}"
        return None
    if isinstance(expected, dict):
        if not isinstance(saved, dict):
            return f"{where} is {_kind(saved)}, expected a dict"
        missing = [str(k) for k in (expected if required is None else required) if k not in saved]
        extra = [str(k) for k in saved if k not in expected] if required is None else []
        if missing or extra:
            parts = [f"lacks {_some(missing)}" if missing else "", f"has unexpected {_some(extra)}" if extra else ""]
            return f"{where} {' and '.join(p for p in parts if p)}"
        for key, value in expected.items():
            found = first_difference(saved[key], value, f"{where}.{key}") if key in saved else None
            if found:
                return found
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(expected):
            return f"{where} is {_kind(saved)}, expected a list of {len(expected)}"
        for i, (s, e) in enumerate(zip(saved, expected, strict=True)):
            found = first_difference(s, e, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        same = type(saved) is type(expected)
    elif isinstance(expected, (int, float)):
        same = isinstance(saved, (int, float)) and not isinstance(saved, bool) and not math.isnan(saved)
    else:
        same = type(saved) is type(expected)
    return None if same else f"{where} is {_kind(saved)}, expected {_kind(expected)}"


def _kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    if value is None:
        return "None"
    name = "dict" if isinstance(value, dict) else type(value).__name__  # an OrderedDict is a dict to the reader
    if isinstance(value, (list, tuple)):
        return f"{_a(name)} of {len(value)}"
    if isinstance(value, (int, float, str)):
        shown = repr(value)
        return f"{_a(name)} ({shown if len(shown) <= 40 else shown[:37] + '...'})"
    return _a(name)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else _a(k.__name__) for k in kinds)


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
