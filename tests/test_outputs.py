"""The run folder and its checkpoints: one run per folder, every file whole or not at all in an order that always leaves
a way forward (a kill at any write, a stop signal, a full disk), resuming as the stop line says, nothing planted in the
folder written through, and a checkpoint verified before it is trusted."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import ROOT, epochs_of, metrics_of, run_train, small_run_args

import model as models

# Every file a run writes into --out (train/outdir.py OUTPUT_FILES, spelled out here as the specification)
OUTPUT_FILES = (
    "metrics.json",
    "last.pt",
    "best.pt",
    "predictions.npz",
    "curves.png",
    "confusion.png",
    "misclassified.png",
)

ARGS = ("--loader", "cpu")  # the epoch count comes from small_run_args: 2


def cli(capsys, *args: str) -> tuple[int, str]:
    """`python -m train` in this process (no interpreter start-up): (exit code, stderr)."""
    from train.__main__ import cli as train_cli

    code = train_cli(list(args))
    return code, capsys.readouterr().err


def train_cli(argv: list[str]) -> int:
    from train.__main__ import cli as train_cli

    return train_cli(argv)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock")


@pytest.fixture
def no_data_reading(monkeypatch):
    """Refusals must come before any data is read: reading it fails the test."""
    import train.run

    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the refusal")

    monkeypatch.setattr(train.run, "load_data", refuse)


def _stop_at_epoch(index: int):
    """A train.run.train_and_evaluate that stops the run (Ctrl-C) when epoch `index` (0-based) begins."""
    import train.run

    original = train.run.train_and_evaluate

    def stopping(epoch, *args, **kwargs):
        if epoch == index:
            raise KeyboardInterrupt
        return original(epoch, *args, **kwargs)

    return stopping


@pytest.fixture(scope="module")
def finished(tiny_cifar, tmp_path_factory) -> Path:
    """A finished 2-epoch run (ARGS, seed 0). Copy it before changing anything."""
    from train.__main__ import cli as train_cli

    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_cli(small_run_args(tiny_cifar, out, *ARGS)) == 0
    return out


@pytest.fixture(scope="module")
def halfway(tiny_cifar, tmp_path_factory) -> Path:
    """The folder of a 2-epoch run (ARGS, seed 1) stopped by Ctrl-C as its second epoch began: last.pt holds epoch 1,
    and the stop line says so with the command that continues it."""
    import contextlib
    import io

    import train.run
    from train.__main__ import cli as train_cli

    out, stderr = tmp_path_factory.mktemp("halfway") / "run", io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(train.run, "train_and_evaluate", _stop_at_epoch(1))
        assert train_cli(small_run_args(tiny_cifar, out, *ARGS, "--seed", "1")) == 130
    assert stderr.getvalue() == (
        f"interrupted by SIGINT: {out / 'last.pt'} holds epoch 1 of 2; continue with: python -m train --resume auto "
        f"--out {out}\n"
    )
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    return out


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


# --- kind 1: one run per folder -------------------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
import train.run
from train.__main__ import cli
original, gate = train.run.train_and_evaluate, Path(sys.argv[1])
def held(*args, **kwargs):
    deadline = time.monotonic() + 240
    while not gate.exists() and time.monotonic() < deadline:  # the test lets the run go on
        time.sleep(0.05)
    return original(*args, **kwargs)
train.run.train_and_evaluate = held
sys.exit(cli(sys.argv[2:]))
"""


@pytest.mark.slow  # interpreter start-ups: more than 5 s
def test_a_second_run_on_a_folder_in_use_is_refused(tiny_cifar, tmp_path, refused, no_data_reading):
    out, gate = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(gate), *small_run_args(tiny_cifar, out, *ARGS)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        while "parameters |" not in first.stdout.readline():  # set up, then held before its first epoch
            assert first.poll() is None, first.stderr.read()
        for extra in ([], ["--overwrite"]):
            line = refused(train_cli, small_run_args(tiny_cifar, out, *ARGS, "--seed", "5", *extra))
            assert f"--out {out} is in use by another run (pid {first.pid})" in line
    finally:
        gate.touch()
        _, first_stderr = first.communicate(timeout=300)
    assert first.returncode == 0, first_stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["seed"] == 0 and metrics["finished"]
    for name in ("last.pt", "best.pt"):  # every file is the first run's
        assert torch.load(out / name, weights_only=True)["run_id"] == metrics["run_id"]
    assert not (out / ".lock").exists()  # removed by the run that held it


@pytest.mark.slow  # interpreter start-ups: more than 5 s
def test_a_torchrun_job_on_a_folder_in_use_is_refused_on_every_rank(tiny_cifar, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    command = [*launcher, "-m", "train", *small_run_args(tiny_cifar, out, *ARGS, "--epochs", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAIN_DIST_TIMEOUT_S": "60"}
    with open(out / ".lock", "w") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()}\n")
        held.flush()
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode != 0
    refusal = f"error: --out {out} is in use by another run (pid {os.getpid()})"
    assert result.stderr.count(refusal) == 2  # rank 0 found it, rank 1 heard it: nobody waits for the other
    assert "lost contact" not in result.stderr and not (out / "metrics.json").exists()


def test_a_link_planted_as_the_lock_file_is_refused(tiny_cifar, tmp_path, refused, no_data_reading):
    out, victim = tmp_path / "run", tmp_path / "victim"
    out.mkdir()
    victim.write_text("keep me")
    (out / ".lock").symlink_to(victim)
    assert f"{out / '.lock'} is a symbolic link" in refused(train_cli, small_run_args(tiny_cifar, out, *ARGS))
    assert victim.read_text() == "keep me"


def test_resume_auto_alone_continues_with_the_checkpoints_settings(halfway, tiny_cifar, tmp_path, capsys, refused):
    out = copy_of(halfway, tmp_path)
    before = snapshot(out)
    line = refused(train_cli, ["--resume", "auto", "--out", str(out), "--epochs", "3", "--lr", "0.1"])
    assert "was written with other settings (epochs: 2 -> 3; lr: 0.05 -> 0.1)" in line
    assert snapshot(out) == before
    # no data folder given: the checkpoint's; flags about where things go and how they are shown may change
    code, stderr = cli(capsys, "--resume", "auto", "--out", str(out), "--progress", "--workers", "1")
    assert code == 0, stderr
    metrics = metrics_of(out)
    assert metrics["config"]["seed"] == 1 and metrics["config"]["data_dir"] == tiny_cifar
    assert [c["command"] for c in metrics["commands"]] == [
        "python -m train " + " ".join(small_run_args(tiny_cifar, halfway, *ARGS, "--seed", "1")),
        f"python -m train --resume auto --out {out} --progress --workers 1",
    ]
    # wall_seconds sums the commands (each keeps its own), so it covers the time the epochs took
    assert metrics["wall_seconds"] == pytest.approx(sum(c["wall_seconds"] for c in metrics["commands"]))
    assert metrics["wall_seconds"] >= metrics["train_seconds"] + metrics["eval_seconds"]
    assert "recipe" not in metrics and "recipe" in metrics["config"]  # once, in the config


def test_a_checkpoint_resumes_only_in_its_own_folder(halfway, tiny_cifar, tmp_path, refused):
    other = tmp_path / "other"
    line = refused(train_cli, ["--resume", str(halfway / "last.pt"), "--out", str(other)])
    assert f"--resume {halfway / 'last.pt'}: a run continues in its own folder" in line
    assert not other.exists()


def test_overwrite_keeps_the_old_run_until_every_input_is_checked(finished, tiny_cifar, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    mistyped = small_run_args(tiny_cifar, out, *ARGS, "--overwrite")
    mistyped[mistyped.index("--data-dir") + 1] = str(tmp_path / "cifar-typo")
    code, stderr = cli(capsys, *mistyped)
    assert code == 2 and "cifar-typo: folder not found" in stderr
    assert snapshot(out) == before and not (out / ".lock").exists()


def test_overwrite_leaves_no_file_of_the_old_run(finished, tiny_cifar, tmp_path, capsys, monkeypatch):
    import train.run

    out = copy_of(finished, tmp_path)
    monkeypatch.setattr(train.run, "train_and_evaluate", _stop_at_epoch(1))
    code, _ = cli(capsys, *small_run_args(tiny_cifar, out, *ARGS, "--seed", "3", "--overwrite"))
    assert code == 130
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["seed"] == 3 and len(metrics["epochs"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.json"]  # no old plots, no npz
    for name in ("last.pt", "best.pt"):
        assert torch.load(out / name, weights_only=True)["run_id"] == metrics["run_id"]


# --- kind 2: whole files, in an order that always leaves a way forward ----------------------------------------------

# Kill points (NAME:N:STAGE: SIGKILL in the N-th write of file NAME, at STAGE "written", the temporary complete, or
# "replaced", the name replaced; see KILLING) of a 2-epoch run whose second epoch is its
# best. Writes in order: last.pt 1, best.pt 1, metrics.json 1, last.pt 2, best.pt 2, metrics.json 2, predictions.npz,
# curves.png, confusion.png, misclassified.png, metrics.json 3 (finished).
KILL_POINTS = [
    "last.pt:1:written",  # during the first checkpoint: nothing saved, a fresh start
    "last.pt:1:replaced",  # between last.pt and best.pt of epoch 1
    "best.pt:1:replaced",  # between best.pt and metrics.json of epoch 1
    "metrics.json:1:written",  # during the first commit record
    "best.pt:2:written",  # during best.pt of the last epoch: best.pt one epoch behind last.pt
    "metrics.json:2:replaced",  # every epoch saved, no predictions or plots yet
    "predictions.npz:1:written",
    "confusion.png:1:written",
    "metrics.json:3:written",  # everything but the record that the run finished
]


KILLING = """
import os, signal, sys
from collections import Counter
import train.checkpoint
from train.__main__ import cli
name, count, stage = sys.argv[1].rsplit(":", 2)
write, writes = train.checkpoint.write_whole, Counter()  # every file of a run is written through it
def killing(path, fill, at_stage=None):
    def at(reached):
        writes[os.path.basename(path), reached] += 1
        if (os.path.basename(path), reached) == (name, stage) and writes[name, reached] == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
    return write(path, fill, at_stage=at)
train.checkpoint.write_whole = killing
sys.exit(cli(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_at_any_write_leaves_a_folder_that_resumes_or_restarts(finished, tiny_cifar, tmp_path, point):
    reference = json.loads((finished / "metrics.json").read_text())
    accuracy = [e["test_acc"] for e in reference["epochs"]]
    assert accuracy[1] > accuracy[0]  # the premise of "best.pt:2": the last epoch is the best
    out = tmp_path / "run"
    command = [sys.executable, "-c", KILLING, point, *small_run_args(tiny_cifar, out, *ARGS)]
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point.endswith(":written"):
        assert temporaries(out)  # the kill left a half-written temporary (and no half-written output)
    # The way forward: `--resume auto --out` alone when last.pt exists, else the same command (no --overwrite needed)
    again = (
        ["--resume", "auto", "--out", str(out)]
        if (out / "last.pt").exists()
        else small_run_args(tiny_cifar, out, *ARGS)
    )
    result = run_train(*again)
    assert result.returncode == 0, result.stderr
    assert epochs_of(out) == epochs_of(finished)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["checkpoints"] == {"last.pt": 2, "best.pt": 2}
    assert {p.name for p in out.iterdir()} == set(OUTPUT_FILES)  # every output, no temporary, no lock
    for name, epoch in (("last.pt", 2), ("best.pt", 2)):
        saved = torch.load(out / name, weights_only=True)
        assert saved["epoch"] == epoch and saved["run_id"] == metrics["run_id"]
    with np.load(out / "predictions.npz") as got, np.load(finished / "predictions.npz") as want:
        assert all(np.array_equal(got[key], want[key]) for key in want.files)  # the final model's, as uninterrupted
    from train.report import main as report

    assert report([str(out)]) == 0


@pytest.mark.slow
def test_stale_temporaries_of_killed_runs_are_removed(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ours = [".last.pt.tmp4242", ".best.pt.k2j4h5g6.partial", ".curves.png.tmp77", ".predictions.npz.abc_1234.partial"]
    theirs = [".notes.tmp1", ".last.pt.backup", "last.pt.tmp3", ".bashrc"]
    for name in ours + theirs:
        (out / name).write_bytes(b"x" * 1000)
    code, stderr = cli(capsys, *small_run_args(tiny_cifar, out, *ARGS, "--epochs", "1"))
    assert code == 0, stderr
    assert not any((out / name).exists() for name in ours)
    assert all((out / name).read_bytes() == b"x" * 1000 for name in theirs)


STOPPING = """
import os, signal, sys
import torch
import train.run
from train.__main__ import cli
where, epoch, signum = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
if where == "epoch":
    original = train.run.train_and_evaluate
    def stopping(index, *args, **kwargs):
        if index == epoch:
            os.kill(os.getpid(), signum)
        return original(index, *args, **kwargs)
    train.run.train_and_evaluate = stopping
else:  # during the write of the first checkpoint
    import train.checkpoint
    write, calls = train.checkpoint.write_whole, []  # every file of a run is written through it
    def stopping(path, fill, **kwargs):  # the signal lands mid-write: the temporary is open and partly written
        calls.append(1)
        def filling(f):
            f.write(b"part")
            if len(calls) == 1:
                os.kill(os.getpid(), signum)
            f.seek(0)
            f.truncate()
            return fill(f)
        return write(path, filling, **kwargs)
    train.checkpoint.write_whole = stopping
sys.exit(cli(sys.argv[4:]))
"""


def _stopped(tiny_cifar: str, out: Path, where: str, epoch: int, name: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", STOPPING, where, str(epoch), name, *small_run_args(tiny_cifar, out, *ARGS)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # interpreter start-ups: more than 5 s
@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_before_the_first_epoch_is_saved(tiny_cifar, tmp_path, name, code):
    out = tmp_path / "run"
    result = _stopped(tiny_cifar, out, "epoch", 0, name)
    assert result.returncode == code
    assert result.stderr.strip() == (
        f"interrupted by {name}: no epoch of this run was saved in {out}; run the same command again to start over"
    )
    assert not out.exists()  # nothing saved: the folder this run created is gone again
    assert run_train(*small_run_args(tiny_cifar, out, *ARGS)).returncode == 0  # the same command, no --overwrite


@pytest.mark.slow  # interpreter start-ups: more than 5 s
def test_sigterm_after_an_epoch_keeps_it_and_says_so(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    result = _stopped(tiny_cifar, out, "epoch", 1, "SIGTERM")
    assert result.returncode == 143
    assert result.stderr.strip() == (
        f"interrupted by SIGTERM: {out / 'last.pt'} holds epoch 1 of 2; continue with: python -m train --resume auto "
        f"--out {out}"
    )
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert run_train(*small_run_args(tiny_cifar, out, *ARGS, "--resume", "auto")).returncode == 0


@pytest.mark.slow  # interpreter start-ups: more than 5 s
def test_sigterm_while_an_epoch_is_written_leaves_whole_files(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    result = _stopped(tiny_cifar, out, "write", 0, "SIGTERM")  # during last.pt of epoch 1
    assert result.returncode == 143
    assert result.stderr.strip() == (
        f"interrupted by SIGTERM: no epoch of this run was saved in {out}; run the same command again to start over"
    )
    assert list(out.iterdir()) == []  # the half-written temporary is gone


@pytest.mark.slow  # interpreter start-ups: more than 5 s
def test_sigterm_to_the_whole_process_group_with_loader_workers_is_one_line(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(tiny_cifar, out, *ARGS, "--workers", "2", "--epochs", "30", "--batch-size", "16")
    job = subprocess.Popen(  # as a scheduler runs it: its own process group, which is signalled as a whole
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        while "epoch 2/30:" not in job.stdout.readline():  # epoch 1 is saved, epoch 2 maybe
            assert job.poll() is None, job.stderr.read()
        os.killpg(job.pid, signal.SIGTERM)  # the main process and its DataLoader workers
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 143
    epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    resume = f"continue with: python -m train --resume auto --out {out}"
    assert stderr == f"interrupted by SIGTERM: {out / 'last.pt'} holds epoch {epoch} of 30; {resume}\n"


# --- kind 3: nothing planted in the folder is written through -------------------------------------------------------


@pytest.mark.slow
def test_outputs_replace_planted_links_instead_of_writing_through_them(finished, tiny_cifar, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in OUTPUT_FILES:
        (victims / name).write_text(f"not yours: {name}")
        (out / name).unlink()
        (out / name).symlink_to(victims / name)
    code, stderr = cli(capsys, *small_run_args(tiny_cifar, out, *ARGS, "--overwrite"))
    assert code == 0, stderr
    for name in OUTPUT_FILES:
        assert (victims / name).read_text() == f"not yours: {name}"
        assert (out / name).is_file() and not (out / name).is_symlink()
    # python -m train.report too
    (out / "curves.png").unlink()
    (out / "curves.png").symlink_to(victims / "curves.png")
    from train.report import main as report

    assert report([str(out)]) == 0
    assert (victims / "curves.png").read_text() == "not yours: curves.png" and not (out / "curves.png").is_symlink()


def test_a_link_at_a_predictable_temporary_name_receives_nothing(tmp_path):
    from train.checkpoint import save_checkpoint, save_json

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("best.pt", "metrics.json"):  # the names the previous version used
        (out / f".{name}.tmp{os.getpid()}").symlink_to(victim)
    save_checkpoint({"w": torch.ones(3)}, out / "best.pt")
    save_json({"epochs": []}, out / "metrics.json")
    assert victim.read_text() == "keep me"
    assert torch.load(out / "best.pt", weights_only=True)["w"].sum() == 3


# --- kind 4: a checkpoint is verified before it is trusted ----------------------------------------------------------


def _flip_a_bit_in_the_weights(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = member.header_offset  # a zip local header: 30 bytes, then the name and the extra field
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    data[header + 30 + name_length + extra_length + member.file_size // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _edited(change):
    def write(source: Path, target: Path) -> None:
        saved = torch.load(source, weights_only=True)
        change(saved)
        torch.save(saved, target)

    return write


def _raw(content: bytes):
    return lambda source, target: target.write_bytes(content)


def _bit_flipped(source: Path, target: Path) -> None:
    shutil.copy(source, target)
    _flip_a_bit_in_the_weights(target)


def _first(state: dict) -> int:
    return next(iter(state))


CORRUPTIONS = {
    "empty file": (_raw(b""), "truncated or corrupt checkpoint (BadZipFile"),
    "not a zip": (_raw(b"PK\x03\x04 and then nothing much"), "truncated or corrupt checkpoint (BadZipFile"),
    "one flipped bit": (_bit_flipped, "does not match its contents"),
    "code, not data": (
        _edited(lambda s: s.update(config=argparse_namespace())),
        "objects other than tensors and plain Python data",
    ),
    "config not a dict": (_edited(lambda s: s.update(config=["seed"])), "its config is list, not dict"),
    "epoch not a number": (_edited(lambda s: s.update(epoch="1")), "its epoch is str, not int"),
    "epoch beyond its history": (_edited(lambda s: s.update(epoch=2)), "its epoch is 2 but its history has 1"),
    "history not a list": (_edited(lambda s: s.update(history="epoch 1")), "its history is str, not list"),
    "run id not a string": (_edited(lambda s: s.update(run_id=7)), "its run_id is int, not str"),
}
# Checkpoints that are whole and of this tool, but of another network or settings: refused by load_state_dict
MISFITS = {
    "weights of another model": (
        _edited(lambda s: s.update(model=models.build("dwres").state_dict())),
        "Missing key(s) in state_dict",
    ),
    "a weight of another shape": (
        _edited(lambda s: s["model"].update({_first(s["model"]): torch.zeros(2, 2)})),
        "size mismatch for",
    ),
    "rng of the wrong type": (_edited(lambda s: s["rng"].update(torch=torch.zeros(3))), "does not fit the run"),
    "optimizer with a missing group": (
        _edited(lambda s: s["optimizer"].update(param_groups=s["optimizer"]["param_groups"][:1])),
        "different number of parameter groups",
    ),
    "an EMA the run does not have": (_edited(lambda s: s.update(ema=s["model"])), "the checkpoint has weight EMA"),
}


def argparse_namespace():
    import argparse

    return argparse.Namespace(seed=1)


def _refused_resume(refused, halfway: Path, tmp_path: Path, make) -> str:
    """`--resume auto --out` a copy of `halfway` whose last.pt `make` wrote: the one error line, and nothing changed."""
    out = copy_of(halfway, tmp_path)
    make(halfway / "last.pt", out / "last.pt")
    before = snapshot(out)
    line = refused(train_cli, ["--resume", "auto", "--out", str(out)])
    assert snapshot(out) == before  # a refused run changes nothing
    # which file, what is wrong and what to do, never cut off mid-sentence
    assert line.startswith(f"error: {out / 'last.pt'}: ") and line.endswith("."), line
    return line


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_refused_in_one_line_before_the_data(halfway, tmp_path, case, refused, no_data_reading):
    make, message = CORRUPTIONS[case]
    assert message in _refused_resume(refused, halfway, tmp_path, make)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MISFITS))
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_in_one_line(halfway, tmp_path, case, refused):
    make, message = MISFITS[case]
    line = _refused_resume(refused, halfway, tmp_path, make)
    assert "does not fit the run these settings build" in line and message in line, line


def test_a_damaged_best_checkpoint_in_the_folder_is_refused(halfway, tmp_path, refused, no_data_reading):
    out = copy_of(halfway, tmp_path)
    # an epoch without an evaluation (--eval-every) is never the best: best.pt stays as it is, so it is checked
    _edited(lambda s: s["history"][0].pop("test_acc"))(halfway / "last.pt", out / "last.pt")
    _flip_a_bit_in_the_weights(out / "best.pt")
    line = refused(train_cli, ["--resume", "auto", "--out", str(out)])
    assert f"{out / 'best.pt'}: corrupt checkpoint" in line and "Delete it and resume again" in line


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: _truncate(run / "predictions.npz", 1024), "predictions.npz: truncated or corrupt"),
        (lambda run: (run / "metrics.json").write_text('{"epochs": [{"epo'), "metrics.json: cannot be read"),
    ],
)
def test_the_report_on_a_damaged_run_is_one_line(finished, tmp_path, capsys, damage, message):
    from train.report import main as report

    run = copy_of(finished, tmp_path)
    damage(run)
    assert report([str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


# --- kind 5: the disk says no ---------------------------------------------------------------------------------------


def test_out_that_is_a_file_is_refused_before_any_work(tiny_cifar, tmp_path, capsys, no_data_reading):
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    code, stderr = cli(capsys, *small_run_args(tiny_cifar, a_file, *ARGS))
    assert code == 2 and f"--out {a_file} is a file, not a folder" in stderr
    code, stderr = cli(capsys, *small_run_args(tiny_cifar, a_file / "run", *ARGS))
    assert code == 2 and f"--out {a_file / 'run'}: cannot create the folder (Not a directory, ENOTDIR)" in stderr
    assert a_file.read_text() == "mine"


def test_read_only_out_is_refused_before_any_work(tiny_cifar, tmp_path, refused, no_data_reading, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == out:  # what a read-only filesystem answers
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    line = refused(train_cli, small_run_args(tiny_cifar, out, *ARGS))
    assert f"--out {out} is not writable (Read-only file system, EROFS)" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_any_work_for_real(tiny_cifar, tmp_path, capsys, no_data_reading):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, stderr = cli(capsys, *small_run_args(tiny_cifar, out, *ARGS))
    finally:
        out.chmod(0o755)
    assert code == 2 and f"--out {out} is not writable (Permission denied, EACCES)" in stderr


@pytest.mark.slow
def test_disk_full_mid_run_keeps_the_previous_checkpoint(finished, tiny_cifar, tmp_path, capsys, refused, monkeypatch):
    out = tmp_path / "run"
    real_fsync, calls = os.fsync, []

    def full(fd: int) -> None:  # the second write of last.pt finds the disk full
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    line = refused(train_cli, small_run_args(tiny_cifar, out, *ARGS))
    assert line == (
        f"error: could not write {out / 'last.pt'} (No space left on device, ENOSPC); {out / 'last.pt'} holds epoch 1 "
        f"of 2: free some space, then continue with: python -m train --resume auto --out {out}."
    )
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1 and not temporaries(out)
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    assert cli(capsys, "--resume", "auto", "--out", str(out))[0] == 0
    assert epochs_of(out) == epochs_of(finished)


def _file_size_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))  # a checkpoint is 1.5 MB


@pytest.mark.slow  # interpreter start-ups: more than 5 s
def test_a_write_the_system_refuses_is_one_line_for_real(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "train", *small_run_args(tiny_cifar, out, *ARGS)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: could not write {out / 'last.pt'} (File too large, EFBIG); no epoch of this run was saved in {out}: "
        "raise the file size limit (ulimit -f), then run the same command again to start over."
    )
    assert not [n for n in OUTPUT_FILES if (out / n).exists()] and not temporaries(out)
