"""Shared fixtures: small synthetic CIFAR-10 copies written in the standard layout (tests never read ../shared)."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.data import CLASSES, FOLDER, TEST_FILE, TRAIN_FILES

# The environment the tests run in, the same on every machine (every subprocess inherits it). Removed: what would
# change what the code under test does or prints (torchrun's variables would make every run a rank of a job; tqdm
# reads any TQDM_* as a default: TQDM_DISABLE=1 or TQDM_MININTERVAL=5, as CI jobs set, hide the bar or its counts).
# Set: the terminal width that argparse's help and tqdm's bar (stderr a pipe) are laid out for, so wrapping and
# trimming do not depend on the terminal pytest was started from. A test that needs a variable sets it itself.
HERMETIC_UNSET = (
    "CIFAR10_ROOT",
    "TRAIN_DIST_TIMEOUT_S",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
HERMETIC_SET = {"COLUMNS": "120", "LINES": "40"}


def pytest_configure(config: pytest.Config) -> None:
    for name in [*HERMETIC_UNSET, *(n for n in os.environ if n.upper().startswith("TQDM_"))]:
        os.environ.pop(name, None)
    os.environ.update(HERMETIC_SET)


def smooth_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Photo-like uint8 images: blurred noise with some structure (not flat, not white noise)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((n, size, size, 3)).astype(np.float32)
    blurred = np.stack([cv2.GaussianBlur(img, (0, 0), 1.5) for img in noise])
    lo, hi = blurred.min(axis=(1, 2, 3), keepdims=True), blurred.max(axis=(1, 2, 3), keepdims=True)
    return np.round(255 * (blurred - lo) / (hi - lo)).astype(np.uint8)


def indexed_images(n: int, size: int = 32) -> np.ndarray:
    """Image i carries its own index in its pixels (base-256 digits in the first three pixels of channel 0)."""
    images = np.zeros((n, size, size, 3), np.uint8)
    idx = np.arange(n)
    for digit in range(3):
        images[:, 0, digit, 0] = (idx >> (8 * digit)) & 255
    return images


def decode_index(x: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """Inverse of indexed_images for a normalized batch x [B,3,H,W] (no augmentation applied)."""
    pixels = torch.round((x[:, 0, 0, :3] * std + mean) * 255).long()
    return (pixels[:, 0] + 256 * pixels[:, 1] + 65536 * pixels[:, 2]).cpu().numpy()


def write_cifar10(root, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> Path:
    """Write NHWC uint8 arrays in the standard layout, as the official files hold them; returns the batches folder."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train_x)), len(TRAIN_FILES))
    parts = [(name, train_x[idx], train_y[idx]) for name, idx in zip(TRAIN_FILES, chunks, strict=True)]
    for name, x, y in [*parts, (TEST_FILE, test_x, test_y)]:
        flat = np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(0, 3, 1, 2).reshape(len(x), -1))
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": flat}, f, protocol=4)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": len(chunks[0]), b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=4)
    return folder


@pytest.fixture(scope="session")
def cifar_writer():
    """`write(root, train_x, train_y, test_x, test_y)`: a CIFAR-10 copy of these arrays (write_cifar10)."""
    return write_cifar10


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> str:
    """A CIFAR-10-layout folder with 300 train and 100 test images whose labels follow the image colour."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(1)
    train_y, test_y = rng.integers(0, 10, 300), rng.integers(0, 10, 100)

    def images_for(labels: np.ndarray) -> np.ndarray:
        base = smooth_images(len(labels), seed=len(labels)).astype(np.int16) // 2
        base[np.arange(len(labels)), :, :, labels % 3] += (20 * labels[:, None, None]).astype(np.int16)  # a tint
        return np.clip(base, 0, 255).astype(np.uint8)

    write_cifar10(root, images_for(train_y), train_y, images_for(test_y), test_y)
    return str(root)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def opencv_remap(images, src_x, src_y):
    """OpenCV standing in for DALI's GPU-only remap, so the batched (GPU) graph runs on a CPU-only machine."""
    from nvidia.dali import fn

    def remap(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
        return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    return fn.python_function(images, src_x, src_y, function=remap, num_outputs=1)


# The loaders under test. "dali-batched-cpu" is the GPU graph on the CPU with OpenCV's remap; "dali-gpu" needs CUDA.
LOADER_VARIANTS = ["cpu", "dali-per-image", "dali-batched-cpu", "dali-gpu"]


ORDER_FIELDS = ("seed", "shuffle", "drop_last", "rank", "world_size")
# DaliLoader keywords that make_loader does not take
DALI_ONLY = {"chunk_images"}


def build_loader(variant: str, images: np.ndarray, labels: np.ndarray, batch_size: int, **kw):
    """A loader of one variant; `kw` takes make_loader's keywords, for brevity Order's fields, and for the DALI
    variants DaliLoader's own (DALI_ONLY)."""
    from pipeline import Order, make_loader

    if variant.startswith("dali") and not dali_available():
        pytest.skip("DALI is not installed")
    if variant == "dali-gpu" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    kw["order"] = Order(**{name: kw.pop(name) for name in ORDER_FIELDS if name in kw})
    if variant == "cpu":
        return make_loader("cpu", images, labels, batch_size, workers=kw.pop("workers", 0), **kw)
    if variant == "dali-gpu" and not kw.keys() & DALI_ONLY:
        return make_loader("dali", images, labels, batch_size, device="cuda", **kw)
    from pipeline.dali_loader import DaliLoader
    from pipeline.spec import AugSpec

    on_gpu = variant == "dali-gpu"
    args = dict(spec=AugSpec(), train=True, device="cuda" if on_gpu else "cpu", workers=None if on_gpu else 2)
    args.update(kw)
    if variant == "dali-batched-cpu":
        return DaliLoader(images, labels, batch_size, graph="batched", remap=opencv_remap, **args)
    return DaliLoader(images, labels, batch_size, graph="per_image" if variant == "dali-per-image" else None, **args)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every case that runs on a CUDA GPU carries the `gpu` marker, so `pytest -m gpu` selects all of them (what
    bench/gpu_session.sh runs on a lent GPU): the tests marked by hand and every "dali-gpu" loader variant."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "dali-gpu" in callspec.params.values():
            item.add_marker(pytest.mark.gpu)


def _one_line(code: object, err: str, what: object, exit_code: int) -> str:
    lines = err.strip().splitlines()
    assert code == exit_code, f"{what}: exit code {code}, stderr {err[-2000:]!r}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, f"{what}: {err[-2000:]!r}"
    return lines[0]


@pytest.fixture
def refused(capsys):
    """The one helper for "refused in one line": `refused(main, argv)` runs an entry point's main(argv) in this
    process, or `refused(completed_process)` checks a subprocess that ran one; either way it asserts the exit code
    (2 unless `exit_code=` says otherwise) and exactly one `error: ...` line on stderr, no traceback, and returns it."""

    def check(main_or_result, argv: list[str] | None = None, *, exit_code: int = 2) -> str:
        if isinstance(main_or_result, subprocess.CompletedProcess):
            return _one_line(main_or_result.returncode, main_or_result.stderr, main_or_result.args, exit_code)
        capsys.readouterr()
        try:
            code = main_or_result(list(argv or []))
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
        return _one_line(code, capsys.readouterr().err, argv, exit_code)

    return check
