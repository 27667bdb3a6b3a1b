"""`python -m train`: data, loaders, model, optimizer, the epoch loop, metrics and checkpoints. Works under torchrun.

`_train` reads top to bottom: setup, resume, wrap, epochs, finish. Everything it calls is below it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import model as models
from pipeline import Loader, Order, make_loader
from pipeline.data import download, load_cifar10, resolve_root
from pipeline.order import batch_sizes, check_every_rank_has_an_image, epoch_indices
from train import wall_seconds
from train.checkpoint import CheckpointError, first_difference, load_checkpoint
from train.config import ConfigError, TrainConfig, check_hardware, cuda_graph_blockers, resolve_auto
from train.dist import Dist, broadcast_buffers, init_distributed, log, ranks_in_sync, require_agreement
from train.loop import Progress, evaluate, sync, train_one_epoch, tta_logits
from train.optim import make_optimizer, make_scheduler
from train.outdir import RunFolder, on_main, run_folder
from train.step import TrainStep, autocast

# Images held out by --val-split are always the same ones (this seed), whatever --seed says, so that runs with
# different seeds are compared on one validation set.
VAL_SPLIT_SEED = 20260101
EVAL_BATCH_SIZE = 1000  # evaluation has no backward pass: larger batches, same numbers
# Settings that may differ between a run and its resumption: where things go and how they are shown, not what the
# remaining epochs compute. Every other TrainConfig field must match (so a new field is checked by default).
RESUMABLE_CHANGES = frozenset(
    {"out", "resume", "overwrite", "progress", "tensorboard", "workers", "data_dir", "download", "recipe"}
)


@dataclass
class Data:
    """uint8 NHWC images and int64 labels; `eval_name` is "test", or "val" for a held-out validation split."""

    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    eval_name: str
    root: Path  # the folder the data was read from, resolved (flag, $CIFAR10_ROOT or the default)


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
    check_hardware(cfg, device, dist)  # every check of a flag against the device or the world size
    cfg = resolve_auto(cfg, device)
    with run_folder(cfg.out, dist, cfg.epochs) as folder:  # locked by this run until it ends (train/outdir.py)
        return _run(cfg, dist, device, folder)


def _run(cfg: TrainConfig, dist: Dist, device: torch.device, folder: RunFolder) -> dict:
    """The run inside its locked folder: the rest of setup, resume, wrap, epochs, finish."""
    saved, resume_from = open_run(cfg, dist, folder)  # the checkpoint is verified before the data is read
    data = load_data(cfg, dist)
    torch.manual_seed(cfg.seed)
    train_loader, eval_loader = make_train_loader(cfg, data, device, dist), make_eval_loader(cfg, data, device, dist)
    # every rank runs the same number of steps (so DDP needs no Join), and every node read the same data: checked
    require_agreement(
        {"training images": len(data.train_x), "evaluation images": len(data.eval_x), "batches": len(train_loader)},
        device,
        dist,
    )
    state = build_state(cfg, device, dist, total_steps=cfg.epochs * len(train_loader))
    # resume
    if saved:
        restore(state, saved, device)
        log(dist, f"resuming {resume_from} after epoch {len(state.history)}")
    # wrap: compile, DDP and the training step; warm up every shape outside the timing (capturing the CUDA graph)
    inner = torch.compile(state.net, mode=compile_mode(cfg)) if cfg.compile else state.net
    train_net, eval_net = wrap(inner, state, cfg, device, dist)
    step = make_step(train_net, state, cfg, device, dist, steps_per_epoch=len(train_loader))
    log(dist, describe_run(cfg, state, step, data, dist))
    sizes = batch_sizes(len(data.train_x), cfg.batch_size // dist.world_size, rank_order(cfg, dist))
    warmup_seconds = warm_up(step, inner, eval_net, cfg, train_loader, eval_loader, len(state.history), sizes)
    # (rank 0 writes metrics.json: only it runs git and hashes the source)
    run_info = describe_for_metrics(cfg, step, data, dist, warmup_seconds, train_loader) if dist.is_main else {}
    writer = tensorboard_writer(cfg, folder.path) if dist.is_main else None
    metrics, probabilities = {}, None
    # epochs
    epochs_to_run = range(len(state.history), cfg.epochs)
    for epoch in epochs_to_run:
        row, probabilities = train_and_evaluate(
            epoch, step, eval_net, state, cfg, dist, train_loader, eval_loader, data
        )
        state.history.append(row)
        if dist.is_main:
            metrics = record_epoch(state, cfg, device, folder, data.eval_name, run_info, writer)
    # finish
    if writer is not None:
        writer.close()
    if not epochs_to_run:  # resumed after its last epoch (killed before the run finished): finish only
        probabilities = final_probabilities(eval_net, eval_loader, cfg, step.device, data, dist)
        metrics = run_metrics(state, cfg, data.eval_name, run_info)
    if dist.is_main:
        metrics = finish(state, metrics, probabilities, cfg, data, dist, folder)
    return metrics


# --- setup ----------------------------------------------------------------------------------------------------------


def resolve_device(choice: str, dist: Dist) -> torch.device:
    """The torch device of `--device` (auto = CUDA if torch sees a GPU); this rank's GPU under torchrun."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank)


def open_run(cfg: TrainConfig, dist: Dist, folder: RunFolder) -> tuple[dict | None, Path | None]:
    """(the verified checkpoint to resume, its path), or (None, None) for a new run; the folder takes the run on
    (train/outdir.py: a resumed checkpoint must be of the run the folder holds, a new run needs an empty folder or
    --overwrite). Raises ConfigError / CheckpointError before any data is read."""
    if not cfg.resume:
        on_main(dist, folder.start_new, cfg.overwrite)
        return None, None
    path = folder.path / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
    saved = load_resumable(path, cfg)
    on_main(dist, folder.adopt, saved, path, best_epoch(saved["history"], eval_split(cfg)))
    return saved, path


def load_resumable(path: Path, cfg: TrainConfig) -> dict:
    """The checkpoint at `path`, verified (train/checkpoint.py `load_checkpoint`) and checked against `cfg`:
    CheckpointError if it was written with settings that change what the remaining epochs compute (every field but
    RESUMABLE_CHANGES), or if its contents do not fit what `cfg` builds (`verify_contents`)."""
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
    problem = verify_contents(saved, cfg)
    if problem:
        raise CheckpointError(
            f"{path}: does not fit the run these settings build: {problem}. Resume from a checkpoint this tool wrote "
            "with the same flags, or start a new run in another --out."
        )
    return saved


def eval_split(cfg: TrainConfig) -> str:
    """The name of the evaluation split in metrics: "val" for a held-out --val-split, else "test"."""
    return "val" if cfg.val_split else "test"


def best_epoch(history: list[dict], eval_name: str) -> int | None:
    """The evaluated epoch (1-based) with the highest accuracy, the earliest of equals: the one best.pt holds. None
    before the first evaluation (--eval-every)."""
    key, best = f"{eval_name}_acc", None
    for row in history:
        if key in row and (best is None or row[key] > history[best - 1][key]):
            best = row["epoch"]
    return best


def load_data(cfg: TrainConfig, dist: Dist) -> Data:
    """Train and evaluation arrays; the evaluation split is the held-out validation set if --val-split is set."""
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
    if cfg.limit_train:
        train_x, train_y = train_x[: cfg.limit_train], train_y[: cfg.limit_train]
    try:  # a rank without a single training image would have nothing to step on: refused before any loader
        check_every_rank_has_an_image(len(train_x), Order(world_size=dist.world_size))
    except ValueError as err:
        raise ConfigError(f"training split (after --val-split and --limit-train): {err}") from None
    if cfg.batch_size > len(train_x):
        # refused, not clipped: a clipped batch would not be the batch size metrics.json records, nor the one the
        # learning rate was chosen for
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is more than the {len(train_x)} training images (after --val-split and "
            f"--limit-train): an epoch would be one smaller batch; use --batch-size {len(train_x)} or less"
        )
    return Data(train_x, train_y, test_x, test_y, eval_split(cfg), root.resolve())


def rank_order(cfg: TrainConfig, dist: Dist, *, shuffle: bool = True) -> Order:
    """This rank's shard and order: reshuffled each epoch from --seed for training, in order for evaluation."""
    return Order(seed=cfg.seed, shuffle=shuffle, rank=dist.rank, world_size=dist.world_size)


def make_train_loader(cfg: TrainConfig, data: Data, device: torch.device, dist: Dist) -> Loader:
    """The training split, augmented by the AugSpec, reshuffled each epoch; this rank's shard of each global batch."""
    return make_loader(
        cfg.loader,
        data.train_x,
        data.train_y,
        cfg.batch_size // dist.world_size,
        spec=cfg.aug_spec(),
        train=True,
        order=rank_order(cfg, dist),
        device=device,
        workers=cfg.workers,
    )


def make_eval_loader(cfg: TrainConfig, data: Data, device: torch.device, dist: Dist) -> Loader:
    """The evaluation split in order, normalized only; this rank's shard (evaluate sums over ranks)."""
    return make_loader(
        cfg.loader,
        data.eval_x,
        data.eval_y,
        min(EVAL_BATCH_SIZE, len(data.eval_x)),
        spec=cfg.aug_spec(),
        train=False,
        order=rank_order(cfg, dist, shuffle=False),
        device=device,
        workers=cfg.workers,
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


def checkpoint_contents(state: RunState, cfg: TrainConfig, device: torch.device, *, run_id: str) -> dict:
    """Everything a resumed run needs to compute exactly what an uninterrupted one would have, and the run it belongs
    to (`run_id`, which metrics.json repeats). The loaders need no state: they derive order and augmentations from
    (seed, epoch). train/checkpoint.py CHECKPOINT_FIELDS lists these keys with their types."""
    return {
        "model": state.net.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "epoch": len(state.history),
        "config": dataclasses.asdict(cfg),
        "history": state.history,
        "rng": rng_state(device),
        "run_id": run_id,
    }


def verify_contents(saved: dict, cfg: TrainConfig) -> str | None:
    """What in checkpoint `saved` does not fit the state `cfg` builds, e.g. "model.fc.weight is a float32 tensor of
    shape [10, 128], expected [10, 64]"; None when everything fits. Compared with a fresh build on the CPU: the
    tensors' shapes and dtypes and the layout of model, optimizer (its per-parameter state after one step), schedule,
    EMA and random state, and the metrics every history row needs. Catches what `restore` would otherwise trip on
    only after the data was read, or not at all."""
    cpu = torch.device("cpu")
    fresh = build_state(cfg, cpu, Dist(), total_steps=1)
    for p in fresh.net.parameters():
        p.grad = torch.zeros_like(p)
    fresh.optimizer.step()  # creates the per-parameter state (momentum buffers, ...) that a checkpoint holds
    expected = checkpoint_contents(fresh, cfg, cpu, run_id="")
    return (
        first_difference(saved["model"], expected["model"], "model")
        or first_difference(saved["ema"], expected["ema"], "ema")
        or _optimizer_difference(saved["optimizer"], expected["optimizer"])
        or first_difference(saved["scheduler"], expected["scheduler"], "scheduler", required=("base_lrs", "last_epoch"))
        or first_difference(saved["rng"].get("torch"), expected["rng"]["torch"], "rng.torch")
        or _cuda_rng_difference(saved["rng"].get("cuda"))
        or _history_difference(saved["history"], cfg)
    )


def _optimizer_difference(saved: dict, expected: dict) -> str | None:
    state, groups = saved.get("state"), saved.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        return "optimizer is not an optimizer's state dict (a dict 'state' and a list 'param_groups')"
    if len(groups) != len(expected["param_groups"]):
        return f"optimizer holds {len(groups)} parameter group(s), expected {len(expected['param_groups'])}"
    for i, (group, fresh) in enumerate(zip(groups, expected["param_groups"], strict=True)):
        found = first_difference(group, fresh, f"optimizer.param_groups[{i}]", required=("params",))
        if found:
            return found
    # per-parameter state exists only for parameters that had a gradient: a subset of the fresh one's
    unknown = [k for k in state if k not in expected["state"]]
    if unknown:
        return f"optimizer.state has entries for parameters {unknown[:3]} that the model does not have"
    return first_difference(state, {k: expected["state"][k] for k in state}, "optimizer.state")


def _cuda_rng_difference(cuda: object) -> str | None:
    if cuda is None or (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8 and cuda.dim() == 1):
        return None
    return "rng.cuda is neither None nor a CUDA generator state (a 1-D uint8 tensor)"


def _history_difference(history: list[dict], cfg: TrainConfig) -> str | None:
    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    accuracy = f"{eval_split(cfg)}_acc"
    for row in history:
        evaluated = row["epoch"] % cfg.eval_every == 0 or row["epoch"] == cfg.epochs  # as train_and_evaluate does
        for key in ("seconds", accuracy) if evaluated else ("seconds",):
            if not number(row.get(key)):
                return f"history row of epoch {row['epoch']} has no number {key!r}"
    return None


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
    step: TrainStep,
    net: nn.Module,
    eval_net: nn.Module,
    cfg: TrainConfig,
    train_loader: Loader,
    eval_loader: Loader,
    epoch: int,
    sizes: list[int],
) -> float:
    """Run every shape the timed loop will see once, outside the timing: the first real training batch and every
    other batch size of the epoch (`sizes`: the last batch may be smaller, or one image larger under torchrun), as
    forward and backward (with a CUDA-graph step, the first batch's shape is captured instead), and the
    evaluation batches. This is where CUDA and cuDNN pick kernels, lazy modules load, DALI allocates its buffers and
    torch.compile compiles; on the H200 it was ~6 s of the first epoch. Weights, BatchNorm statistics, optimizer
    state and the random state are put back afterwards, so the run computes exactly what it would have computed
    without it. `net` is the network without DDP (under torchrun the ranks' last batches may differ, and a DDP
    backward would wait for the others). Returns the seconds it took."""
    device = step.device
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    rng = rng_state(device)
    sync(device)
    start = time.perf_counter()
    train_loader.set_epoch(epoch)
    first_x, first_y = next(iter(train_loader))
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    others = sorted(set(sizes) - {len(first_x)})
    shapes = [
        torch.cat([first_x] * -(-size // len(first_x)))[:size].contiguous(memory_format=layout) for size in others
    ]
    if step.graphed:
        step.capture(first_x, first_y)  # restores what its own warm-up steps changed
    else:
        shapes.insert(0, first_x)
    net.train()
    for x in shapes:
        with autocast(device, cfg.amp):
            loss = net(x).float().logsumexp(1).mean()
        loss.backward()
    net.zero_grad(set_to_none=True)
    eval_net.eval()
    with torch.no_grad():
        for xb, _ in eval_loader:
            tta_logits(eval_net, xb, device=device, amp=cfg.amp, tta=cfg.tta)
            if not cfg.compile:
                break  # eager: one batch warms everything; compiled: every shape once
    sync(device)
    net.load_state_dict(saved)
    set_rng_state(rng, device)
    return time.perf_counter() - start


def describe_run(cfg: TrainConfig, state: RunState, step: TrainStep, data: Data, dist: Dist) -> str:
    """The lines printed before the warm-up: what is trained on what, and what happens next."""
    graph = step.graphed
    return (
        f"{cfg.model}: {models.count_params(state.net):,} parameters | loader {cfg.loader} on {step.device} | "
        f"{'CUDA-graph' if graph else 'eager'} step | {len(data.train_x):,} train, {len(data.eval_x):,} "
        f"{data.eval_name} images | global batch {cfg.batch_size} x {dist.world_size} rank(s)\n"
        f"warming up (every batch shape once{', capturing the CUDA graph' if graph else ''}; not timed)..."
    )


def wrap(
    net: nn.Module, state: RunState, cfg: TrainConfig, device: torch.device, dist: Dist
) -> tuple[nn.Module, nn.Module]:
    """(the module to train, the module to evaluate) for `net` (compiled or not): DDP around it under torchrun;
    the EMA copy, or `net` itself, for evaluation."""
    train_net = net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return train_net, state.ema.module if state.ema is not None else net


def make_step(
    train_net: nn.Module, state: RunState, cfg: TrainConfig, device: torch.device, dist: Dist, *, steps_per_epoch: int
) -> TrainStep:
    """The training step: replayed as a CUDA graph if `--cuda-graph` is on, or auto and nothing blocks it; else
    eager. The weight EMA, if any, updates after every step (eagerly, with a host sync each step: AveragedModel
    checks its counter on the host)."""
    graphed = cfg.cuda_graph != "off" and not cuda_graph_blockers(cfg, device, dist)
    after_step = (lambda: state.ema.update_parameters(state.net)) if state.ema is not None else None
    return TrainStep(
        train_net,
        state.optimizer,
        state.scheduler,
        steps_per_epoch=steps_per_epoch,
        label_smoothing=cfg.label_smoothing,
        amp=cfg.amp,
        device=device,
        graphed=graphed,
        after_step=after_step,
    )


# --- epochs ---------------------------------------------------------------------------------------------------------


def train_and_evaluate(
    epoch: int,
    step: TrainStep,
    eval_net: nn.Module,
    state: RunState,
    cfg: TrainConfig,
    dist: Dist,
    train_loader: Loader,
    eval_loader: Loader,
    data: Data,
) -> tuple[dict, np.ndarray | None]:
    """One epoch of training, then (every --eval-every epochs, and after the last) one evaluation: the epoch's
    metrics row (also printed), and on the last epoch the evaluation's class probabilities (rank 0: every image of
    the evaluation split in order; None elsewhere)."""
    eval_name = data.eval_name
    train_loader.set_epoch(epoch)
    with progress_bar(cfg, dist, f"epoch {epoch + 1}/{cfg.epochs}", len(train_loader)) as bar:
        stats = train_one_epoch(step, train_loader, epoch=epoch, progress=bar)
    row = {"epoch": epoch + 1, **stats, "lr": state.scheduler.get_last_lr()[0]}
    if dist.enabled:  # evaluate, and save, rank 0's model on every rank (train.dist.broadcast_buffers says why)
        broadcast_buffers(state.net, state.ema)
        row["ranks_in_sync"] = ranks_in_sync(state.net, state.ema)
    summary = f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.2%}"
    probabilities = None
    last = epoch + 1 == cfg.epochs
    if last or (epoch + 1) % cfg.eval_every == 0:
        sync(step.device)
        start = time.perf_counter()
        with progress_bar(cfg, dist, f"evaluating on {eval_name}", len(eval_loader)) as bar:
            evaluated = evaluate(
                eval_net,
                eval_loader,
                device=step.device,
                amp=cfg.amp,
                tta=cfg.tta,
                keep_probabilities=last,
                progress=bar,
            )
        row.update(
            {
                f"{eval_name}_loss": evaluated["loss"],
                f"{eval_name}_acc": evaluated["acc"],
                f"{eval_name}_images": evaluated["count"],
                "eval_seconds": time.perf_counter() - start,
            }
        )
        summary += (
            f" | {eval_name} loss {evaluated['loss']:.4f} acc {evaluated['acc']:.2%} ({evaluated['count']:,} images)"
        )
        if last:
            probabilities = gather_in_order(evaluated["probabilities"], len(data.eval_x), dist)
    log(dist, f"{summary} | {stats['seconds']:.1f}s, {stats['img_per_s']:,.0f} img/s")
    return row, probabilities


def gather_in_order(probabilities: torch.Tensor, n: int, dist: Dist) -> np.ndarray | None:
    """float32 [n, classes] probabilities of the whole (unshuffled) evaluation split in order, on rank 0, from each
    rank's shard (None on the other ranks). Without torchrun the one shard is already everything, in order."""
    if not dist.enabled:
        return probabilities.numpy()
    shards: list = [None] * dist.world_size
    torch.distributed.all_gather_object(shards, probabilities.numpy())
    if not dist.is_main:
        return None
    full = np.empty((n, probabilities.shape[1]), np.float32)
    for rank, shard in enumerate(shards):
        full[epoch_indices(n, 0, Order(shuffle=False, rank=rank, world_size=dist.world_size))] = shard
    return full


def record_epoch(
    state: RunState,
    cfg: TrainConfig,
    device: torch.device,
    folder: RunFolder,
    eval_name: str,
    run_info: dict,
    writer: object | None,
) -> dict:
    """Rank 0, after each epoch: last.pt, best.pt (when the evaluation accuracy improved), then metrics.json, the
    commit record (train/outdir.py says why in that order); then tensorboard. `run_info` holds what is fixed for the
    run (env, resolved settings, warm-up time). Returns the metrics written."""
    history = state.history
    checkpoint = checkpoint_contents(state, cfg, device, run_id=folder.run_id)
    best = best_epoch(history, eval_name) == len(history)
    metrics = folder.commit_epoch(checkpoint, run_metrics(state, cfg, eval_name, run_info), best=best)
    if writer is not None:
        for name, value in history[-1].items():
            if name != "epoch" and isinstance(value, int | float):
                writer.add_scalar(name, value, len(history))
    return metrics


def run_metrics(state: RunState, cfg: TrainConfig, eval_name: str, run_info: dict) -> dict:
    """metrics.json's contents for the epochs so far (RunFolder adds run_id, the checkpoints' epochs, finished)."""
    history = state.history
    return {
        "recipe": cfg.recipe,
        "config": dataclasses.asdict(cfg),
        "params": models.count_params(state.net),
        "eval_split": eval_name,
        "train_seconds": sum(e["seconds"] for e in history),
        "eval_seconds": sum(e.get("eval_seconds", 0.0) for e in history),
        **run_info,
        "wall_seconds": wall_seconds(),
        "epochs": history,
    }


# --- finish ---------------------------------------------------------------------------------------------------------


def finish(
    state: RunState,
    metrics: dict,
    probabilities: np.ndarray,
    cfg: TrainConfig,
    data: Data,
    dist: Dist,
    folder: RunFolder,
) -> dict:
    """Rank 0, after the last epoch: the summary line, predictions.npz (from the final evaluation's probabilities),
    the plots, and metrics.json once more, marked finished, with the whole command's wall_seconds. Returns the final
    metrics."""
    from train.report import save_predictions, write_run_plots

    out = folder.path
    key = f"{data.eval_name}_acc"
    evaluated = [e[key] for e in state.history if key in e]
    log(
        dist,
        f"done: final {data.eval_name} accuracy {evaluated[-1]:.2%} (best {max(evaluated):.2%}), training "
        f"{metrics['train_seconds']:.1f}s over {len(state.history)} epochs -> {out}/metrics.json",
    )
    log(dist, f"writing predictions.npz and the plots (curves, confusion, misclassified) to {out}...")
    written = []
    folder.write_outputs(lambda: save_predictions(out / "predictions.npz", data.eval_x, data.eval_y, probabilities))
    folder.write_outputs(lambda: written.extend(write_run_plots(out)))
    metrics = folder.commit_finished({**metrics, "wall_seconds": wall_seconds()})
    log(dist, f"plots: {', '.join(p.name for p in written)} | whole command {metrics['wall_seconds']:.1f}s")
    return metrics


def final_probabilities(
    eval_net: nn.Module, eval_loader: Loader, cfg: TrainConfig, device: torch.device, data: Data, dist: Dist
) -> np.ndarray | None:
    """The final model's class probabilities over the evaluation split in order (rank 0; None elsewhere), for a run
    resumed after its last epoch: what that epoch's evaluation would have handed to `finish`."""
    evaluated = evaluate(eval_net, eval_loader, device=device, amp=cfg.amp, tta=cfg.tta, keep_probabilities=True)
    return gather_in_order(evaluated["probabilities"], len(data.eval_x), dist)


def describe_for_metrics(
    cfg: TrainConfig, step: TrainStep, data: Data, dist: Dist, warmup_seconds: float, train_loader: Loader
) -> dict:
    """The metrics.json fields fixed for the whole run: env, resolved settings, warm-up and compile seconds."""
    return {
        "env": environment(step.device, dist),
        "resolved": {**resolved_settings(cfg, step, data, dist), "workers": train_loader.workers},
        "warmup_seconds": warmup_seconds,
        "compile_seconds": warmup_seconds if cfg.compile else 0.0,
    }


def resolved_settings(cfg: TrainConfig, step: TrainStep, data: Data, dist: Dist) -> dict[str, object]:
    """What actually ran where the config leaves it open: the data folder, the device, whether bf16 autocast and the
    CUDA graph were really on (both need CUDA), the torchrun world, the images trained and evaluated on (and, added
    by the caller, the loader's workers or DALI threads)."""
    return {
        "data_dir": str(data.root),
        "device": str(step.device),
        "amp": cfg.amp and step.device.type == "cuda",
        "cuda_graph": step.graphed,
        "world_size": dist.world_size,
        "per_rank_batch_size": cfg.batch_size // dist.world_size,
        # after --val-split and --limit-train (a limit beyond the split means all of it)
        "train_images": len(data.train_x),
        "eval_images": len(data.eval_x),
    }


def code_version() -> dict[str, str | None]:
    """Which code ran: the package version, `git describe --always --dirty` when the source is a git checkout, and
    a SHA-256 of the project's .py files (so a copy without git can be identified too)."""
    import hashlib
    import subprocess
    from importlib import metadata

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
        git = (
            subprocess.run(
                ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        git = None
    return {"package": version, "git": git, "source_sha256": digest.hexdigest()}


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
        "code": code_version(),
    }


@contextlib.contextmanager
def progress_bar(cfg: TrainConfig, dist: Dist, title: str, total: int) -> Iterator[Progress | None]:
    """A tqdm bar over `total` batches on rank 0 (None with --no-progress or on other ranks): it advances every
    batch (no device read) and shows loss, accuracy and img/s when the loop reads them (train.loop.SYNC_EVERY)."""
    if not (cfg.progress and dist.is_main):
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=title, unit="batch", leave=False, dynamic_ncols=True)

    class Bar:
        def advance(self) -> None:
            bar.update(1)

        def show(self, loss: float, acc: float, img_per_s: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1%}", img_s=f"{img_per_s:,.0f}")

    try:
        yield Bar()
    finally:
        bar.close()


def tensorboard_writer(cfg: TrainConfig, out: Path):
    """A tensorboard SummaryWriter in <out>/tensorboard with --tensorboard, else None."""
    if not cfg.tensorboard:
        return None
    try:  # config.validate found the package; an install that fails to import is one line too
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(f"--tensorboard: the tensorboard package does not import ({err})") from None
    return SummaryWriter(str(out / "tensorboard"))
