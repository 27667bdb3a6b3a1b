"""CIFAR-10 from the standard python layout (`cifar-10-batches-py`), read directly and checked.

Read here rather than through torchvision's CIFAR10 class because that class refuses any copy whose checksums differ
from the official archive (a re-packed copy, for instance), and its plain pickle.load would run whatever code a
crafted file holds. Here a restricted unpickler builds only numpy arrays and plain values, and every batch is read
exactly or refused in one line. torchvision's utilities fetch, md5-verify and extract the official archive.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
TRAIN_SIZE, TEST_SIZE = 50_000, 10_000
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32)  # (height, width) of every CIFAR-10 image
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_ROOT = "~/data/cifar10"  # the original assignment notebook's default
ENV_VAR = "CIFAR10_ROOT"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MB = 170  # 170,498,071 bytes
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"


def resolve_root(data_dir: str | os.PathLike | None) -> Path:
    """Where the data lives: the flag, else $CIFAR10_ROOT, else ~/data/cifar10."""
    chosen = data_dir or os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(chosen).expanduser()


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """Turn an OSError of the file system into one DataError line: a permission problem says so and what to change."""
    try:
        yield
    except PermissionError as err:
        raise DataError(
            f"{err.filename or path}: permission denied; CIFAR-10 needs read access to its files and folders (e.g. "
            "chmod -R a+rX on the data folder), and write access where it is downloaded or extracted; or choose "
            "another --data-dir."
        ) from None
    except OSError as err:
        raise DataError(f"{err.filename or path}: {err.strerror or err} ({type(err).__name__}).") from None


def _batches_dir(root: Path) -> Path | None:
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if (root / TRAIN_FILES[0]).exists() or (root / TEST_FILE).exists() or root.name == FOLDER:
        return root
    return None


def find_batches_dir(root: str | os.PathLike) -> Path:
    """The `cifar-10-batches-py` folder: `root` itself, inside `root`, or extracted from the official archive there
    (`root` may name the archive). Raises DataError when none is there or the folders cannot be searched."""
    root = Path(root).expanduser()
    with _os_errors(root):
        if root.name == ARCHIVE and root.is_file():
            root = root.parent
        folder = _batches_dir(root)
        if folder is None and (root / ARCHIVE).is_file():
            folder = extract_official_archive(root / ARCHIVE)
        if folder is not None:
            return folder
        found = f"no {FOLDER}/ folder and no {TRAIN_FILES[0]} in it" if root.exists() else "folder not found"
    raise DataError(
        f"{root}: {found}. Point --data-dir (or ${ENV_VAR}) at the folder that holds {FOLDER}/ (the python version of "
        "CIFAR-10), or add --download to fetch the official archive."
    )


def extract_official_archive(archive: Path) -> Path:
    """Verify the official archive's md5 and extract it beside itself (torchvision's utilities); returns the folder.

    Extracted into a scratch folder renamed into place, so an interrupted extraction leaves no half-filled folder; a
    copy another process (a torchrun rank) finished meanwhile is kept. Raises DataError (md5, permission, disk full).
    """
    from torchvision.datasets.utils import calculate_md5, extract_archive

    root = archive.parent
    with _os_errors(archive):
        digest = calculate_md5(archive)
    if digest != ARCHIVE_MD5:
        raise DataError(
            f"{archive}: md5 {digest}, the official archive's is {ARCHIVE_MD5}: the file is damaged or not the python "
            f"version of CIFAR-10. Delete it and download {URL} again (or use --download)."
        )
    print(f"extracting {archive} (md5 verified) into {root / FOLDER}", flush=True)
    with _os_errors(root):
        scratch = Path(tempfile.mkdtemp(prefix=".extracting-", dir=root))
        try:
            extract_archive(str(archive), str(scratch))
            try:
                (scratch / FOLDER).rename(root / FOLDER)
            except OSError:
                if not (root / FOLDER).is_dir():  # not another process's finished copy: a real failure
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return root / FOLDER


def download(root: str | os.PathLike) -> Path:
    """Fetch, md5-verify and extract the official archive into `root` unless the data or the archive is there.

    Never overwrites. The download goes to `cifar-10-python.tar.gz.part`, renamed when complete and verified; a failed
    one leaves neither that file nor any folder this call created. Raises DataError (saying what to do offline).
    """
    from torchvision.datasets.utils import download_url

    root = Path(root).expanduser()
    with _os_errors(root):
        if (root.name == ARCHIVE and root.is_file()) or _batches_dir(root) is not None or (root / ARCHIVE).is_file():
            return find_batches_dir(root)
        if root.exists() and not root.is_dir():
            raise DataError(f"{root}: a file, not a folder. Point --data-dir at a folder to download CIFAR-10 into.")
        created = [folder for folder in (root, *root.parents) if not folder.exists()]
        root.mkdir(parents=True, exist_ok=True)
    part = root / f"{ARCHIVE}.part"
    print(f"downloading {URL} ({ARCHIVE_MB} MB) into {root}", flush=True)
    try:
        download_url(URL, str(root), filename=part.name, md5=ARCHIVE_MD5)
        part.rename(root / ARCHIVE)
    except BaseException as err:  # network errors come in many types; KeyboardInterrupt cleans up too
        part.unlink(missing_ok=True)
        for folder in created:  # deepest first; rmdir removes only empty folders, never anything of the user's
            with contextlib.suppress(OSError):
                folder.rmdir()
        if not isinstance(err, Exception):
            raise
        reason = (str(err).splitlines() or [""])[0][:200]
        raise DataError(
            f"{URL}: download failed ({type(err).__name__}: {reason}). Without network access, download {URL} by hand "
            f"({ARCHIVE_MB} MB, md5 {ARCHIVE_MD5}) and put {ARCHIVE} in {root} (it is verified and extracted on the "
            f"next run), or extract it there yourself: tar -xzf {ARCHIVE} -C {root}"
        ) from None
    return find_batches_dir(root)


def load_cifar10(
    root: str | os.PathLike, *, allow_small: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (train_x, train_y, test_x, test_y): uint8 NHWC [N,32,32,3] images and int64 labels in 0..9.

    `root` as find_batches_dir takes it. Raises DataError naming the file and what is wrong. The splits must have
    50,000/10,000 images (a half-copied dataset is caught here) unless `allow_small` accepts fewer (tests).
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


IMAGE_BYTES = 3 * 32 * 32
# An official batch file is 31 MB (10,000 images). Python 3's protocol 0 writes 5 byte values as 6-character escapes,
# so a valid batch takes at most ~190 MB; a file beyond this cap is refused unread.
MAX_FILE_BYTES = 256 * 2**20

# Everything a CIFAR-10 batch's pickle calls (Python 2 or 3, protocols 0-5, numpy 1 or 2 writers): numpy's array,
# dtype and scalar reconstruction, and how Python 3 pickles bytes at protocols 0-2. Anything else is refused.
_numpy_core = getattr(np, "_core", None) or np.core
_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): lambda text, encoding: text.encode("latin-1"),  # Python 3 bytes: encode(text, 'latin1')
}
for _builtins in ("builtins", "__builtin__"):  # Python 3 pickles b"" as bytes(); bytes(n) would allocate n bytes
    _ALLOWED[_builtins, "bytes"] = lambda: b""
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED[f"{_module}.multiarray", "_reconstruct"] = _numpy_core.multiarray._reconstruct
    _ALLOWED[f"{_module}.multiarray", "scalar"] = _numpy_core.multiarray.scalar
    _ALLOWED[f"{_module}.numeric", "_frombuffer"] = _numpy_core.numeric._frombuffer


class _Refused(pickle.UnpicklingError):
    """The pickle calls something no CIFAR-10 batch needs."""


class _BatchUnpickler(pickle.Unpickler):
    """pickle, but `find_class` returns only what a CIFAR-10 batch needs (_ALLOWED): no code in the file can run."""

    def find_class(self, module: str, name: str) -> object:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"it calls {module[:60]}.{name[:60]}, which a CIFAR-10 batch never does")
        return found


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 NHWC [N,32,32,3] images, int64 [N] labels in 0..9); DataError if it is not exactly that.

    A batch is a dict with text keys 'data', a uint8 array [N, 3072] (channel-planar RGB), and 'labels', N integers
    0..9 as a list of ints or a 1-D integer array.
    """
    with _os_errors(path):
        if not path.exists():
            raise DataError(f"{path}: file missing; {FOLDER}/ needs data_batch_1..5 and {TEST_FILE}.")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes; not a CIFAR-10 batch.")
        with open(path, "rb") as f:
            raw = f.read()
    try:  # encoding="bytes": Python 2's str (keys, pixel data) stays bytes
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as err:
        raise DataError(f"{path}: refusing to load it: {err}.") from None
    except Exception as err:  # EOFError, UnpicklingError, ValueError, ... all mean the same to the user
        reason = (str(err).splitlines() or [""])[0][:200]
        raise DataError(
            f"{path}: truncated or corrupt pickle ({type(err).__name__}: {reason}). Re-extract or re-download it."
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with 'data' and 'labels', found {type(batch).__name__}.")
    fields = {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    for key in ("data", "labels"):
        if key not in fields:
            raise DataError(f"{path}: missing key {key!r}; not a CIFAR-10 batch.")
    data = fields["data"]
    if not isinstance(data, np.ndarray) or data.dtype.str != "|u1" or data.shape[1:] != (IMAGE_BYTES,):
        raise DataError(
            f"{path}: 'data' is {_describe(data)}; CIFAR-10 needs a uint8 array [N, 3072] (channel-planar 32x32 RGB). "
            "Is this CIFAR-100 or another dataset?"
        )
    labels = _check_labels(path, fields["labels"], len(data))
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def _check_labels(path: Path, labels: object, count: int) -> np.ndarray:
    """int64 [count] labels from a list of ints or a 1-D integer array (True is no class index, 6.7 no label)."""
    if isinstance(labels, list):
        bad = [i for i, value in enumerate(labels) if type(value) is not int and not isinstance(value, np.integer)]
        if bad:
            raise DataError(f"{path}: label {bad[0]} is {_describe(labels[bad[0]])}; labels are integers 0..9.")
        labels = np.asarray(labels)  # integers beyond int64 make an object array, still compared exactly
    elif not (isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu"):
        raise DataError(
            f"{path}: 'labels' is {_describe(labels)}; CIFAR-10 needs a list of integers 0..9 or a 1-D integer array."
        )
    if len(labels) != count:
        raise DataError(f"{path}: {len(labels)} labels for {count} images.")
    outside = np.count_nonzero((labels < 0) | (labels >= NUM_CLASSES))
    if outside:
        raise DataError(f"{path}: {outside} labels outside 0..9; CIFAR-10 has 10 classes.")
    return labels.astype(np.int64)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"{value!r:.40} (a {type(value).__name__})"
