"""What ran, for metrics.json: versions, hardware and which code (package, git, a hash of the source)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def code_version() -> dict[str, str | None]:
    """The package version, `git describe --always --dirty` when the source is a git checkout, and a SHA-256 of the
    project's .py files (so a copy without git can be identified too)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.glob("*/*.py")):
        if path.parent.name in ("pipeline", "model", "train", "bench"):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        version = metadata.version("dali-cifar")
    except metadata.PackageNotFoundError:
        version = None
    try:
        describe = ["git", "describe", "--always", "--dirty"]
        git = subprocess.run(describe, cwd=root, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {"package": version, "git": git, "source_sha256": digest.hexdigest()}


def environment(device: torch.device, world_size: int) -> dict[str, object]:
    """Versions, hardware and code, for metrics.json's "env"."""
    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {
        "torch": torch.__version__,
        "dali": dali_version,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
        "hostname": platform.node(),
        "code": code_version(),
    }
