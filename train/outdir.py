"""The run folder (--out): one run at a time, checked before any work, written in an order that always leaves a way
forward. docs/ describes the contract: the lock, the commit order (last.pt, best.pt, then metrics.json, the commit
record), what a kill at any instant leaves, and what each stop line says.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import CheckpointError, ConfigError, OutputError, UserError
from pipeline.files import TEMP_SUFFIX, fsync_folder, os_reason, prove_writable
from train.checkpoint import atomic_write, load_checkpoint, save_checkpoint, save_json
from train.dist import Dist

LOCK_NAME = ".lock"
PLOT_FILES = ("curves.png", "confusion.png", "misclassified.png")
# Every file a run writes into --out (tensorboard/ aside, which tensorboard appends to).
OUTPUT_FILES = ("metrics.json", "last.pt", "best.pt", "predictions.npz", *PLOT_FILES)
_PROBE = "write-check"  # the temporary that proves --out writable before any work
# Temporaries of this tool (mkstemp's 8 random characters + TEMP_SUFFIX, or the .NAME.tmp<pid> of older versions)
_STALE = re.compile(
    rf"^\.({'|'.join(map(re.escape, (*OUTPUT_FILES, _PROBE)))})\.(?:[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}|tmp\d+)$"
)


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal: the message says what the folder holds and how to continue; `exit_code` is 128 + the
    signal's number (130, 143), what a shell reports for a process the signal killed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunFolder:
    """--out as one run owns it: rank 0 (`owner`) holds the lock and does every write. `last_epoch` / `best_epoch`:
    the epoch last.pt / best.pt hold for this run (None: no such file of it)."""

    path: Path
    owner: bool
    epochs: int
    run_id: str = ""
    last_epoch: int | None = None
    best_epoch: int | None = None
    _lock: int | None = None
    _created: list[Path] = field(default_factory=list)  # folders this run made, deepest first
    _replace: list[str] = field(default_factory=list)  # another run's files, removed just before the first write
    _best_copy: tuple[Path, int] | None = None  # (a checkpoint of the best epoch, that epoch): best.pt before writing
    _writing: bool = False

    def claim(self) -> None:
        """Make --out a writable folder, lock it, and remove this tool's stale temporaries. Raises ConfigError."""
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
        """A new run: a fresh run_id. Refuses (ConfigError) another run's files unless `overwrite`; with it, they
        stay until this run writes its first file."""
        self.run_id = uuid.uuid4().hex
        existing = [name for name in OUTPUT_FILES if os.path.lexists(self.path / name)]
        if existing and not overwrite:
            raise ConfigError(
                f"--out {self.path} already holds another run ({', '.join(existing)}); use --resume auto to continue "
                "it, --overwrite to replace it, or another --out"
            )
        self._replace = existing

    def resume(self, saved: dict, source: Path, best_epoch: int | None) -> None:
        """Continue the run of checkpoint `saved`, read from `source` in this folder; when its best epoch is its last,
        best.pt is brought up to it before the first write (a kill may have left it behind). Raises ConfigError for a
        checkpoint of another folder, CheckpointError for a damaged best.pt or a run that already finished."""
        if source.resolve().parent != self.path.resolve():
            raise ConfigError(
                f"--resume {source}: a run continues in its own folder, not in --out {self.path}; use --out "
                f"{source.parent}, or copy that folder and resume the copy"
            )
        self.run_id = saved["run_id"]
        self.last_epoch = saved["epoch"] if source.name == "last.pt" else None
        best = self.path / "best.pt"
        if saved["epoch"] == best_epoch and not _same_file(source, best):
            self._best_copy = (source, best_epoch)
        elif os.path.lexists(best):
            advice = "Delete it and resume again, or start a new run in another --out."
            self.best_epoch = load_checkpoint(best, advice=advice)["epoch"]
        if saved["epoch"] >= self.epochs and self._finished():
            raise CheckpointError(f"{source}: that run already finished all {self.epochs} epochs; nothing to resume.")

    def _finished(self) -> bool:
        try:
            return json.loads((self.path / "metrics.json").read_text()).get("finished") is True
        except (OSError, ValueError, AttributeError):
            return False

    # writes (rank 0), in commit order ---------------------------------------------------------------------------------

    def commit_epoch(self, checkpoint: dict, metrics: dict, *, best: bool) -> dict:
        """Write an epoch: last.pt, best.pt if `best`, then metrics.json. Returns the metrics written."""
        with self._explained():
            save_checkpoint(checkpoint, self.path / "last.pt")
            self.last_epoch = checkpoint["epoch"]
            if best:  # the same bytes: copied, not serialized a second time
                _copy_file(self.path / "last.pt", self.path / "best.pt")
                self.best_epoch = checkpoint["epoch"]
            return self._save_metrics(metrics, finished=False)

    def write_outputs(self, write: Callable[[], object]) -> None:
        """Run `write` (predictions.npz, the plots) as part of this run's writes."""
        with self._explained():
            write()

    def commit_finished(self, metrics: dict) -> dict:
        """metrics.json, last, with "finished": true. Returns the metrics written."""
        with self._explained():
            return self._save_metrics(metrics, finished=True)

    def _save_metrics(self, metrics: dict, *, finished: bool) -> dict:
        checkpoints = {"last.pt": self.last_epoch, "best.pt": self.best_epoch}
        record = {**metrics, "run_id": self.run_id, "checkpoints": checkpoints, "finished": finished}
        save_json(record, self.path / "metrics.json")
        return record

    @contextmanager
    def _explained(self) -> Iterator[None]:
        """The first write of the run first removes the previous run's files (--overwrite) and brings best.pt up to
        date. An OutputError inside is raised again saying what the folder holds and what to do."""
        try:
            if not self._writing:
                self._writing = True
                # metrics.json first: a removal cut short never leaves a commit record naming missing files
                for name in sorted(self._replace, key=lambda n: n != "metrics.json"):
                    with suppress(FileNotFoundError):
                        os.unlink(self.path / name)
                if self._replace:
                    fsync_folder(self.path)
                if self._best_copy is not None:
                    _copy_file(self._best_copy[0], self.path / "best.pt")
                    self.best_epoch = self._best_copy[1]
            yield
        except OutputError as err:
            fact, action = self.where_things_stand()
            remedy = {
                errno.ENOSPC: "free some space",
                errno.EDQUOT: "free some space",
                errno.EFBIG: "raise the file size limit (ulimit -f)",
            }.get(err.errno or 0, f"make {self.path} writable")
            raise OutputError(f"{err}; {fact}: {remedy}, then {action}.", err.errno) from None

    def where_things_stand(self) -> tuple[str, str]:
        """(what the folder holds for this run, what to run next), true at any point of the run."""
        resume = f"continue with: python -m train --resume auto --out {shlex.quote(str(self.path))}"
        if self.last_epoch is None:
            if self._replace and not self._writing:
                return f"the previous run's files in {self.path} are untouched", "run the same command again"
            return f"no epoch of this run was saved in {self.path}", "run the same command again to start over"
        if self.last_epoch >= self.epochs:
            return f"{self.path / 'last.pt'} holds all {self.epochs} epochs", resume
        return f"{self.path / 'last.pt'} holds epoch {self.last_epoch} of {self.epochs}", resume

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
    """--out for the life of the run, claimed on rank 0 and released however the run ends. A Ctrl-C or SIGTERM
    inside becomes `Interrupted`. Raises ConfigError when the folder cannot be used (on every rank)."""
    folder = RunFolder(Path(out), owner=dist.is_main, epochs=epochs)
    on_main(dist, folder.claim)
    try:
        yield folder
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        if not folder.owner:
            message = f"interrupted by {name}; rank 0 reports what {folder.path} holds"
        else:
            fact, action = folder.where_things_stand()
            message = f"interrupted by {name}: {fact}; {action}"
        raise Interrupted(message, 128 + signum) from None
    finally:
        folder.release()


def on_main(dist: Dist, fn: Callable, *args: object) -> object:
    """`fn(*args)` on rank 0; every rank then raises the error rank 0 raised (as a ConfigError elsewhere), so that no
    rank waits for the others until the collective timeout. Returns fn's result on rank 0, None elsewhere."""
    error, result = None, None
    if dist.is_main:
        try:
            result = fn(*args)
        except UserError as err:
            error = err
    if dist.enabled:
        box = [None if error is None else str(error)]
        torch.distributed.broadcast_object_list(box, src=0)
        if error is None and box[0] is not None:
            error = ConfigError(box[0])
    if error is not None:
        raise error
    return result


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM (what schedulers send) raise KeyboardInterrupt in the main thread, so that a stopped run
    unwinds and says what it saved. No-op off the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _on_stop(signum: int, frame: object) -> None:
    # A scheduler signals the whole process group, so the loader's workers end too; torch's SIGCHLD handler would
    # report each as a failed worker. The run is stopping anyway: their ends are left to the loader's shutdown.
    # (A Python no-op, not SIG_DFL, which would report a pending SIGCHLD as "ignored due to race condition".)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stop = KeyboardInterrupt()
    stop.signum = signum  # type: ignore[attr-defined]
    raise stop


def _take_lock(folder: Path) -> int:
    lock = folder / LOCK_NAME
    for _ in range(100):
        try:
            # O_NOFOLLOW: a link planted as .lock is refused, never followed; O_CLOEXEC: child processes do not
            # inherit (and so do not keep holding) the lock
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
        with suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False)):
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


def _copy_file(source: Path, target: Path) -> None:
    """`target` written whole with the bytes of `source` (read inside the write, so a failed read is an OutputError)."""

    def copy(f) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    atomic_write(target, copy)
