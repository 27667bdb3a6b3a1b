"""Reading CIFAR-10's python layout, and every way a copy can be bad."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import pipeline.data
from pipeline.data import (
    ARCHIVE,
    FOLDER,
    TEST_FILE,
    TRAIN_FILES,
    URL,
    download,
    find_batches_dir,
    load_cifar10,
    resolve_root,
)
from pipeline.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_reads_arrays_in_nhwc(tiny_cifar):
    train_x, train_y, test_x, test_y = load_cifar10(tiny_cifar, allow_small=True)
    assert train_x.shape == (300, 32, 32, 3) and train_x.dtype == np.uint8
    assert test_x.shape == (100, 32, 32, 3) and test_x.dtype == np.uint8
    assert train_y.dtype == np.int64 and train_y.shape == (300,) and test_y.shape == (100,)
    assert train_x.flags.c_contiguous


def test_pixel_layout_round_trips(tmp_path, cifar_writer):
    """The pickles are channel-planar; the reader must undo exactly that (a red pixel stays red, top-left)."""
    x = np.zeros((10, 32, 32, 3), np.uint8)
    x[3, 0, 1] = (255, 7, 0)
    cifar_writer(tmp_path, x, np.arange(10), x[:2], np.arange(2))
    train_x, train_y, _, _ = load_cifar10(tmp_path, allow_small=True)
    assert tuple(train_x[3, 0, 1]) == (255, 7, 0) and train_x.sum() == 262
    np.testing.assert_array_equal(train_y, np.arange(10))


def test_root_may_be_the_batches_folder_itself(tiny_cifar):
    folder = Path(tiny_cifar) / "cifar-10-batches-py"
    assert find_batches_dir(folder) == folder
    assert load_cifar10(folder, allow_small=True)[0].shape[0] == 300


def test_root_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path / "env"))
    assert resolve_root(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("CIFAR10_ROOT")
    assert resolve_root(None) == Path("~/data/cifar10").expanduser()


@pytest.fixture()
def copy(tiny_cifar, tmp_path) -> Path:
    shutil.copytree(Path(tiny_cifar) / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    return tmp_path / "cifar-10-batches-py"


def _raw(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _rewrite(path: Path, changes: dict) -> None:
    batch = _raw(path)
    batch.update(changes)
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def _error(root) -> str:
    with pytest.raises(DataError) as info:
        load_cifar10(root, allow_small=True)
    return str(info.value)


def test_missing_folder(tmp_path):
    message = _error(tmp_path / "nowhere")
    assert "nowhere" in message and "not found" in message and "--download" in message


def test_folder_without_cifar(tmp_path):
    message = _error(tmp_path)
    assert "cifar-10-batches-py" in message


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch"])
def test_missing_file(copy, name):
    (copy / name).unlink()
    message = _error(copy.parent)
    assert name in message and "missing" in message


def test_truncated_pickle(copy):
    path = copy / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    message = _error(copy.parent)
    assert "data_batch_2" in message and "truncated or corrupt" in message


def test_corrupt_pickle(copy):
    (copy / "test_batch").write_bytes(b"this is not a pickle at all" * 10)
    assert "test_batch" in _error(copy.parent)


def test_pickle_that_would_run_code_is_refused(copy):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(copy / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    message = _error(copy.parent)
    assert "data_batch_1" in message and "refusing" in message


def test_wrong_array_shape(copy):
    _rewrite(copy / "data_batch_4", {b"data": np.zeros((60, 1024), np.uint8)})
    message = _error(copy.parent)
    assert "data_batch_4" in message and "(60, 1024)" in message


def test_labels_outside_range(copy):
    with open(copy / "data_batch_1", "rb") as f:
        n = len(pickle.load(f, encoding="bytes")[b"labels"])
    _rewrite(copy / "data_batch_1", {b"labels": [3] * (n - 1) + [10]})
    message = _error(copy.parent)
    assert "data_batch_1" in message and "outside 0..9" in message


def test_label_count_mismatch(copy):
    _rewrite(copy / "test_batch", {b"labels": [1, 2, 3]})
    assert "3 labels for 100 images" in _error(copy.parent)


def test_small_copy_needs_the_explicit_flag(tiny_cifar):
    with pytest.raises(DataError, match="has 300 images, CIFAR-10 has 50,000"):
        load_cifar10(tiny_cifar)


def test_reading_writes_nothing(tiny_cifar):
    folder = Path(tiny_cifar) / "cifar-10-batches-py"
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    load_cifar10(tiny_cifar, allow_small=True)
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    assert before == after


# ---- every valid encoding is read exactly ----------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote, as in the official files: every str and bytes as a Python 2 str (the
    STRING opcodes, read back as bytes with encoding="bytes") and numpy's globals under `numpy.core`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if self.proto == 0:
            self.write(pickle.STRING + b"'" + codecs.escape_encode(raw)[0] + b"'\n")
        elif len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_python2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = pickle.whichmodule(obj, obj.__qualname__).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{obj.__qualname__}\n".encode())
        self.memoize(obj)


ENCODINGS = [f"python3-protocol{p}" for p in range(6)] + ["python2-protocol0", "python2-protocol2"]


def _dump(obj: object, encoding: str) -> bytes:
    writer, protocol = encoding.split("-protocol")
    if writer == "python3":
        return pickle.dumps(obj, protocol=int(protocol))
    out = io.BytesIO()
    _Python2Pickler(out, int(protocol)).dump(obj)
    return out.getvalue()


LABEL_FORMS = {  # each batch file of a copy holds its labels in one of these forms
    "list": lambda y: [int(v) for v in y],
    "int64-array": lambda y: np.asarray(y, np.int64),
    "uint8-array": lambda y: np.asarray(y, np.uint8),
    "numpy-scalars": lambda y: [np.int64(v) for v in y],
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_pickle_protocol_and_python2_is_read_exactly(copy, encoding):
    expected = load_cifar10(copy.parent, allow_small=True)
    for name, labels_as in zip([*TRAIN_FILES, TEST_FILE], [*LABEL_FORMS.values()] * 2, strict=False):
        batch = _raw(copy / name)
        batch[b"labels"] = labels_as(batch[b"labels"])
        batch[b"filenames"] = [f"image_{i:06d}.png".encode() for i in range(len(batch[b"data"]))]  # as official
        (copy / name).write_bytes(_dump(batch, encoding))
    for want, got in zip(expected, load_cifar10(copy.parent, allow_small=True), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


# ---- everything else is refused in one line --------------------------------------------------------------------------

N = 60  # images in each train batch of tiny_cifar
BAD_BATCHES = {
    "labels-text": ({b"labels": ["6"] * N}, "label 0 is '6' (a str)"),
    "labels-float": ({b"labels": [3] * (N - 1) + [6.7]}, f"label {N - 1} is 6.7 (a float)"),
    "labels-bool": ({b"labels": [True] * N}, "label 0 is True (a bool)"),
    "labels-nested": ({b"labels": [[3]] * N}, "label 0 is [3] (a list)"),
    "labels-beyond-int64": ({b"labels": [3] * (N - 1) + [2**70]}, "1 labels outside 0..9"),
    "labels-float-array": ({b"labels": np.full(N, 6.7)}, "'labels' is a float64 array of shape (60,)"),
    "labels-column-array": ({b"labels": np.zeros((N, 1), np.int64)}, "'labels' is a int64 array of shape (60, 1)"),
    "labels-dict": ({b"labels": {1: 2}}, "'labels' is {1: 2} (a dict)"),
    "data-list": ({b"data": [[0] * 3072] * N}, "'data' is [[0, 0"),
    "data-same-bytes-other-dtype": ({b"data": np.zeros((N, 1536), np.uint16)}, "'data' is a uint16 array"),
    "data-object-array": ({b"data": np.zeros((N, 3072), object)}, "'data' is a object array"),
    "labels-none": ({b"labels": None}, "'labels' is None"),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_a_bad_batch_is_one_clear_line(copy, case):
    changes, expected = BAD_BATCHES[case]
    _rewrite(copy / "data_batch_1", changes)
    message = _error(copy.parent)
    assert "data_batch_1" in message and expected in message and "\n" not in message


def test_a_batch_without_labels_names_the_key(copy):
    batch = _raw(copy / "data_batch_2")
    del batch[b"labels"]
    (copy / "data_batch_2").write_bytes(pickle.dumps(batch))
    assert "data_batch_2: missing key 'labels'" in _error(copy.parent)


class _Call:
    """Pickles as the call func(*args): how a pickle runs code."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


_reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
MALICIOUS = {  # each would run code or build an object of the file's choosing under a plain pickle.load
    "os.system": (_Call(os.system, "echo pwned"), ".system"),
    "eval": (_Call(eval, "__import__('os').system('echo pwned')"), ".eval"),
    "numpy-load": (_Call(np.load, "/etc/passwd"), "numpy.load"),
    "other-array-type": (_Call(_reconstruct, np.ma.MaskedArray, (0,), b"b"), "MaskedArray"),
}


@pytest.mark.parametrize("encoding", ["python3-protocol0", "python3-protocol4", "python2-protocol2"])
@pytest.mark.parametrize("case", MALICIOUS)
def test_a_pickle_that_would_run_code_is_refused(copy, case, encoding, capfd):
    payload, expected = MALICIOUS[case]
    (copy / "data_batch_1").write_bytes(_dump({b"data": payload, b"labels": []}, encoding))
    message = _error(copy.parent)
    assert "data_batch_1: refusing to load it: it calls " in message and expected in message and "\n" not in message
    assert "pwned" not in capfd.readouterr().out


def test_class_instantiating_opcodes_are_refused(copy):
    (copy / "test_batch").write_bytes(b"(S'echo pwned'\nios\nsystem\n.")  # INST: protocol 0's old-style classes
    assert "refusing to load it: it calls os.system" in _error(copy.parent)


def test_a_file_larger_than_any_batch_is_refused_unread(copy, monkeypatch):
    with open(copy / "data_batch_1", "r+b") as f:  # the first file read
        f.truncate(pipeline.data.MAX_FILE_BYTES + 1)  # sparse: takes no disk space
    monkeypatch.setattr(pipeline.data, "open", lambda *a, **k: pytest.fail("opened"), raising=False)
    assert f"data_batch_1: larger than {pipeline.data.MAX_FILE_BYTES:,} bytes" in _error(copy.parent)


def test_a_batch_that_is_a_folder(copy):
    (copy / "data_batch_4").unlink()
    (copy / "data_batch_4").mkdir()
    assert "data_batch_4: Is a directory" in _error(copy.parent)


# ---- permissions -----------------------------------------------------------------------------------------------------


_READER = """
import sys
from pipeline.data import DataError, load_cifar10
try:
    load_cifar10(sys.argv[1], allow_small=True)
except DataError as err:
    sys.exit(f"error: {err}")
"""


def _read_in_subprocess(root: Path, prefix: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-c", _READER, str(root)], capture_output=True, text=True, timeout=120
    )


def _without_root_privilege() -> list[str]:
    """A command prefix under which file permissions apply: none for a user, setpriv for root (whom chmod does not stop:
    it drops the capabilities that bypass them). Skips where that cannot be done."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without setpriv able to drop the permission-bypassing capabilities")
    return prefix


@pytest.mark.parametrize("locked", ["data_batch_2", FOLDER, "data-dir"])
def test_permission_denied_says_so(copy, locked, refused):
    """Real permissions: a file without read permission, a folder without read and search permission."""
    prefix = _without_root_privilege()
    target = {"data-dir": copy.parent, FOLDER: copy}.get(locked, copy / locked)
    target.chmod(0o000)
    try:
        result = _read_in_subprocess(copy.parent, prefix)
    finally:
        target.chmod(0o755)
    line = refused(result, exit_code=1)
    assert line.startswith(f"error: {target}") and "permission denied" in line and "chmod" in line  # the path named
    assert "corrupt" not in line


def test_permission_denied_on_open_says_so(copy, monkeypatch):
    """The same with the error raised by a patched open() (works for any user, root included)."""

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pipeline.data, "open", refuse, raising=False)
    message = _error(copy.parent)
    assert "data_batch_1: permission denied" in message and "corrupt" not in message


# ---- the official archive and --download -----------------------------------------------------------------------------


@pytest.fixture()
def archive(tiny_cifar, tmp_path, monkeypatch) -> Path:
    """A small stand-in for cifar-10-python.tar.gz; ARCHIVE_MD5 is patched to its md5."""
    path = tmp_path / "data" / ARCHIVE
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        tar.add(Path(tiny_cifar) / FOLDER, arcname=FOLDER)
    monkeypatch.setattr(pipeline.data, "ARCHIVE_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    return path


@pytest.fixture()
def offline(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


@pytest.mark.parametrize("given", ["folder", "archive"])
def test_a_folder_holding_the_archive_is_verified_and_extracted(archive, tiny_cifar, capsys, offline, given):
    root = archive.parent if given == "folder" else archive
    train_x, train_y, test_x, test_y = load_cifar10(root, allow_small=True)
    want = load_cifar10(tiny_cifar, allow_small=True)
    for got, expected in zip((train_x, train_y, test_x, test_y), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line == f"extracting {archive} (md5 verified) into {archive.parent / FOLDER}"
    assert {p.name for p in archive.parent.iterdir()} == {ARCHIVE, FOLDER}  # no scratch folder left
    load_cifar10(root, allow_small=True)
    assert capsys.readouterr().out == ""  # extracted once


@pytest.mark.parametrize("call", ["load", "download"])
def test_an_archive_with_the_wrong_md5_is_one_line_and_kept(archive, monkeypatch, offline, call):
    monkeypatch.setattr(pipeline.data, "ARCHIVE_MD5", "0" * 32)
    before = archive.read_bytes()
    with pytest.raises(DataError) as info:
        load_cifar10(archive.parent, allow_small=True) if call == "load" else download(archive.parent)
    message = str(info.value)
    assert f"{archive}: md5 " in message and "0" * 32 in message and URL in message and "\n" not in message
    assert archive.read_bytes() == before and not (archive.parent / FOLDER).exists()


def test_download_uses_an_archive_already_there(archive, offline):
    assert download(archive.parent) == archive.parent / FOLDER


def test_failed_download_says_what_to_do_and_leaves_nothing(tmp_path, offline):
    root = tmp_path / "new" / "cifar10"
    with pytest.raises(DataError) as info:
        download(root)
    message = str(info.value)
    assert "download failed" in message and "Temporary failure in name resolution" in message
    assert f"put {ARCHIVE} in {root}" in message and f"tar -xzf {ARCHIVE} -C {root}" in message and URL in message
    assert list(tmp_path.iterdir()) == []  # neither the folders it created nor a partial archive


class _Response(io.BytesIO):
    """What urlopen returns, serving `body`; the connection drops after `fail_after` bytes if given."""

    def __init__(self, body: bytes, url: str, fail_after: int | None = None) -> None:
        super().__init__(body)
        self.url, self.length, self.fail_after = url, len(body), fail_after

    def read(self, size: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(size)


@pytest.mark.parametrize("outcome", ["dropped", "complete"])
def test_download_through_torchvision(archive, tmp_path, monkeypatch, capsys, outcome):
    body = archive.read_bytes()
    fail_after = len(body) // 2 if outcome == "dropped" else None
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda request, *a, **k: _Response(body, request.full_url, fail_after)
    )
    root = tmp_path / "fresh"
    if outcome == "dropped":
        with pytest.raises(DataError, match="Connection reset by peer"):
            download(root)
        assert not root.exists()  # no partial archive, no empty folder
        return
    assert download(root) == root / FOLDER
    assert {p.name for p in root.iterdir()} == {ARCHIVE, FOLDER}
    assert f"downloading {URL}" in capsys.readouterr().out
    assert load_cifar10(root, allow_small=True)[0].shape == (300, 32, 32, 3)


def test_download_into_a_file_is_one_line(tmp_path, offline):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="a file, not a folder"):
        download(tmp_path / "notes.txt")


def test_extracting_where_writing_is_denied_says_so(archive, monkeypatch):
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(DataError) as info:
        load_cifar10(archive.parent, allow_small=True)
    assert f"{archive.parent}: permission denied" in str(info.value) and "write access" in str(info.value)
