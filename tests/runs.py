"""Helpers for the tests that run `python -m train`: the command in a subprocess, a small run's flags, its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Per-epoch fields that an interrupted and resumed run must reproduce exactly (not the timings)
STABLE = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "images", "lr")


def run_train(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m train ARGS` in a subprocess, from the project's root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-m", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def small_run_args(data: str, out: Path, *extra: str) -> list[str]:
    """The flags of a 2-epoch CPU run on the tiny data set, then `extra`."""
    loader = extra[extra.index("--loader") + 1] if "--loader" in extra else "dali"  # train's default loader
    workers = "0" if loader == "cpu" else "1"  # the cpu loader in the main process; DALI needs a thread
    return [
        *("--data-dir", data, "--allow-small-data", "--out", str(out), "--epochs", "2", "--batch-size", "64"),
        *("--lr", "0.05", "--workers", workers, "--no-progress", "--device", "cpu", *extra),
    ]


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def epochs_of(out: Path) -> list[dict]:
    return [{k: e[k] for k in STABLE} for e in metrics_of(out)["epochs"]]
