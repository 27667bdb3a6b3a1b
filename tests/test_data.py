"""Reading CIFAR-10's python layout, and every way a copy can be bad."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, find_batches_dir, load_cifar10, resolve_root, write_cifar10


def test_reads_arrays_in_nhwc(tiny_cifar):
    train_x, train_y, test_x, test_y = load_cifar10(tiny_cifar, allow_small=True)
    assert train_x.shape == (300, 32, 32, 3) and train_x.dtype == np.uint8
    assert test_x.shape == (100, 32, 32, 3) and test_x.dtype == np.uint8
    assert train_y.dtype == np.int64 and train_y.shape == (300,) and test_y.shape == (100,)
    assert train_x.flags.c_contiguous


def test_pixel_layout_round_trips(tmp_path):
    """The pickles are channel-planar; the reader must undo exactly that (a red pixel stays red, top-left)."""
    x = np.zeros((10, 32, 32, 3), np.uint8)
    x[3, 0, 1] = (255, 7, 0)
    write_cifar10(tmp_path, x, np.arange(10), x[:2], np.arange(2))
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


def _rewrite(path: Path, changes: dict) -> None:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
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
