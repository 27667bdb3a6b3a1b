"""The loader contract, for the CPU loader and every DALI graph: shapes, layout, len(), sharding, order, labels."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import LOADER_VARIANTS, build_loader, decode_index, indexed_images, smooth_images

from pipeline import Loader, Order, make_loader
from pipeline.augs import Cutout
from pipeline.errors import ConfigError
from pipeline.spec import AugSpec

N = 203  # odd on purpose: uneven shards and a partial last batch
DALI_VARIANTS = [v for v in LOADER_VARIANTS if v.startswith("dali")]


@pytest.fixture(scope="module")
def data():
    images = indexed_images(N)
    labels = (np.arange(N) * 7 % 10).astype(np.int64)  # a label any image's index determines
    return images, labels


def _device(variant: str) -> str:
    return "cuda" if variant == "dali-gpu" else "cpu"


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_batches_shape_dtype_layout_and_len(variant, data):
    images, labels = data
    loader = build_loader(variant, images, labels, 64)
    batches = list(loader)
    assert len(loader) == len(batches) == math.ceil(N / 64)
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (3, 32, 32) and y.shape == (x.shape[0],)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert x.device.type == y.device.type == _device(variant)
    assert [len(y) for _, y in batches] == [64, 64, 64, N - 192]
    dropped = build_loader(variant, images, labels, 64, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 3


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_every_loader_is_a_loader(variant, data):
    """The contract is a type (pipeline.Loader): both loaders satisfy it, with the signatures it declares."""
    import inspect

    images, labels = data
    loader = build_loader(variant, images, labels, 64, rank=1, world_size=2)
    assert isinstance(loader, Loader)
    assert isinstance(loader.num_samples, int) and loader.num_samples == len(range(1, N, 2))
    assert list(inspect.signature(loader.set_epoch).parameters) == ["epoch"]
    assert isinstance(len(loader), int)
    assert isinstance(loader.workers, int) and loader.workers >= (0 if variant == "cpu" else 1)
    assert not isinstance(object(), Loader)  # (the check is not vacuous)


@pytest.mark.parametrize("variant", ["cpu", "dali-per-image"])
def test_workers_in_use_are_what_was_asked_or_the_documented_default(variant, data):
    from pipeline import usable_cores

    images, labels = data
    assert build_loader(variant, images, labels, 64, workers=None).workers == usable_cores()  # CPU work: every core
    assert build_loader(variant, images, labels, 64, workers=1).workers == 1
    if variant == "cpu":
        assert build_loader(variant, images, labels, 64, workers=0).workers == 0  # the main process


def test_dali_with_no_threads_is_refused_not_given_one(data, tiny_cifar, tmp_path, refused):
    """0 workers is the main process alone for the cpu loader; DALI needs a thread, and used to get one silently."""
    images, labels = data
    with pytest.raises(ConfigError, match="workers 0: the DALI loader needs at least one thread"):
        make_loader("dali", images, labels, 64, workers=0)
    argv = ["--data-dir", tiny_cifar, "--allow-small-data", "--out", str(tmp_path / "run"), "--epochs", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "train", *argv, "--loader", "dali", "--workers", "0"], capture_output=True, text=True
    )
    assert "workers 0: the DALI loader needs at least one thread" in refused(result)


@pytest.mark.parametrize("kind", ["cpu", "dali"])
def test_a_loader_refuses_more_workers_than_the_cores_can_use(kind, data):
    """The bound is the loaders' own (make_loader), so every entry point and any caller of the API has it: a typo
    such as 100000 would otherwise fork DataLoader workers until the machine ran out of memory."""
    from pipeline import WORKERS_PER_CORE_MAX, make_loader, usable_cores

    images, labels = data
    limit = WORKERS_PER_CORE_MAX * usable_cores()
    for workers in (limit + 1, 100_000, -1):
        with pytest.raises(ValueError, match="workers"):
            make_loader(kind, images, labels, 64, workers=workers)
    assert make_loader(kind, images, labels, 64, workers=limit).workers == limit  # the limit itself is allowed


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
@pytest.mark.parametrize("train", [False, True])
def test_two_ranks_see_every_image_exactly_once_with_its_label(variant, train, data):
    images, labels = data
    seen = []
    for rank in range(2):
        # train=True with every probability 0 runs the training graph but keeps the pixels that encode the index
        loader = build_loader(variant, images, labels, 32, rank=rank, world_size=2, train=train, spec=AugSpec.none())
        got = [(decode_index(x), y.cpu().numpy()) for x, y in loader]
        index = np.concatenate([i for i, _ in got])
        assert len(index) == len(range(rank, N, 2)) == sum(len(i) for i, _ in got)
        assert len(loader) == math.ceil(len(index) / 32)
        np.testing.assert_array_equal(np.concatenate([y for _, y in got]), labels[index])
        seen.append(index)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(N))


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_order_reshuffles_each_epoch_from_the_seed(variant, data):
    images, labels = data

    def orders(seed: int, epochs: int = 2) -> list[np.ndarray]:
        loader = build_loader(variant, images, labels, 64, seed=seed, train=False)
        return [np.concatenate([decode_index(x) for x, _ in loader]) for _ in range(epochs)]

    first, second = orders(seed=5)
    assert not np.array_equal(first, second) and sorted(first) == sorted(second) == list(range(N))
    np.testing.assert_array_equal(orders(seed=5)[0], first)  # same seed, same order
    assert not np.array_equal(orders(seed=6)[0], first)
    loader = build_loader(variant, images, labels, 64, seed=5, train=False)
    loader.set_epoch(1)  # resuming at epoch 1 gives epoch 1's order
    np.testing.assert_array_equal(np.concatenate([decode_index(x) for x, _ in loader]), second)


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_augmented_epochs_are_reproducible(variant, data):
    images, labels = data
    runs = []
    for _ in range(2):
        loader = build_loader(variant, images, labels, 64, seed=3)
        loader.set_epoch(4)
        runs.append(torch.cat([x.cpu() for x, _ in loader]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@pytest.mark.parametrize("variant, chunk", [(v, None) for v in LOADER_VARIANTS] + [(v, 64) for v in DALI_VARIANTS])
def test_stopping_early_leaves_the_next_epoch_intact(variant, chunk, data):
    """Stopped after two batches: with 64-image chunks (two batches) the next chunk is in flight in DALI then."""
    images, labels = data
    extra = {"chunk_images": chunk} if chunk else {}
    loader = build_loader(variant, images, labels, 32, train=False, shuffle=False, **extra)
    for _ in zip(range(2), loader, strict=False):
        pass
    index = np.concatenate([decode_index(x) for x, _ in loader])
    np.testing.assert_array_equal(index, np.arange(N))


@pytest.mark.parametrize("variant", DALI_VARIANTS)
def test_a_second_pass_while_one_has_chunks_in_dali_is_refused(variant, data):
    """DALI has one queue per loader: a pass started while another still has a chunk queued would collect that
    chunk (other images) under its own labels. It is refused; once the first pass is closed, passes work again."""
    images, labels = data
    loader = build_loader(variant, images, labels, 32, train=False, shuffle=False, chunk_images=64)
    first = iter(loader)
    next(first)  # the second chunk is in flight in DALI now
    with pytest.raises(RuntimeError, match="another pass over this loader"):
        next(iter(loader))
    first.close()
    loader.set_epoch(0)
    batches = list(loader)
    np.testing.assert_array_equal(np.concatenate([decode_index(x) for x, _ in batches]), np.arange(N))
    np.testing.assert_array_equal(torch.cat([y.cpu() for _, y in batches]).numpy(), labels)


@pytest.mark.parametrize("variant", DALI_VARIANTS)
def test_ctrl_c_while_a_chunk_is_collected_leaves_the_loader_usable(variant, data, monkeypatch):
    """A KeyboardInterrupt that lands in _collect, after DALI handed the chunk over, is what reaches the user (not
    DALI's StopIteration from draining that chunk twice), and the next pass still yields every image once."""
    images, labels = data
    loader = build_loader(variant, images, labels, 32, train=False, shuffle=False, chunk_images=64)
    collect = loader._collect

    def interrupted():
        collect()
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(loader)
    monkeypatch.setattr(loader, "_collect", collect)
    loader.set_epoch(0)
    batches = list(loader)
    np.testing.assert_array_equal(np.concatenate([decode_index(x) for x, _ in batches]), np.arange(N))


def test_unknown_kind_and_bad_inputs_are_refused(data):
    images, labels = data
    with pytest.raises(ValueError, match="unknown loader 'ffcv'"):
        make_loader("ffcv", images, labels, 8)
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        make_loader("cpu", images, labels, 0)
    with pytest.raises(ValueError, match="203 images but 3 labels"):
        make_loader("cpu", images, labels[:3], 8)
    with pytest.raises(ValueError, match="rank must be in"):
        Order(rank=2, world_size=2)


def test_cpu_loader_results_do_not_depend_on_worker_count(data):
    images, labels = data
    a = torch.cat([x for x, _ in make_loader("cpu", images, labels, 50, order=Order(seed=1), workers=0)])
    b = torch.cat([x for x, _ in make_loader("cpu", images, labels, 50, order=Order(seed=1), workers=2)])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["dali-batched-cpu", "dali-gpu"])
def test_batches_larger_than_one_dali_sample(variant):
    """The batched graph splits a batch into samples of IMAGES_PER_SAMPLE images; order and labels must survive."""
    from pipeline.dali_loader import IMAGES_PER_SAMPLE

    n = 2 * IMAGES_PER_SAMPLE + 188
    images, labels = indexed_images(n), np.arange(n) % 10
    loader = build_loader(variant, images, labels, IMAGES_PER_SAMPLE * 2 + 88, train=True, spec=AugSpec.none())
    got = [(decode_index(x), y.cpu().numpy()) for x, y in loader]
    index = np.concatenate([i for i, _ in got])
    assert sorted(index) == list(range(n))
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), labels[index])


@pytest.mark.parametrize("variant", DALI_VARIANTS)
def test_dali_loader_does_no_host_work_between_chunk_boundaries(variant):
    """Each torch operation is a kernel launch on a GPU host and each DALI iteration a fixed ~2-3 ms of host time
    (issue 10: paid per training batch it capped the loader at 59k img/s at batch 128 on an H200). DALI augments
    whole chunks; a batch is a slice of its chunk: between chunk boundaries, no torch operation and no DALI call."""
    from bench.host_ops import host_work

    images = np.zeros((64 * 12, 32, 32, 3), np.uint8)
    loader = build_loader(variant, images, np.zeros(len(images), np.int64), 64, chunk_images=64 * 3 + 10)
    work = host_work(loader)
    assert loader.chunk_batches == work.chunk_batches == 3 and len(work.ops) == 12 and work.chunks == 4
    for i in range(12):
        if i % 3:
            assert not work.ops[i] and not work.dali[i], (i, work.ops[i], work.dali[i])
        else:  # the chunk boundary: the chunk is collected (and the counters do count)
            assert work.dali[i]["outputs"] == 1, (i, work.dali[i])
    # one DALI iteration per chunk, none per batch
    assert sum(work.dali, Counter())["schedule_run"] == sum(work.dali, Counter())["outputs"] == 4
    batches = list(loader)  # the batches of one chunk are views of one buffer, a new one per chunk
    storage = [x.untyped_storage().data_ptr() for x, _ in batches]
    assert storage == [storage[i - i % 3] for i in range(12)] and len(set(storage)) == 4


@pytest.mark.parametrize("variant", DALI_VARIANTS)
@pytest.mark.parametrize(
    "n, batch_size, world_size, drop_last",
    [(129, 16, 1, False), (129, 16, 2, False), (129, 16, 1, True), (700, 300, 1, False)],
    ids=["partial-last-batch", "two-ranks-batch+1", "drop-last", "batches-of-several-dali-samples"],
)
def test_chunked_batches_are_bit_identical_to_batch_at_a_time(variant, n, batch_size, world_size, drop_last):
    """The chunk size changes no batch: same images, labels, parameters and output bits as one DALI iteration per
    batch (chunk_images = batch_size), for chunks smaller than a batch, of 2.5 and 3 batches (dividing neither the
    batch size nor the shard's batch count) and of the whole shard. Every batch of the epoch is held before
    comparing, so a chunk's memory overwritten while a consumer holds its views would show."""
    images = smooth_images(n, seed=7)
    labels = np.arange(n) % 10

    def epoch(rank: int, chunk_images: int) -> list:
        loader = build_loader(
            variant, images, labels, batch_size, seed=3, rank=rank, world_size=world_size, drop_last=drop_last,
            chunk_images=chunk_images,
        )  # fmt: skip
        loader.set_epoch(1)
        return list(loader)

    for rank in range(world_size):
        reference = epoch(rank, batch_size)
        assert len(reference) > 2
        for chunk_images in [batch_size // 2, batch_size * 5 // 2, batch_size * 3, 10 * n]:
            got = epoch(rank, chunk_images)
            assert len(got) == len(reference)
            for (x, y), (x_ref, y_ref) in zip(got, reference, strict=True):
                assert torch.equal(y, y_ref) and torch.equal(x, x_ref), chunk_images
                assert x.is_contiguous(memory_format=torch.channels_last)


def test_a_chunk_below_one_image_is_refused(data):
    images, labels = data
    with pytest.raises(ValueError, match="chunk_images must be >= 1, got 0"):
        build_loader("dali-per-image", images, labels, 8, chunk_images=0)


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_a_spec_that_cannot_work_for_the_images_is_refused(variant, data):
    """Both loaders refuse it the same way (albumentations used to raise mid-epoch, DALI to train on grey images);
    a loader that only normalizes does not augment, so it does not care."""
    images, labels = data
    impossible = AugSpec(cutout=Cutout(min_px=40, max_px=40))
    with pytest.raises(ValueError, match="cutout_min_px=40 does not fit a 32x32 image"):
        build_loader(variant, images, labels, 8, spec=impossible)
    assert len(build_loader(variant, images, labels, 8, spec=impossible, train=False)) > 0


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_uneven_shards_give_every_rank_the_same_number_of_batches(variant):
    """129 images, 2 ranks, 32 a batch: shards of 65 and 64 used to give 3 and 2 batches (a rank would wait for the
    other in SyncBatchNorm at every epoch's end); now both give 2 and rank 0's last batch takes the odd image."""
    n = 129
    images, labels = indexed_images(n), np.arange(n) % 10
    seen, sizes = [], []
    for rank in range(2):
        loader = build_loader(variant, images, labels, 32, rank=rank, world_size=2, spec=AugSpec.none())
        got = [(decode_index(x), y.cpu().numpy()) for x, y in loader]
        assert len(loader) == len(got) == 2
        sizes.append([len(i) for i, _ in got])
        np.testing.assert_array_equal(np.concatenate([y for _, y in got]), labels[np.concatenate([i for i, _ in got])])
        seen.extend(np.concatenate([i for i, _ in got]).tolist())
    assert sizes == [[32, 33], [32, 32]]
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("variant", LOADER_VARIANTS)
def test_fewer_images_than_ranks_is_refused(variant):
    with pytest.raises(ValueError, match="1 image\\(s\\) cannot be shared by 2 ranks"):
        build_loader(variant, indexed_images(1), np.zeros(1, np.int64), 8, rank=1, world_size=2)


@pytest.mark.parametrize("variant", ["dali-batched-cpu", "dali-gpu"])
def test_an_epochs_chunk_layout_is_built_once(variant, data):
    """The cut of an epoch into chunks and DALI samples (and the batched graph's gather index) depends only on the
    batch sizes, the same every epoch: built on the first epoch and reused, not rebuilt (and copied to the device)
    at every epoch start. The batches stay those of a fresh loader."""
    images, labels = data
    loader = build_loader(variant, images, labels, 64, chunk_images=128)
    first = [x.clone() for x, _ in loader]
    (layout,) = loader._epoch_layouts.values()
    gathers = dict(layout.gathers)
    loader.set_epoch(0)
    again = [x for x, _ in loader]
    assert list(loader._epoch_layouts.values()) == [layout] and layout.gathers == gathers
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", DALI_VARIANTS)
def test_the_next_epochs_first_chunk_is_scheduled_before_this_epoch_ends(variant):
    """DALI augments epoch e + 1's first chunk while the loop trains on epoch e's last one (it used to be scheduled
    only when epoch e + 1 started, leaving the loop waiting for it). Epochs stay a fresh loader's, also after a
    set_epoch that jumps past the chunk prepared for the next one."""
    n, batch = 160, 16
    images, labels = smooth_images(n, seed=5), np.arange(n) % 10

    def loader():
        return build_loader(variant, images, labels, batch, seed=2, chunk_images=4 * batch)  # 3 chunks an epoch

    def fresh(epoch: int) -> list:
        one = loader()
        one.set_epoch(epoch)
        return list(one)

    counted = loader()
    scheduled = []
    schedule_run = counted.pipe.schedule_run
    counted.pipe.schedule_run = lambda: (scheduled.append(1), schedule_run())[1]
    it = iter(counted)
    epoch0 = [next(it) for _ in range(len(counted))]  # the epoch's last batch is in hand
    assert len(scheduled) == 3 + 1
    assert next(it, None) is None
    for got, want in [(epoch0, fresh(0)), (list(counted), fresh(1))]:
        for (x, y), (x_ref, y_ref) in zip(got, want, strict=True):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert len(scheduled) == 2 * 3 + 1  # epoch 1 used the chunk prepared for it, and prepared epoch 2's
    counted.set_epoch(5)
    for (x, y), (x_ref, y_ref) in zip(list(counted), fresh(5), strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
