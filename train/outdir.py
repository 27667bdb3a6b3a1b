"""The run folder (--out): owned by one run at a time, checked before any work, and written in an order that always
leaves a way forward.

One run per folder: rank 0 holds an exclusive `fcntl.flock` on <out>/.lock for the life of the run. The kernel drops
the lock when the process ends, however it ends, so a killed run never blocks the next one; a second run on the same
folder is refused in one line. A run that resumes a checkpoint into a folder holding files of another run (another
run_id) is refused too, and `--overwrite` removes the previous run's files only when the new run writes its first file,
after every input (flags, checkpoint, data, loaders, model) has been checked.

The commit order of an epoch is last.pt, then best.pt (when this epoch is the best so far), then metrics.json, which is
the commit record: it names the run (run_id), the epoch each checkpoint holds and whether the run finished
(predictions.npz and the plots are written last, then metrics.json once more with "finished": true). Every file is
written whole or not at all (`train.checkpoint.atomic_write`), so a kill at any instant leaves one of:
- no output file at all (the first epoch was not saved): the same command starts the run again;
- last.pt from epoch k, maybe with metrics.json still at epoch k-1, and best.pt one epoch behind if epoch k is the
  best: `--resume auto` continues, first copying last.pt to best.pt when the best epoch is the one last.pt holds;
- every epoch saved but no predictions or plots, or metrics.json not yet marked finished: `--resume auto` writes them.
SIGINT and SIGTERM are held back while an epoch's files are written (a second signal stops at once), then end the run
like Ctrl-C: one line saying what the folder holds, exit code 128 + the signal's number.

Temporaries that a killed run left in the folder (.NAME.xxxxxxxx.partial, or .NAME.tmp<pid> from older versions, for
this tool's file names only) are removed by the next run that holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.files import TEMP_SUFFIX, fsync_folder, os_reason, prove_writable
from train.checkpoint import (
    CheckpointError,
    OutputError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
    save_json,
)
from train.config import ConfigError
from train.dist import Dist

LOCK_NAME = ".lock"
PLOT_FILES = ("curves.png", "confusion.png", "misclassified.png")
# Every file a run writes into --out (tensorboard/ aside, which tensorboard appends to).
OUTPUT_FILES = ("metrics.json", "last.pt", "best.pt", "predictions.npz", *PLOT_FILES)
_PROBE = "write-check"  # the temporary that proves --out writable before any work
# Temporaries of this tool: mkstemp's 8 random characters (tempfile's alphabet) + TEMP_SUFFIX, or the .NAME.tmp<pid>
# of versions before this one. Nothing else in the folder is ever removed.
_STALE = re.compile(
    rf"^\.({'|'.join(map(re.escape, (*OUTPUT_FILES, _PROBE)))})\.(?:[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}|tmp\d+)$"
)


class Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the run unwinds as for Ctrl-C (lock released, temporaries removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; the message says what the folder holds and how to continue. `exit_code` is
    128 + the signal's number (130 for SIGINT, 143 for SIGTERM), what a shell reports for a process the signal
    killed, so schedulers and scripts read it as they would have without the handler."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code(stop: BaseException) -> int:
    """128 + the number of the signal behind `stop` (SIGINT for a plain KeyboardInterrupt)."""
    return 128 + getattr(stop, "signum", signal.SIGINT)


# --- the folder -------------------------------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """--out as one run owns it. On rank 0 (`owner`) it holds the lock and does every write; other ranks only read.
    `last_epoch` / `best_epoch`: the epoch <path>/last.pt / best.pt hold for this run (None: no such file of it)."""

    path: Path
    owner: bool
    epochs: int  # the run's --epochs, for messages
    run_id: str = ""
    last_epoch: int | None = None
    best_epoch: int | None = None
    resumed_from: Path | None = None
    _lock: int | None = None
    _created: list[Path] = field(default_factory=list)  # folders this run made, deepest first
    _replace: list[str] = field(default_factory=list)  # another run's files, removed just before the first write
    _best_copy: tuple[Path, int] | None = None  # (a checkpoint of the best epoch, that epoch): best.pt before writing
    _writing: bool = False

    # setup (rank 0) ---------------------------------------------------------------------------------------------------

    def claim(self) -> None:
        """Make sure --out is a writable folder, lock it, and remove this tool's stale temporaries from it. Raises
        ConfigError (file in the way, not writable, locked by another run, lock file replaced by a link)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} is a file, not a folder; choose a folder (it is created if missing)")
        try:
            self._created = [p for p in (path, *path.parents) if not os.path.lexists(p)]
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            self._created = []
            raise ConfigError(
                f"--out {path}: cannot create the folder ({os_reason(err)}); choose a folder you can write to"
            ) from None
        try:
            self._lock = _take_lock(path)
            for entry in os.scandir(path):
                if _STALE.match(entry.name) and not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.path)
            prove_writable(path, prefix=f".{_PROBE}.")
        except OSError as err:
            self.release()
            raise ConfigError(
                f"--out {path} is not writable ({os_reason(err)}); make it writable or choose another --out"
            ) from None
        except BaseException:
            self.release()
            raise

    def start_new(self, overwrite: bool) -> None:
        """A new run: a fresh run_id. Refuses (ConfigError) a folder holding another run's files unless `overwrite`;
        with it, those files stay until this run writes its first file."""
        self.run_id = uuid.uuid4().hex
        existing = self.outputs_present()
        if existing and not overwrite:
            raise ConfigError(
                f"--out {self.path} already holds another run ({', '.join(existing)}); use --resume auto to continue "
                "it, --overwrite to replace it, or another --out"
            )
        self._replace = existing

    def adopt(self, saved: dict, source: Path, best_epoch: int) -> None:
        """Continue the run of checkpoint `saved` (read from `source`, verified) in this folder. Refuses
        (CheckpointError) when the folder holds files of another run, or files this tool cannot vouch for, and when
        that run already finished. Plans the copy that brings best.pt to `best_epoch` (the best epoch of the
        checkpoint's history) when best.pt lags behind it (a kill between last.pt and best.pt)."""
        self.run_id, self.resumed_from = saved["run_id"], source
        here = self.path / "last.pt"
        own = os.path.lexists(here) and _same_file(source, here)
        present = self.outputs_present()
        if present:
            self._check_owner(saved, present, source_is_here=own)
        if own:
            self.last_epoch = saved["epoch"]
        if saved["epoch"] >= self.epochs and (not present or self._finished(saved["epoch"])):
            raise CheckpointError(f"{source}: that run already finished all {self.epochs} epochs; nothing to resume.")
        if self.best_epoch != best_epoch:
            sibling = source.parent / "best.pt"  # of the folder resumed from, when that is another one
            if saved["epoch"] == best_epoch:
                self._best_copy = (source, best_epoch)
            elif sibling.parent.resolve() != self.path.resolve() and _epoch_of(sibling, self.run_id) == best_epoch:
                self._best_copy = (sibling, best_epoch)

    def _check_owner(self, saved: dict, present: list[str], *, source_is_here: bool) -> None:
        theirs = f"resuming {self.resumed_from} there would mix the files of two runs. Resume into an empty --out"
        if not {"metrics.json", "last.pt", "best.pt"} & set(present):
            raise CheckpointError(
                f"--out {self.path} holds {', '.join(present)} but no metrics.json or checkpoint naming their run: "
                f"{theirs}."
            )
        if os.path.lexists(self.path / "metrics.json"):
            found = _read_json(self.path / "metrics.json")
            if found.get("run_id") != self.run_id:
                raise CheckpointError(
                    f"--out {self.path} holds another run (metrics.json names run {found.get('run_id')}, the "
                    f"checkpoint run {self.run_id}): {theirs}."
                )
        for name in ("last.pt", "best.pt"):
            if (name == "last.pt" and source_is_here) or not os.path.lexists(self.path / name):
                continue
            other = load_checkpoint(
                self.path / name,
                advice=f"Delete it and resume again (metrics.json then records which epoch {name} holds, if any), or "
                "resume into an empty --out.",
            )
            if other["run_id"] != self.run_id:
                raise CheckpointError(
                    f"--out {self.path} holds another run ({name} is from run {other['run_id']}, the checkpoint from "
                    f"run {self.run_id}): {theirs}."
                )
            if name == "last.pt":
                self.last_epoch = other["epoch"]
            else:
                self.best_epoch = other["epoch"]

    def _finished(self, epoch: int) -> bool:
        """Whether metrics.json records this run as finished with `epoch` epochs (predictions and plots written)."""
        path = self.path / "metrics.json"
        if not path.exists():
            return False
        found = _read_json(path)
        checkpoints = found.get("checkpoints")
        return found.get("finished") is True and isinstance(checkpoints, dict) and checkpoints.get("last.pt") == epoch

    def outputs_present(self) -> list[str]:
        """The names of OUTPUT_FILES in the folder (a symbolic link counts, wherever it points)."""
        return [name for name in OUTPUT_FILES if os.path.lexists(self.path / name)]

    # writes (rank 0), in commit order ---------------------------------------------------------------------------------

    def commit_epoch(self, checkpoint: dict, metrics: dict, *, best: bool) -> dict:
        """Write an epoch: last.pt, best.pt if `best`, then metrics.json (with run_id, the epoch each checkpoint holds
        and "finished": false added). SIGINT/SIGTERM wait until all three are written. Returns the metrics written.
        Raises OutputError saying what the folder still holds."""
        with deferred_signals(), self._explained():
            self._begin_writing()
            save_checkpoint(checkpoint, self.path / "last.pt")
            self.last_epoch = checkpoint["epoch"]
            if best:  # the same bytes: copied, not serialized a second time
                _copy_file(self.path / "last.pt", self.path / "best.pt")
                self.best_epoch = checkpoint["epoch"]
            return self._save_metrics(metrics, finished=False)

    def write_outputs(self, write: Callable[[], object]) -> None:
        """Run `write` (predictions.npz, the plots: each through atomic_write) as part of this run's writes."""
        with self._explained():
            self._begin_writing()
            write()

    def commit_finished(self, metrics: dict) -> dict:
        """metrics.json, last, with "finished": true: the run's files are complete. Returns the metrics written."""
        with self._explained():
            self._begin_writing()
            return self._save_metrics(metrics, finished=True)

    def _save_metrics(self, metrics: dict, *, finished: bool) -> dict:
        record = {
            **metrics,
            "run_id": self.run_id,
            "checkpoints": {"last.pt": self.last_epoch, "best.pt": self.best_epoch},
            "finished": finished,
        }
        save_json(record, self.path / "metrics.json")
        return record

    def _begin_writing(self) -> None:
        if self._writing:
            return
        self._writing = True
        # metrics.json first: a folder whose removal was cut short never has a commit record naming missing files
        for name in sorted(self._replace, key=lambda n: n != "metrics.json"):
            with suppress(FileNotFoundError):
                os.unlink(self.path / name)
        if self._replace:
            fsync_folder(self.path)
        self._replace = []
        if self._best_copy is not None:
            source, epoch = self._best_copy
            _copy_file(source, self.path / "best.pt")
            self.best_epoch, self._best_copy = epoch, None

    @contextmanager
    def _explained(self) -> Iterator[None]:
        try:
            yield
        except OutputError as err:
            fact, action = self.where_things_stand()
            remedy = {
                errno.ENOSPC: "free some space",
                errno.EDQUOT: "free some space",
                errno.EFBIG: "raise the file size limit (ulimit -f)",
                errno.EROFS: f"make {self.path} writable",
                errno.EACCES: f"make {self.path} writable",
                errno.EPERM: f"make {self.path} writable",
            }.get(err.errno, "fix that")
            raise OutputError(f"{err}; {fact}: {remedy}, then {action}.", err.errno) from None

    # what a stopped run leaves ----------------------------------------------------------------------------------------

    def where_things_stand(self) -> tuple[str, str]:
        """(what the folder holds for this run, what to run next), true at any point of the run."""
        if self.last_epoch is None:
            if self.resumed_from is not None:
                return f"{self.path} holds no checkpoint of this run yet", f"continue with --resume {self.resumed_from}"
            if self._replace:
                return f"the previous run's files in {self.path} are untouched", "run the same command again"
            return f"no epoch of this run was saved in {self.path}", "run the same command again to start over"
        if self.last_epoch >= self.epochs:
            return (
                f"{self.path / 'last.pt'} holds all {self.epochs} epochs",
                "--resume auto writes the predictions, plots and metrics.json that are missing",
            )
        return f"{self.path / 'last.pt'} holds epoch {self.last_epoch} of {self.epochs}", "continue with --resume auto"

    def release(self) -> None:
        """Drop the lock and remove the lock file; a run that wrote nothing also removes the folders it created."""
        if self._lock is not None:
            # Removing the file while holding the lock is safe: whoever opened it meanwhile finds, once it gets the
            # lock, that the name no longer points at its file, and starts over (`_take_lock`).
            with suppress(OSError):
                os.unlink(self.path / LOCK_NAME)
            os.close(self._lock)
            self._lock = None
        if not self._writing:
            for folder in self._created:
                with suppress(OSError):
                    folder.rmdir()
            self._created = []


@contextmanager
def run_folder(out: str | os.PathLike, dist: Dist, epochs: int) -> Iterator[RunFolder]:
    """--out for the life of the run: claimed (checked, locked, cleaned) on rank 0, released at the end however the
    run ends. A SIGINT/SIGTERM (KeyboardInterrupt) inside becomes `Interrupted`, whose message says what the folder
    holds. Raises ConfigError when the folder cannot be used (on every rank under torchrun)."""
    folder = RunFolder(Path(out), owner=dist.is_main, epochs=epochs)
    on_main(dist, folder.claim)
    try:
        yield folder
    except Interrupted:
        raise
    except KeyboardInterrupt as stop:
        name = signal.Signals(exit_code(stop) - 128).name
        if not folder.owner:
            message = f"interrupted by {name}; rank 0 reports what {folder.path} holds"
        else:
            fact, action = folder.where_things_stand()
            message = f"interrupted by {name}: {fact}; {action}"
        raise Interrupted(message, exit_code(stop)) from None
    finally:
        folder.release()


def on_main(dist: Dist, fn: Callable, *args: object) -> object:
    """`fn(*args)` on rank 0 only. Under torchrun every rank then raises the error rank 0 raised (ConfigError with
    the same message elsewhere), so that no rank goes on alone to wait for the others until the collective timeout.
    Returns fn's result on rank 0, None on the others."""
    error, result = None, None
    if dist.is_main:
        try:
            result = fn(*args)
        except (ConfigError, CheckpointError, OutputError) as err:
            error = err
    if dist.enabled:
        box = [None if error is None else str(error)]
        torch.distributed.broadcast_object_list(box, src=0)
        if error is None and box[0] is not None:
            error = ConfigError(box[0])
    if error is not None:
        raise error
    return result


def _take_lock(folder: Path) -> int:
    lock = folder / LOCK_NAME
    for _ in range(100):
        try:
            # O_NOFOLLOW: a link planted as .lock is refused, never followed; O_CLOEXEC: loader workers and other
            # child processes do not inherit (and so do not keep holding) the lock
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ConfigError(
                    f"{lock} is a symbolic link; a run never writes through links planted in its folder: remove it"
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(
                f"--out {folder} is in use by another run{f' (pid {holder})' if holder.isdigit() else ''}; wait "
                "for it to end, or choose another --out"
            ) from None
        try:
            current = os.stat(lock, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            with suppress(OSError):  # the pid is for the message above; the write probe checks writability
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the run that held it removed the file as it ended: lock the new one
    raise ConfigError(f"--out {folder}: could not take {lock} (it keeps being replaced); is another run starting?")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot tell which run it belongs to ({type(err).__name__}: {err}); resume into an empty --out"
        ) from None
    if not isinstance(found, dict):
        raise CheckpointError(
            f"{path}: holds a {type(found).__name__}, not a run's metrics; resume into an empty --out"
        )
    return found


def _epoch_of(path: Path, run_id: str) -> int | None:
    """The epoch of the checkpoint at `path` if it is a valid one of run `run_id`, else None."""
    if not path.is_file():
        return None
    try:
        saved = load_checkpoint(path)
    except CheckpointError:
        return None
    return saved["epoch"] if saved["run_id"] == run_id else None


# --- signals --------------------------------------------------------------------------------------------------------

# Module state, because signal handlers are process-wide: how deep inside `deferred_signals` the main thread is, and
# the signal that arrived there (raised when the outermost block ends).
_depth = 0
_pending: int | None = None


def _copy_file(source: Path, target: Path) -> None:
    """`target` written whole (atomic_write) with the bytes of `source`; OutputError if either cannot be used (the
    source is opened inside the write, so a failed read is reported as atomic_write reports a failed write)."""

    def copy(f) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    atomic_write(target, copy)


def _on_signal(signum: int, frame: object) -> None:
    global _pending
    # A scheduler signals the whole process group, so the loader's worker processes end too. torch's SIGCHLD handler
    # would report each as a failed worker (a RuntimeError in the middle of the epoch's writes, or a traceback from
    # the loader's shutdown); the run is stopping anyway, so their ends are left to that shutdown, unreported.
    # (A Python no-op, not SIG_DFL: a SIGCHLD already pending would otherwise be reported as "ignored due to race
    # condition".)
    signal.signal(signal.SIGCHLD, _ignore)
    if _depth and _pending is None:
        _pending = signum  # an epoch's files are being written: stop right after them
        return
    raise Stop(signum)  # not writing, or a second signal: stop now


def _ignore(signum: int, frame: object) -> None:
    pass


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM (what schedulers send) raise `Stop` (a KeyboardInterrupt) in the main thread, so that a
    stopped run unwinds and says what it saved; the previous handlers come back afterwards. (SIGCHLD, which a stop
    silences, stays silenced: the loader's workers are reaped after this block, and torch's handler would report
    each as a failure.) No-op off the main
    thread, where Python cannot install handlers."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending = None


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Inside, a first SIGINT/SIGTERM is held back and raised as `Stop` when the block ends normally; a second one
    stops at once. Used around the writes of one epoch, so that Ctrl-C or a scheduler never leaves them half done."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending is not None:
        signum, _pending = _pending, None
        raise Stop(signum)
