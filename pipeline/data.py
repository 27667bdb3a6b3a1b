"""CIFAR-10 from the standard python layout (`cifar-10-batches-py`), read directly and checked.

The pickles are read here rather than through torchvision's CIFAR10 class because that class refuses any copy whose
checksums differ from the official archive (a re-encoded or re-packed copy, for instance). Only the optional
`--download` uses torchvision, to fetch and md5-verify the official archive.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
TRAIN_SIZE, TEST_SIZE = 50_000, 10_000
NUM_CLASSES = 10
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_ROOT = "~/data/cifar10"  # the seed's default
ENV_VAR = "CIFAR10_ROOT"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"


class DataError(Exception):
    """Bad or missing data: the message names the file, what is wrong and what to do."""


def resolve_root(data_dir: str | os.PathLike | None) -> Path:
    """Where the data lives: the flag, else $CIFAR10_ROOT, else ~/data/cifar10."""
    chosen = data_dir or os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(chosen).expanduser()


def find_batches_dir(root: str | os.PathLike) -> Path:
    """`root` may be the folder holding `cifar-10-batches-py` or that folder itself."""
    root = Path(root).expanduser()
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if (root / TRAIN_FILES[0]).exists() or (root / TEST_FILE).exists() or root.name == FOLDER:
        return root
    if not root.exists():
        raise DataError(
            f"{root}: folder not found. Point --data-dir (or ${ENV_VAR}) at the folder that holds {FOLDER}/, "
            "or add --download to fetch the official archive."
        )
    raise DataError(
        f"{root}: no {FOLDER}/ folder and no {TRAIN_FILES[0]} in it. Point --data-dir at the folder that holds "
        f"{FOLDER}/ (the python version of CIFAR-10), or add --download."
    )


def download(root: str | os.PathLike) -> Path:
    """Fetch and md5-verify the official archive into `root` unless a copy is already there (never overwrites)."""
    root = Path(root).expanduser()
    try:
        return find_batches_dir(root)
    except DataError:
        pass
    from torchvision.datasets.utils import download_and_extract_archive

    root.mkdir(parents=True, exist_ok=True)
    try:
        download_and_extract_archive(URL, download_root=str(root), md5=ARCHIVE_MD5)
    except Exception as err:  # network errors come in many types; the user needs one line
        raise DataError(f"{URL}: download failed ({err}). Download it by hand and pass --data-dir.") from err
    return find_batches_dir(root)


def load_cifar10(
    root: str | os.PathLike, *, allow_small: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (train_x, train_y, test_x, test_y): uint8 NHWC [N,32,32,3] images and int64 labels.

    `allow_small` accepts splits smaller than 50,000/10,000 (tests build tiny copies); the full sizes are required
    otherwise, so a half-copied dataset is caught before training on it.
    """
    folder = find_batches_dir(root)
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    test_x, test_y = _read_batch(folder / TEST_FILE)
    for split, x, expected, where in (
        ("train", train_x, TRAIN_SIZE, f"{folder}/data_batch_1..5"),
        ("test", test_x, TEST_SIZE, f"{folder}/{TEST_FILE}"),
    ):
        if len(x) != expected and not (allow_small and 0 < len(x) <= expected):
            raise DataError(
                f"{where}: the {split} split has {len(x):,} images, CIFAR-10 has {expected:,}. "
                "The copy is incomplete: re-extract the archive or use --download."
            )
    return train_x, train_y, test_x, test_y


class _ArraysOnly(pickle.Unpickler):
    """Unpickle the CIFAR batch dicts without running arbitrary code: only numpy's array reconstruction is allowed."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's signature)
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR-10 batch)")
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: file missing. The {FOLDER}/ folder needs {', '.join(TRAIN_FILES)} and {TEST_FILE}.")
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except Exception as err:  # EOFError, UnpicklingError, ValueError, ... all mean the same to the user
        raise DataError(
            f"{path}: truncated or corrupt pickle ({type(err).__name__}: {err}). Re-extract or re-download it."
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with 'data' and 'labels', found {type(batch).__name__}.")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: missing key {'data' if 'data' not in batch else 'labels'!r}; not a CIFAR-10 batch.")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: 'data' has shape {data.shape} and dtype {data.dtype}; CIFAR-10 needs uint8 [N, 3072] "
            "(channel-planar 32x32 RGB). Is this CIFAR-100 or another dataset?"
        )
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images.")
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        raise DataError(
            f"{path}: {int(bad.sum())} labels outside 0..9 (e.g. {int(labels[bad][0])}); CIFAR-10 has 10 classes."
        )
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def write_cifar10(
    root: str | os.PathLike, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> Path:
    """Write arrays in the standard layout (tests and tools make small copies with it). Returns the batches folder."""
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
