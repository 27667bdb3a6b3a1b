"""The data of a run: CIFAR-10's splits after --val-split, --limit-train and --limit-eval, and their loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import Loader, Order, make_loader
from pipeline.data import download, load_cifar10, resolve_root
from pipeline.errors import ConfigError
from pipeline.order import check_every_rank_has_an_image
from train.config import TrainConfig
from train.dist import Dist, log

# Images held out by --val-split are always the same ones (this seed), whatever --seed says, so that runs with
# different seeds are compared on one validation set.
VAL_SPLIT_SEED = 20260101
EVAL_BATCH_SIZE = 1000  # evaluation has no backward pass: larger batches, same numbers


@dataclass
class Data:
    """uint8 NHWC images and int64 labels; `eval_name` is "test", or "val" for a held-out validation split."""

    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    eval_name: str
    root: Path  # the folder the data was read from, resolved (flag, $CIFAR10_ROOT or the default)
    eval_total: int  # images in the evaluation split before --limit-eval


def eval_split(cfg: TrainConfig) -> str:
    """The name of the evaluation split in metrics: "val" for a held-out --val-split, else "test"."""
    return "val" if cfg.val_split else "test"


def load_data(cfg: TrainConfig, dist: Dist) -> Data:
    """Train and evaluation arrays after --val-split (the evaluation split is then the held-out images),
    --limit-train and --limit-eval. Raises ConfigError for a limit beyond its split, DataError for bad data."""
    root = resolve_root(cfg.data_dir)
    log(dist, f"reading CIFAR-10 from {root}...")
    if cfg.download:
        if dist.is_main:
            download(root)
        if dist.enabled:
            torch.distributed.barrier()
    train_x, train_y, test_x, test_y = load_cifar10(root, allow_small=cfg.allow_small_data)
    if cfg.val_split:
        if cfg.val_split >= len(train_x):
            raise ConfigError(f"--val-split {cfg.val_split} leaves no training images (the split has {len(train_x)})")
        order = np.random.default_rng(VAL_SPLIT_SEED).permutation(len(train_x))
        held, kept = order[: cfg.val_split], np.sort(order[cfg.val_split :])
        train_x, train_y, test_x, test_y = train_x[kept], train_y[kept], train_x[held], train_y[held]
    eval_total = len(test_x)
    # refused, not clamped: the run would record a limit it did not honour
    for name, limit, images in (("train", cfg.limit_train, len(train_x)), ("eval", cfg.limit_eval, eval_total)):
        if limit > images:
            raise ConfigError(f"--limit-{name} {limit} is more than the {images} images of its split; use at most that")
    if cfg.limit_train:
        train_x, train_y = train_x[: cfg.limit_train], train_y[: cfg.limit_train]
    if cfg.limit_eval:
        test_x, test_y = test_x[: cfg.limit_eval], test_y[: cfg.limit_eval]
    try:  # a rank without a single training image would have nothing to step on: refused before any loader
        check_every_rank_has_an_image(len(train_x), Order(world_size=dist.world_size))
    except ValueError as err:
        raise ConfigError(f"training split (after --val-split and --limit-train): {err}") from None
    if cfg.batch_size > len(train_x):
        # refused, not clipped: a clipped batch would not be the batch size recorded, nor the one the lr was chosen for
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is more than the {len(train_x)} training images (after --val-split and "
            f"--limit-train): an epoch would be one smaller batch; use --batch-size {len(train_x)} or less"
        )
    return Data(train_x, train_y, test_x, test_y, eval_split(cfg), root.resolve(), eval_total)


def rank_order(cfg: TrainConfig, dist: Dist, *, shuffle: bool = True) -> Order:
    """This rank's shard and order: reshuffled each epoch from --seed for training, in order for evaluation."""
    return Order(seed=cfg.seed, shuffle=shuffle, rank=dist.rank, world_size=dist.world_size)


def make_train_loader(cfg: TrainConfig, data: Data, device: torch.device, dist: Dist) -> Loader:
    """The training split, augmented by --aug's AugSpec, reshuffled each epoch; this rank's shard of each batch."""
    order = rank_order(cfg, dist)
    batch = cfg.batch_size // dist.world_size
    kwargs = {"spec": cfg.aug_spec(), "train": True, "order": order, "device": device, "workers": cfg.workers}
    return make_loader(cfg.loader, data.train_x, data.train_y, batch, **kwargs)


def make_eval_loader(cfg: TrainConfig, data: Data, device: torch.device, dist: Dist) -> Loader:
    """The evaluation split in order, normalized only; this rank's shard (evaluate sums over ranks)."""
    order = rank_order(cfg, dist, shuffle=False)
    batch = min(EVAL_BATCH_SIZE, len(data.eval_x))
    kwargs = {"spec": cfg.aug_spec(), "train": False, "order": order, "device": device, "workers": cfg.workers}
    return make_loader(cfg.loader, data.eval_x, data.eval_y, batch, **kwargs)
