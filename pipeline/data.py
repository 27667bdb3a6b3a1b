"""CIFAR-10 from the standard python layout (`cifar-10-batches-py`), read directly and checked.

The pickles are read here rather than through torchvision's CIFAR10 class because that class refuses any copy whose
checksums differ from the official archive (a re-encoded or re-packed copy, for instance), and its plain pickle.load
would run whatever code a crafted file holds. Here every batch pickled by Python 2 or 3 at any protocol is read
exactly and anything else is refused in one line, in bounded time and memory. torchvision's utilities fetch,
md5-verify and extract the official archive (`--download`, or the archive found in the data folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import pickle
import pickletools
import shutil
import stat
import struct
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
DEFAULT_ROOT = "~/data/cifar10"  # the seed's default
ENV_VAR = "CIFAR10_ROOT"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MB = 170  # 170,498,071 bytes
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"


def resolve_root(data_dir: str | os.PathLike | None) -> Path:
    """Where the data lives: the flag, else $CIFAR10_ROOT, else ~/data/cifar10."""
    chosen = data_dir or os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(chosen).expanduser()


# What a user without the needed permission has to change, by what was being done.
_ACCESS_NEEDED = {
    "read": "read access to the data files and read and search (x) access to their folders "
    "(e.g. chmod -R a+rX on the data folder), or a copy of the data somewhere readable",
    "write": "write access to that folder to download or extract CIFAR-10 there; choose another --data-dir",
}


@contextlib.contextmanager
def _os_errors(path: Path, doing: str) -> Iterator[None]:
    """Turn an OSError of the file system into one DataError line: a permission problem says so and what to change."""
    try:
        yield
    except PermissionError as err:
        raise DataError(f"{err.filename or path}: permission denied; this needs {_ACCESS_NEEDED[doing]}.") from None
    except OSError as err:
        raise DataError(f"{err.filename or path}: {err.strerror or err} ({type(err).__name__}).") from None


def _batches_dir(root: Path) -> Path | None:
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if (root / TRAIN_FILES[0]).exists() or (root / TEST_FILE).exists() or root.name == FOLDER:
        return root
    return None


def find_batches_dir(root: str | os.PathLike) -> Path:
    """`root` may be the folder holding `cifar-10-batches-py` or that folder itself.

    Raises DataError when neither is there or the folders cannot be searched (permissions).
    """
    root = Path(root).expanduser()
    with _os_errors(root, "read"):
        folder = _batches_dir(root)
        if folder is not None:
            return folder
        exists = root.exists()
    if not exists:
        raise DataError(
            f"{root}: folder not found. Point --data-dir (or ${ENV_VAR}) at the folder that holds {FOLDER}/, "
            "or add --download to fetch the official archive."
        )
    raise DataError(
        f"{root}: no {FOLDER}/ folder and no {TRAIN_FILES[0]} in it. Point --data-dir at the folder that holds "
        f"{FOLDER}/ (the python version of CIFAR-10), or add --download."
    )


def _archive_parent(root: Path) -> Path:
    """`root` itself may be the official archive; the data then goes beside it."""
    return root.parent if root.name == ARCHIVE and root.is_file() else root


def extract_official_archive(archive: str | os.PathLike) -> Path:
    """Verify the official archive's md5 and extract it beside itself (torchvision's utilities); returns the folder.

    The extraction goes to a temporary folder first and is renamed into place, so an interrupted one leaves no
    half-filled `cifar-10-batches-py/`; a copy extracted meanwhile by another process (a torchrun rank) is kept.
    Raises DataError on an md5 mismatch or a file-system error (permission, disk full).
    """
    from torchvision.datasets.utils import calculate_md5
    from torchvision.datasets.utils import extract_archive as extract

    archive = Path(archive)
    root = archive.parent
    with _os_errors(archive, "read"):
        digest = calculate_md5(archive)
    if digest != ARCHIVE_MD5:
        raise DataError(
            f"{archive}: md5 {digest}, the official archive's is {ARCHIVE_MD5}: the file is damaged or not the python "
            f"version of CIFAR-10. Delete it and download {URL} again (or use --download)."
        )
    print(f"extracting {archive} (md5 verified) into {root / FOLDER}", flush=True)
    with _os_errors(root, "write"):
        scratch = Path(tempfile.mkdtemp(prefix=".extracting-", dir=root))
        try:
            extract(archive, scratch)
            try:
                (scratch / FOLDER).rename(root / FOLDER)
            except OSError:
                if not (root / FOLDER).is_dir():  # not another process's finished copy: a real failure
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return root / FOLDER


def _find_or_extract(root: Path) -> Path:
    """find_batches_dir, except that a folder holding only the official archive gets it verified and extracted."""
    with _os_errors(root, "read"):
        root = _archive_parent(root)
        archive_only = _batches_dir(root) is None and (root / ARCHIVE).is_file()
    if archive_only:
        extract_official_archive(root / ARCHIVE)
    return find_batches_dir(root)


def download(root: str | os.PathLike) -> Path:
    """Fetch, md5-verify and extract the official archive into `root` unless the data or the archive is there.

    Never overwrites: an extracted copy is used as it is, an archive already in `root` is verified and extracted. The
    download goes to `cifar-10-python.tar.gz.part`, renamed when complete and verified; a failed one leaves neither
    that file nor any folder this call created. Raises DataError (one line saying what to do without network).
    """
    from torchvision.datasets.utils import download_url

    root = Path(root).expanduser()
    with _os_errors(root, "write"):
        root = _archive_parent(root)
        if _batches_dir(root) is not None or (root / ARCHIVE).is_file():
            return _find_or_extract(root)
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
    return _find_or_extract(root)


def load_cifar10(
    root: str | os.PathLike, *, allow_small: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (train_x, train_y, test_x, test_y): uint8 NHWC [N,32,32,3] images and int64 labels in 0..9.

    `root` is the folder holding `cifar-10-batches-py/`, that folder itself, or a folder holding only the official
    `cifar-10-python.tar.gz` (verified and extracted first; the archive's own path works too). Every batch is read
    exactly or refused with a DataError naming the file and what is wrong (see `_read_batch`), in bounded time and
    memory. `allow_small` accepts splits smaller than 50,000/10,000 (tests build tiny copies); the full sizes are
    required otherwise, so a half-copied dataset is caught before training on it.
    """
    folder = _find_or_extract(Path(root).expanduser())
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


# Bounds on one batch file, all derived from the format and checked before anything large is built, so that a file
# made to exhaust memory or time is refused cheaply. CIFAR-10's python version has 10,000 images per batch file
# (num_cases_per_batch in batches.meta). An image is 3,072 bytes; its label and its file name (the official files
# carry 'filenames') take well under 512 bytes more (measured: about 145 at protocol 0 with numpy-scalar labels).
# MAX_PAYLOAD_BYTES bounds the bytes of the arrays and, separately, the bytes decoded through `_codecs.encode`.
# The costliest encoding is Python 3's protocol 0, which stores bytes as text with NUL, CR, LF, backslash and ^Z as
# 6-character \uXXXX escapes: at most 6 file bytes per payload byte, hence MAX_FILE_BYTES. A batch needs at most about
# 20 pickle operations per image (numpy-scalar labels plus a file name, protocol 0, measured) and a few hundred more;
# MAX_PICKLE_OPS leaves room. Each operation builds at most one small object, so with all four bounds reading one file
# takes about 0.6 GB at most whatever it holds (measured: 0.56 GB for the largest valid file, 186 MB at protocol 0 with
# all-black images; about 3 times the file for an official 31 MB one).
MAX_IMAGES_PER_FILE = 10_000
IMAGE_BYTES = 3 * 32 * 32
MAX_PAYLOAD_BYTES = MAX_IMAGES_PER_FILE * (IMAGE_BYTES + 512) + 64 * 1024
MAX_FILE_BYTES = 6 * MAX_PAYLOAD_BYTES
MAX_PICKLE_OPS = MAX_IMAGES_PER_FILE * 32 + 4096

# The pickle opcodes a CIFAR-10 batch is written with at protocols 0-5 by Python 3 and by Python 2 (which wrote the
# official files). Sets, persistent ids, extension codes, out-of-band buffers and the class-instantiating opcodes
# (INST, OBJ, NEWOBJ) never occur in one.
_OPCODES = frozenset(
    ("PROTO", "FRAME", "STOP", "MARK", "NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT")
    + ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4")
    + ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8")
    + ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8")
    + ("EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS")
    + ("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3")
    + ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET")
    + ("GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD")
)
# numpy dtypes an array in a batch may have: uint8 images, integer labels; bool and float are let through only to be
# refused below with a message that names them.
_DTYPE_NAMES = frozenset(["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "b1", "f2", "f4", "f8"])
_NDARRAY = object()  # what `numpy.ndarray` unpickles to: only a marker for _reconstruct, never the class itself


class _Refused(Exception):
    """The pickle asks for something no CIFAR-10 batch needs (code, an unknown global, more than the bounds)."""


def _clip(text: object, limit: int = 60) -> str:
    shown = repr(text[: limit + 1] if isinstance(text, (str, bytes)) else text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _plain_dtype(dtype: object) -> np.dtype:
    """A plain numeric dtype (no fields, sub-arrays or metadata a hostile state could add), as numpy's own object."""
    if (
        not isinstance(dtype, np.dtype)
        or dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.metadata is not None
        or dtype.str[1:] not in _DTYPE_NAMES
    ):
        raise _Refused(f"it holds an array of numpy dtype {_clip(dtype)}, which no CIFAR-10 batch has")
    return np.dtype(dtype.str)


def _nbytes(shape: object, dtype: np.dtype) -> int:
    if type(shape) is not tuple or len(shape) > 8 or any(type(n) is not int or n < 0 for n in shape):
        raise _Refused(f"it holds an array of shape {_clip(shape)}")
    return math.prod(shape) * dtype.itemsize


@dataclasses.dataclass
class _Builders:
    """The checked stand-ins for the globals a CIFAR-10 batch calls, and what one batch may still build with them.

    A batch needs numpy's array, dtype and scalar reconstruction (`numpy.core` or `numpy._core`, for numpy 1 and 2
    writers), `_codecs.encode(text, "latin1")` and `bytes()` (how Python 3 stores bytes at protocols 0-2). Each
    stand-in accepts only the arguments those writers produce, charges what it builds to the byte budgets, and raises
    _Refused otherwise. Kept apart from the unpickler so that the unpickled objects never refer back to it (a
    reference cycle would keep a whole batch in memory until the garbage collector ran).
    """

    array_bytes: int = MAX_PAYLOAD_BYTES
    text_bytes: int = MAX_PAYLOAD_BYTES

    def charge_array(self, nbytes: int) -> None:
        self.array_bytes -= nbytes
        if self.array_bytes < 0:
            raise _Refused(
                f"its arrays hold more than {MAX_PAYLOAD_BYTES:,} bytes, more than a batch of "
                f"{MAX_IMAGES_PER_FILE:,} images does"
            )

    def reconstruct(self, subtype: object, shape: object, typecode: object) -> np.ndarray:
        if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
            raise _Refused("it builds a numpy array in a way numpy's pickling never does")
        array = _PlainArray((0,), np.int8)
        array._builders = self
        return array

    def frombuffer(self, buf: object, dtype: object, shape: object, order: object, axis_order: object = None):
        dtype = _plain_dtype(dtype)
        if type(buf) not in (bytes, bytearray) or order not in ("C", "F", "K") or len(buf) != _nbytes(shape, dtype):
            raise _Refused("it builds a numpy array from a buffer in a way numpy's pickling never does")
        self.charge_array(len(buf))
        array = np.frombuffer(buf, dtype=dtype)  # as numpy's own _frombuffer (protocol 5) does
        if order == "K" and axis_order is not None:
            if type(axis_order) is not tuple or sorted(axis_order) != list(range(len(shape))):
                raise _Refused("it builds a numpy array with an invalid axis order")
            return array.reshape(shape, order="C").transpose(axis_order)
        return array.reshape(shape, order="C" if order == "K" else order)

    def latin1_encode(self, text: object, encoding: object = None) -> bytes:
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            raise _Refused("it calls _codecs.encode other than the way Python 3 stores bytes (text, 'latin1')")
        self.text_bytes -= len(text)
        if self.text_bytes < 0:
            raise _Refused(f"it decodes more than {MAX_PAYLOAD_BYTES:,} bytes of text, more than a CIFAR-10 batch")
        return text.encode("latin-1")

    @staticmethod
    def scalar(dtype: object, data: object = None):
        dtype = _plain_dtype(dtype)
        if type(data) is not bytes or len(data) != dtype.itemsize:
            raise _Refused("it builds a numpy scalar in a way numpy's pickling never does")
        return np.frombuffer(data, dtype=dtype)[0]

    @staticmethod
    def dtype(name: object, align: object = False, copy: object = True) -> np.dtype:
        if isinstance(name, bytes):  # Python 2 wrote the dtype name as a str
            name = name.decode("ascii", "replace")
        if not isinstance(name, str) or name not in _DTYPE_NAMES:
            raise _Refused(f"it builds numpy dtype {_clip(name)}, which no CIFAR-10 batch has")
        return np.dtype(name, False, True)  # always a copy: BUILD then sets the state of this one, not numpy's own

    @staticmethod
    def empty_bytes(*args: object) -> bytes:
        if args:  # Python 3 pickles only the empty bytes object as bytes(); bytes(n) would allocate n bytes
            raise _Refused("it calls bytes() with arguments, which no CIFAR-10 batch does")
        return b""


class _PlainArray(np.ndarray):
    """What `reconstruct` returns: numpy's array, with its pickled state checked against the bounds before use."""

    def __setstate__(self, state: object) -> None:
        if type(state) is not tuple or len(state) not in (4, 5):
            raise _Refused("it holds a numpy array with an unknown pickled state")
        dtype = _plain_dtype(state[-3])
        self._builders.charge_array(_nbytes(state[-4], dtype))
        super().__setstate__((*state[:-3], dtype, *state[-2:]))


class _BatchUnpickler(pickle.Unpickler):
    """Unpickle a CIFAR-10 batch and nothing else: every global it may call is a checked stand-in (_Builders)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, encoding="bytes")  # Python 2's str (keys, pixel data) stays bytes
        builders = _Builders()
        self._globals = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): builders.dtype}
        for numpy_core in ("numpy.core", "numpy._core"):
            self._globals[f"{numpy_core}.multiarray", "_reconstruct"] = builders.reconstruct
            self._globals[f"{numpy_core}.multiarray", "scalar"] = builders.scalar
            self._globals[f"{numpy_core}.numeric", "_frombuffer"] = builders.frombuffer
        self._globals["_codecs", "encode"] = builders.latin1_encode
        self._globals["__builtin__", "bytes"] = self._globals["builtins", "bytes"] = builders.empty_bytes

    def find_class(self, module: str, name: str) -> object:
        found = self._globals.get((module, name))
        if found is None:
            raise _Refused(f"it calls {_clip(f'{module}.{name}')}, which a CIFAR-10 batch never does")
        return found


# Length prefixes of pickle arguments, by pickletools' codes for them.
_LENGTH_PREFIX = {
    pickletools.TAKEN_FROM_ARGUMENT1: struct.Struct("<B"),
    pickletools.TAKEN_FROM_ARGUMENT4: struct.Struct("<i"),
    pickletools.TAKEN_FROM_ARGUMENT4U: struct.Struct("<I"),
    pickletools.TAKEN_FROM_ARGUMENT8U: struct.Struct("<Q"),
}


def _scan(raw: bytes) -> None:
    """Check every opcode in `raw` against _OPCODES and count them against MAX_PICKLE_OPS, building nothing.

    Written here on pickletools' opcode table rather than with pickletools.genops because genops decodes every
    argument, and fails on the Python 2 protocol-0 strings of binary data (it wants them ASCII after unescaping);
    skipping an argument needs only its length. Raises _Refused, or ValueError for a truncated or garbled pickle.
    """
    position = 0
    for count in range(1, MAX_PICKLE_OPS + 2):
        if position >= len(raw):
            raise ValueError("the data ends before the pickle's STOP")
        opcode = pickletools.code2op.get(chr(raw[position]))
        if opcode is None:
            raise ValueError(f"unknown pickle opcode {raw[position]:#04x} at byte {position}")
        if opcode.name not in _OPCODES:
            raise _Refused(f"it uses the pickle opcode {opcode.name} (byte {position}), which no CIFAR-10 batch does")
        if count > MAX_PICKLE_OPS:
            raise _Refused(
                f"it has more than {MAX_PICKLE_OPS:,} pickle operations, more than a batch of "
                f"{MAX_IMAGES_PER_FILE:,} images needs"
            )
        position += 1
        size = opcode.arg.n if opcode.arg is not None else 0
        if size == pickletools.UP_TO_NEWLINE:  # GLOBAL's argument is two lines (module, name)
            for _ in range(2 if opcode.name == "GLOBAL" else 1):
                end = raw.find(b"\n", position)
                position = end + 1 if end >= 0 else len(raw) + 1
        elif size < 0:
            prefix = _LENGTH_PREFIX[size]
            if position + prefix.size > len(raw):
                raise ValueError(f"the pickle is cut inside {opcode.name} at byte {position}")
            (length,) = prefix.unpack_from(raw, position)
            if length < 0:
                raise ValueError(f"negative length in {opcode.name} at byte {position}")
            position += prefix.size + length
        else:
            position += size
        if position > len(raw):
            raise ValueError(f"the pickle is cut inside {opcode.name} at byte {position}")
        if opcode.name == "STOP":
            return


def _unpickle(path: Path, raw: bytes) -> object:
    """The object in `raw`: its opcodes scanned first (_scan), then unpickled by _BatchUnpickler."""
    try:
        _scan(raw)
        return _BatchUnpickler(io.BytesIO(raw)).load()
    except _Refused as err:
        raise DataError(
            f"{path}: refusing to load it: {err}. A CIFAR-10 batch holds only numpy arrays, lists, numbers and text."
        ) from None
    except Exception as err:  # EOFError, UnpicklingError, ValueError, ... all mean the same to the user
        reason = (str(err).splitlines() or [""])[0][:200]
        raise DataError(
            f"{path}: truncated or corrupt pickle ({type(err).__name__}: {reason}). Re-extract or re-download it."
        ) from None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 NHWC [N,32,32,3] images, int64 [N] labels in 0..9); DataError if it is not exactly that.

    Accepted: a dict with text keys (bytes keys decoded as UTF-8) 'data', a uint8 numpy array [N, 3072] with
    N <= 10,000, and 'labels', N integers 0..9 as a list of ints (or numpy integer scalars) or a 1-D integer numpy
    array, pickled at any protocol 0-5 by Python 3 or by Python 2. Refused: anything else, including bools (True is
    not a class index: such a file holds something else) and floats (6.7 would have to be cut to 6).
    """
    with _os_errors(path, "read"):
        try:
            status = path.stat()
        except FileNotFoundError:
            raise DataError(
                f"{path}: file missing. The {FOLDER}/ folder needs {', '.join(TRAIN_FILES)} and {TEST_FILE}."
            ) from None
        if not stat.S_ISREG(status.st_mode):  # a folder, a pipe or a device is never a batch (a pipe would block)
            raise DataError(f"{path}: not a regular file. Re-extract the archive or use --download.")
        with open(path, "rb") as f:
            too_large = os.fstat(f.fileno()).st_size > MAX_FILE_BYTES
            raw = b"" if too_large else f.read(MAX_FILE_BYTES + 1)  # +1: a file that grew meanwhile is caught too
    if too_large or len(raw) > MAX_FILE_BYTES:
        raise DataError(
            f"{path}: larger than {MAX_FILE_BYTES:,} bytes, more than a CIFAR-10 batch of {MAX_IMAGES_PER_FILE:,} "
            "images takes at any pickle protocol; not a CIFAR-10 batch."
        )
    return _check_batch(path, _unpickle(path, raw))


def _check_batch(path: Path, batch: object) -> tuple[np.ndarray, np.ndarray]:
    """Types and sizes are checked before anything is converted, so nothing large is built from a hostile batch."""
    if type(batch) is not dict:
        raise DataError(f"{path}: expected a dict with 'data' and 'labels', found {type(batch).__name__}.")
    fields = {}
    for key in batch:
        if type(key) is bytes:
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}: the key {_clip(key)} is not UTF-8 text; not a CIFAR-10 batch.") from None
        elif type(key) is str:
            name = key
        else:
            raise DataError(f"{path}: a key is a {type(key).__name__}; a CIFAR-10 batch has text keys only.")
        if name in fields:
            raise DataError(f"{path}: the key {_clip(name)} appears twice (as text and as bytes); which one is meant?")
        fields[name] = batch[key]
    if "data" not in fields or "labels" not in fields:
        raise DataError(f"{path}: missing key {'data' if 'data' not in fields else 'labels'!r}; not a CIFAR-10 batch.")
    data = fields["data"]
    if not isinstance(data, np.ndarray):
        raise DataError(
            f"{path}: 'data' is a {type(data).__name__}; CIFAR-10 needs a uint8 numpy array [N, 3072] "
            "(channel-planar 32x32 RGB)."
        )
    data = data.view(np.ndarray)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise DataError(
            f"{path}: 'data' has shape {data.shape} and dtype {data.dtype}; CIFAR-10 needs uint8 [N, 3072] "
            "(channel-planar 32x32 RGB). Is this CIFAR-100 or another dataset?"
        )
    if len(data) > MAX_IMAGES_PER_FILE:
        raise DataError(f"{path}: {len(data):,} images; a CIFAR-10 batch file holds at most {MAX_IMAGES_PER_FILE:,}.")
    labels = _check_labels(path, fields["labels"], len(data))
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _check_labels(path: Path, labels: object, count: int) -> np.ndarray:
    """int64 [count] labels from a list of integers or a 1-D integer array, checked element by element first."""
    if isinstance(labels, np.ndarray):
        labels = labels.view(np.ndarray)
        if labels.dtype.kind not in "iu":
            raise DataError(f"{path}: 'labels' is a {labels.dtype} array; CIFAR-10 labels are integers 0..9.")
        if labels.ndim != 1:
            raise DataError(f"{path}: 'labels' has shape {labels.shape}; CIFAR-10 needs one label per image, [N].")
        outside = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    elif type(labels) is list:
        for i, value in enumerate(labels):  # by type, before numpy sees the list: nested lists would expand
            if type(value) is not int and not isinstance(value, np.integer):
                raise DataError(f"{path}: label {i} is {_describe(value)}; CIFAR-10 labels are integers 0..9.")
        outside = [value for value in labels if not 0 <= value < NUM_CLASSES]
    else:
        raise DataError(
            f"{path}: 'labels' is a {type(labels).__name__}; CIFAR-10 needs a list of integers 0..9 "
            "(or a 1-D integer numpy array)."
        )
    if len(labels) != count:
        raise DataError(f"{path}: {len(labels)} labels for {count} images.")
    if len(outside):
        first = int(outside[0])
        shown = str(first) if abs(first) < 10**18 else f"an integer of {first.bit_length()} bits"
        raise DataError(f"{path}: {len(outside)} labels outside 0..9 (e.g. {shown}); CIFAR-10 has 10 classes.")
    return np.asarray(labels, dtype=np.int64)


def _describe(value: object) -> str:
    if isinstance(value, (bool, float, np.bool_, np.floating)):
        return f"{value!r} (a {type(value).__name__})"
    if isinstance(value, (str, bytes)):
        return f"the text {_clip(value, 30)}"
    return "None" if value is None else f"a {type(value).__name__}"


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
