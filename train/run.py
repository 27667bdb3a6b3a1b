"""`python -m train`: data, loaders, model, optimizer, the epoch loop, metrics and checkpoints. Works under torchrun.

`_train` reads top to bottom: setup, resume, wrap, epochs, finish. Everything it calls is below it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import model as models
from pipeline import make_loader
from pipeline.data import download, load_cifar10, resolve_root
from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_json
from train.config import ConfigError, TrainConfig
from train.dist import Dist, init_distributed, joined, log, ranks_in_sync
from train.loop import autocast, evaluate, predict, sync, train_one_epoch, tta_logits
from train.optim import make_optimizer, make_scheduler

# Images held out by --val-split are always the same ones (this seed), whatever --seed says, so that runs with
# different seeds are compared on one validation set.
VAL_SPLIT_SEED = 20260101
EVAL_BATCH_SIZE = 1000  # evaluation has no backward pass: larger batches, same numbers
# Settings that may differ between a run and its resumption: where things go and how they are shown, not what the
# remaining epochs compute. Every other TrainConfig field must match (so a new field is checked by default).
RESUMABLE_CHANGES = frozenset(
    {"out", "resume", "overwrite", "progress", "tensorboard", "workers", "data_dir", "download", "recipe"}
)
OUTPUT_FILES = ("metrics.json", "last.pt", "best.pt")


@dataclass
class Data:
    """uint8 NHWC images and int64 labels; `eval_name` is "test", or "val" for a held-out validation split."""

    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    eval_name: str


@dataclass
class RunState:
    """What a checkpoint holds and a resumed run restores (see `checkpoint_contents` and `restore`)."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: torch.optim.swa_utils.AveragedModel | None
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch


def main(cfg: TrainConfig) -> dict:
    """Run one training job (one rank of it under torchrun) and return its metrics (empty on ranks other than 0)."""
    dist = init_distributed(use_cuda=cfg.device != "cpu" and torch.cuda.is_available())
    try:
        metrics = _train(cfg, dist)
        if dist.enabled:
            # No rank tears its connections down while another still talks to it (gloo can abort the process
            # otherwise). Only on success: after a failure the others may be gone, and this would wait for them.
            torch.distributed.barrier()
        return metrics
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist) -> dict:
    # setup: every check that can fail cheaply comes before the data is read
    device = resolve_device(cfg.device, dist)
    out, resume_from = prepare_out(cfg, dist)
    saved = load_resumable(resume_from, cfg) if resume_from else None
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (global) must divide by the {dist.world_size} ranks")
    data = load_data(cfg, dist)
    torch.manual_seed(cfg.seed)
    train_loader = make_loader(
        cfg.loader,
        data.train_x,
        data.train_y,
        cfg.batch_size // dist.world_size,
        spec=cfg.aug_spec(),
        train=True,
        **shard_settings(cfg, device, dist),
    )
    eval_loader = make_eval_loader(cfg, data, device, dist)
    state = build_state(cfg, device, dist, total_steps=cfg.epochs * len(train_loader))
    # resume
    if saved:
        restore(state, saved, device)
        log(dist, f"resuming {resume_from} after epoch {len(state.history)}")
    # wrap: warm up outside the timing, then compile and DDP
    train_net = torch.compile(state.net, mode=compile_mode(cfg)) if cfg.compile else state.net
    warmup_seconds = warm_up(train_net, state.net, cfg, device, train_loader, eval_loader, len(state.history))
    train_net, eval_net = wrap(train_net, state, cfg, device, dist)
    log(
        dist,
        f"{cfg.model}: {models.count_params(state.net):,} parameters | loader {cfg.loader} on {device} | "
        f"{len(data.train_x):,} train, {len(data.eval_x):,} {data.eval_name} images | "
        f"global batch {cfg.batch_size} x {dist.world_size} rank(s)",
    )
    timings = {"warmup_seconds": warmup_seconds, "compile_seconds": warmup_seconds if cfg.compile else 0.0}
    writer = tensorboard_writer(cfg, out) if dist.is_main else None
    metrics: dict = {}
    # epochs
    for epoch in range(len(state.history), cfg.epochs):
        row = train_and_evaluate(
            epoch, train_net, eval_net, state, cfg, device, dist, train_loader, eval_loader, data.eval_name
        )
        state.history.append(row)
        if dist.is_main:
            metrics = record_epoch(state, cfg, device, dist, out, data.eval_name, timings, writer)
    # finish
    if writer is not None:
        writer.close()
    if dist.is_main and state.history:
        finish(state, eval_net, cfg, data, device, dist, out)
    return metrics


# --- setup ----------------------------------------------------------------------------------------------------------


def resolve_device(choice: str, dist: Dist) -> torch.device:
    """The torch device of `--device` (auto = CUDA if torch sees a GPU); this rank's GPU under torchrun."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank)


def prepare_out(cfg: TrainConfig, dist: Dist) -> tuple[Path, Path | None]:
    """The output folder, and the checkpoint to resume from (None for a new run)."""
    out = Path(cfg.out)
    if cfg.resume:
        return out, out / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(
            f"--out {out} already holds another run ({', '.join(existing)}); use --resume auto to continue it, "
            "--overwrite to replace it, or another --out"
        )
    if dist.is_main and cfg.overwrite:
        for name in existing:
            (out / name).unlink()
    return out, None


def load_resumable(path: Path, cfg: TrainConfig) -> dict:
    """The checkpoint at `path`, checked against `cfg`: CheckpointError if it was written with settings that change
    what the remaining epochs compute (every field but RESUMABLE_CHANGES), or if that run already finished."""
    saved = load_checkpoint(path)
    now = dataclasses.asdict(cfg)
    diffs = [
        f"{k}: {v!r} -> {now.get(k)!r}"
        for k, v in saved["config"].items()
        if k not in RESUMABLE_CHANGES and now.get(k) != v
    ]
    diffs += [
        f"{k}: (not set) -> {v!r}" for k, v in now.items() if k not in saved["config"] and k not in RESUMABLE_CHANGES
    ]
    if diffs:
        raise CheckpointError(
            f"{path}: was written with other settings ({'; '.join(diffs)}). Resume with the same "
            "flags, or start a new run in another --out."
        )
    if saved["epoch"] >= cfg.epochs:
        raise CheckpointError(f"{path}: that run already finished all {cfg.epochs} epochs; nothing to resume.")
    return saved


def load_data(cfg: TrainConfig, dist: Dist) -> Data:
    """Train and evaluation arrays; the evaluation split is the held-out validation set if --val-split is set."""
    root = resolve_root(cfg.data_dir)
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
    if cfg.limit_train:
        train_x, train_y = train_x[: cfg.limit_train], train_y[: cfg.limit_train]
    return Data(train_x, train_y, test_x, test_y, "val" if cfg.val_split else "test")


def shard_settings(cfg: TrainConfig, device: torch.device, dist: Dist, *, sharded: bool = True) -> dict:
    """The loader settings shared by training and evaluation: this rank's shard (or all of it), device, seed."""
    rank, world_size = (dist.rank, dist.world_size) if sharded else (0, 1)
    return dict(rank=rank, world_size=world_size, device=device, workers=cfg.workers, seed=cfg.seed)


def make_eval_loader(cfg: TrainConfig, data: Data, device: torch.device, dist: Dist, *, sharded: bool = True):
    """The evaluation split in order, normalized only; this rank's shard (evaluate sums over ranks) unless
    `sharded=False` (every image, for the predictions rank 0 writes)."""
    return make_loader(
        cfg.loader,
        data.eval_x,
        data.eval_y,
        min(EVAL_BATCH_SIZE, len(data.eval_x)),
        spec=cfg.aug_spec(),
        train=False,
        shuffle=False,
        **shard_settings(cfg, device, dist, sharded=sharded),
    )


def build_state(cfg: TrainConfig, device: torch.device, dist: Dist, *, total_steps: int) -> RunState:
    """A fresh network (channels_last, SyncBatchNorm if asked), its optimizer, lr schedule and weight EMA."""
    net = models.build(cfg.model).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = make_optimizer(net, cfg)
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True
        )
    return RunState(net, optimizer, make_scheduler(optimizer, cfg, total_steps), ema)


# --- checkpoints: their contents are defined here and nowhere else --------------------------------------------------


def checkpoint_contents(state: RunState, cfg: TrainConfig, device: torch.device) -> dict:
    """Everything a resumed run needs to compute exactly what an uninterrupted one would have. The loaders need no
    state: they derive order and augmentations from (seed, epoch)."""
    return {
        "model": state.net.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "epoch": len(state.history),
        "config": dataclasses.asdict(cfg),
        "history": state.history,
        "rng": rng_state(device),
    }


def restore(state: RunState, saved: dict, device: torch.device) -> None:
    """Put a checkpoint made by `checkpoint_contents` back into `state`."""
    state.net.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.ema is not None:
        state.ema.load_state_dict(saved["ema"])
    set_rng_state(saved["rng"], device)
    state.history = list(saved["history"])


def rng_state(device: torch.device) -> dict:
    """torch's CPU generator and, on CUDA, the device's: the random state a run carries between epochs."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(saved: dict, device: torch.device) -> None:
    """Undo to a state from `rng_state`."""
    torch.set_rng_state(saved["torch"])
    if device.type == "cuda" and saved.get("cuda") is not None:
        torch.cuda.set_rng_state(saved["cuda"], device)


# --- wrap -----------------------------------------------------------------------------------------------------------


def compile_mode(cfg: TrainConfig) -> str | None:
    return None if cfg.compile_mode == "default" else cfg.compile_mode


def warm_up(
    train_net: nn.Module,
    net: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    train_loader,
    eval_loader,
    epoch: int,
) -> float:
    """Run every shape the timed loop will see once, outside the timing: the first real training batch (forward
    and backward, no optimizer step), the last partial batch, and the evaluation batches. This is where CUDA and
    cuDNN pick kernels, lazy modules load, DALI allocates its buffers and torch.compile compiles; on the H200 it was
    ~6 s of the first epoch. Weights, BatchNorm statistics and the random state are put back afterwards, so the run
    computes exactly what it would have computed without it. Returns the seconds it took."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    rng = rng_state(device)
    sync(device)
    start = time.perf_counter()
    train_loader.set_epoch(epoch)
    first = next(iter(train_loader))[0]
    shapes = [first]
    full, tail = divmod(train_loader.num_samples, len(first))
    if tail and len(train_loader) > full:  # the last, partial batch is another shape
        layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
        shapes.append(first[:tail].clone(memory_format=layout))
    train_net.train()
    for x in shapes:
        with autocast(device, cfg.amp):
            loss = train_net(x).float().logsumexp(1).mean()
        loss.backward()
    net.zero_grad(set_to_none=True)
    train_net.eval()
    with torch.no_grad():
        for xb, _ in eval_loader:
            tta_logits(train_net, xb, device=device, amp=cfg.amp, tta=cfg.tta)
            if not cfg.compile:
                break  # eager: one batch warms everything; compiled: every shape once
    sync(device)
    net.load_state_dict(saved)
    set_rng_state(rng, device)
    return time.perf_counter() - start


def wrap(
    train_net: nn.Module, state: RunState, cfg: TrainConfig, device: torch.device, dist: Dist
) -> tuple[nn.Module, nn.Module]:
    """(the module to train, the module to evaluate): DDP around the first under torchrun; the EMA copy, the
    compiled net, or the plain net for the second."""
    compiled = train_net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_net = DDP(train_net, device_ids=[device.index] if device.type == "cuda" else None)
    if state.ema is not None:
        return train_net, state.ema.module
    return train_net, compiled


# --- epochs ---------------------------------------------------------------------------------------------------------


def train_and_evaluate(
    epoch: int,
    train_net: nn.Module,
    eval_net: nn.Module,
    state: RunState,
    cfg: TrainConfig,
    device: torch.device,
    dist: Dist,
    train_loader,
    eval_loader,
    eval_name: str,
) -> dict:
    """One epoch of training, then one evaluation: the epoch's metrics row (also printed)."""
    train_loader.set_epoch(epoch)
    bar = progress_bar(cfg, dist, epoch, len(train_loader))
    after_step = (lambda: state.ema.update_parameters(state.net)) if state.ema is not None else None
    stats = train_one_epoch(
        train_net,
        joined(train_loader, train_net, dist),
        state.optimizer,
        state.scheduler,
        device=device,
        epoch=epoch,
        amp=cfg.amp,
        label_smoothing=cfg.label_smoothing,
        after_step=after_step,
        progress=bar.update if bar else None,
    )
    if bar:
        bar.close()
    evaluated = evaluate(eval_net, eval_loader, device=device, amp=cfg.amp, tta=cfg.tta)
    row = {
        "epoch": epoch + 1,
        **stats,
        f"{eval_name}_loss": evaluated["loss"],
        f"{eval_name}_acc": evaluated["acc"],
        f"{eval_name}_images": evaluated["count"],
        "lr": state.scheduler.get_last_lr()[0],
    }
    if dist.enabled:
        row["ranks_in_sync"] = ranks_in_sync(state.net)
    log(
        dist,
        f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.2%} | "
        f"{eval_name} loss {evaluated['loss']:.4f} acc {evaluated['acc']:.2%} ({evaluated['count']:,} images) "
        f"| {stats['seconds']:.1f}s, {stats['img_per_s']:,.0f} img/s",
    )
    return row


def record_epoch(
    state: RunState,
    cfg: TrainConfig,
    device: torch.device,
    dist: Dist,
    out: Path,
    eval_name: str,
    timings: dict,
    writer: object | None,
) -> dict:
    """Rank 0, after each epoch: metrics.json, last.pt, best.pt (when the evaluation accuracy improved), tensorboard.
    Returns the metrics written."""
    history = state.history
    metrics = {
        "recipe": cfg.recipe,
        "config": dataclasses.asdict(cfg),
        "env": environment(device, dist),
        "params": models.count_params(state.net),
        "eval_split": eval_name,
        "train_seconds": sum(e["seconds"] for e in history),
        **timings,
        "epochs": history,
    }
    save_json(metrics, out / "metrics.json")
    checkpoint = checkpoint_contents(state, cfg, device)
    save_checkpoint(checkpoint, out / "last.pt")
    accuracy = [e[f"{eval_name}_acc"] for e in history]
    if accuracy[-1] > max(accuracy[:-1], default=-1.0):
        save_checkpoint(checkpoint, out / "best.pt")
    if writer is not None:
        for key, value in history[-1].items():
            if key != "epoch":
                writer.add_scalar(key, value, len(history))
    return metrics


# --- finish ---------------------------------------------------------------------------------------------------------


def finish(
    state: RunState, eval_net: nn.Module, cfg: TrainConfig, data: Data, device: torch.device, dist: Dist, out: Path
) -> None:
    """Rank 0, after the last epoch: the summary line, predictions.npz and the plots."""
    from train.report import save_predictions, write_run_plots

    key = f"{data.eval_name}_acc"
    last, best = state.history[-1][key], max(e[key] for e in state.history)
    train_seconds = sum(e["seconds"] for e in state.history)
    log(
        dist,
        f"done: final {data.eval_name} accuracy {last:.2%} (best {best:.2%}), training {train_seconds:.1f}s "
        f"over {len(state.history)} epochs -> {out}/metrics.json",
    )
    ordered = make_eval_loader(cfg, data, device, dist, sharded=False)
    probabilities = predict(eval_net, ordered, device=device, amp=cfg.amp, tta=cfg.tta).numpy()
    save_predictions(out / "predictions.npz", data.eval_x, data.eval_y, probabilities)
    written = write_run_plots(out)
    log(dist, f"plots: {', '.join(p.name for p in written)}")


def environment(device: torch.device, dist: Dist) -> dict[str, object]:
    """Versions and hardware, for metrics.json."""
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
        "world_size": dist.world_size,
        "hostname": platform.node(),
    }


def progress_bar(cfg: TrainConfig, dist: Dist, epoch: int, total: int):
    """A tqdm bar over the epoch's batches on rank 0 (None with --no-progress or on other ranks)."""
    if not (cfg.progress and dist.is_main):
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, dynamic_ncols=True)

    class Bar:
        def update(self, batch: int, loss: float, acc: float, img_per_s: float) -> None:
            bar.n = batch
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1%}", img_s=f"{img_per_s:,.0f}", refresh=False)
            bar.refresh()

        def close(self) -> None:
            bar.close()

    return Bar()


def tensorboard_writer(cfg: TrainConfig, out: Path):
    """A tensorboard SummaryWriter in <out>/tensorboard with --tensorboard, else None."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))
