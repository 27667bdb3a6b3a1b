"""`python -m train`: data, loaders, model, optimizer, the epoch loop, metrics and checkpoints. Works under torchrun."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import model as models
from pipeline import make_loader
from pipeline.data import download, load_cifar10, resolve_root
from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_json
from train.config import ConfigError, TrainConfig
from train.loop import autocast, evaluate, predict, sync, train_one_epoch, tta_logits

# Images held out by --val-split are always the same ones (this seed), whatever --seed says, so that runs with
# different seeds are compared on one validation set.
VAL_SPLIT_SEED = 20260101
EVAL_BATCH_SIZE = 1000  # evaluation has no backward pass: larger batches, same numbers
# Keys that must match to resume: they change what the remaining epochs would compute.
RESUME_KEYS = (
    "model",
    "loader",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "schedule",
    "warmup_frac",
    "seed",
    "aug",
    "val_split",
    "limit_train",
    "ema",
    "label_smoothing",
    "weight_decay",
    "momentum",
    "nesterov",
)
OUTPUT_FILES = ("metrics.json", "last.pt", "best.pt")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def log(dist: Dist, message: str) -> None:
    if dist.is_main:
        print(message, flush=True)


def resolve_device(choice: str, dist: Dist) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank)


def init_distributed(cfg: TrainConfig) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single-process run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    dist = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(dist.local_rank)
    # A rank that dies leaves the others blocked in a collective; the timeout turns that hang into an error.
    timeout = datetime.timedelta(seconds=int(os.environ.get("TRAIN_DIST_TIMEOUT_S", "300")))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    return dist


def load_data(cfg: TrainConfig, dist: Dist) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Train and evaluation arrays; the evaluation split is the held-out validation set if --val-split is set."""
    root = resolve_root(cfg.data_dir)
    if cfg.download:
        if dist.is_main:
            download(root)
        if dist.enabled:
            torch.distributed.barrier()
    train_x, train_y, test_x, test_y = load_cifar10(root, allow_small=cfg.allow_small_data)
    eval_name = "test"
    if cfg.val_split:
        if cfg.val_split >= len(train_x):
            raise ConfigError(f"--val-split {cfg.val_split} leaves no training images (the split has {len(train_x)})")
        order = np.random.default_rng(VAL_SPLIT_SEED).permutation(len(train_x))
        held, kept = order[: cfg.val_split], np.sort(order[cfg.val_split :])
        test_x, test_y, train_x, train_y = train_x[held], train_y[held], train_x[kept], train_y[kept]
        eval_name = "val"
    if cfg.limit_train:
        train_x, train_y = train_x[: cfg.limit_train], train_y[: cfg.limit_train]
    return train_x, train_y, test_x, test_y, eval_name


def make_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and bias parameters: decaying them only fights the normalization.
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_factor(schedule: str, step: int, total: int, warmup_frac: float) -> float:
    """Multiplier of the peak lr at `step` of `total`. Warm-up rises linearly from 1/25 of the peak."""
    warmup = int(total * warmup_frac)
    if step < warmup:
        return 1 / 25 + (1 - 1 / 25) * step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(1.0 - progress, 0.0)  # onecycle: linear down to zero, as in the fast CIFAR-10 trainers


def environment(device: torch.device, dist: Dist) -> dict[str, object]:
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


def check_resumable(state: dict, cfg: TrainConfig, path: Path) -> None:
    saved = state["config"]
    diffs = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(
            f"{path}: was written with other settings ({'; '.join(diffs)}). Resume with the same "
            "flags, or start a new run in another --out."
        )
    if state["epoch"] >= cfg.epochs:
        raise CheckpointError(f"{path}: that run already finished all {cfg.epochs} epochs; nothing to resume.")


def main(cfg: TrainConfig) -> dict:
    dist = init_distributed(cfg)
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
    device = resolve_device(cfg.device, dist)
    out, resume_from = prepare_out(cfg, dist)
    state = load_checkpoint(resume_from) if resume_from else None
    if state:
        check_resumable(state, cfg, resume_from)
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (global) must divide by the {dist.world_size} ranks")
    spec = cfg.aug_spec()
    train_x, train_y, eval_x, eval_y, eval_name = load_data(cfg, dist)

    torch.manual_seed(cfg.seed)
    per_rank_batch = cfg.batch_size // dist.world_size
    shard = dict(rank=dist.rank, world_size=dist.world_size, device=device, workers=cfg.workers, seed=cfg.seed)
    train_loader = make_loader(cfg.loader, train_x, train_y, per_rank_batch, spec=spec, train=True, **shard)
    eval_loader = make_loader(
        cfg.loader, eval_x, eval_y, min(EVAL_BATCH_SIZE, len(eval_x)), spec=spec, train=False, shuffle=False, **shard
    )

    net = models.build(cfg.model).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = make_optimizer(cfg, net)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.schedule, step, total_steps, cfg.warmup_frac)
    )
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True
        )

    history: list[dict] = []
    start_epoch = 0
    if state:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        history, start_epoch = state["history"], state["epoch"]
        log(dist, f"resuming {resume_from} after epoch {start_epoch}")

    train_net: nn.Module = (
        torch.compile(net, mode=None if cfg.compile_mode == "default" else cfg.compile_mode) if cfg.compile else net
    )
    warmup_seconds = warm_up(train_net, net, cfg, device, train_loader, eval_loader, start_epoch)
    compile_seconds = warmup_seconds if cfg.compile else 0.0
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_net = DDP(train_net, device_ids=[device.index] if device.type == "cuda" else None)
    eval_net = ema.module if ema is not None else net
    if cfg.compile and ema is None:
        eval_net = train_net.module if dist.enabled else train_net

    n_params = models.count_params(net)
    log(
        dist,
        f"{cfg.model}: {n_params:,} parameters | loader {cfg.loader} on {device} | {len(train_x):,} train, "
        f"{len(eval_x):,} {eval_name} images | global batch {cfg.batch_size} x {dist.world_size} rank(s)",
    )
    env = environment(device, dist)
    writer = tensorboard_writer(cfg, out) if dist.is_main else None
    best = max((e[f"{eval_name}_acc"] for e in history), default=-1.0)
    train_seconds = sum(e["seconds"] for e in history)
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        bar = progress_bar(cfg, dist, epoch, len(train_loader))
        after_step = (lambda: ema.update_parameters(net)) if ema is not None else None
        stats = train_one_epoch(
            train_net,
            _joined(train_loader, train_net, dist),
            optimizer,
            scheduler,
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
        train_seconds += stats["seconds"]
        row = {
            "epoch": epoch + 1,
            **stats,
            f"{eval_name}_loss": evaluated["loss"],
            f"{eval_name}_acc": evaluated["acc"],
            f"{eval_name}_images": evaluated["count"],
            "lr": scheduler.get_last_lr()[0],
        }
        if dist.enabled:
            row["ranks_in_sync"] = ranks_in_sync(net)
        history.append(row)
        log(
            dist,
            f"epoch {epoch + 1}/{cfg.epochs}: "
            f"train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.2%} | "
            f"{eval_name} loss {evaluated['loss']:.4f} acc {evaluated['acc']:.2%} "
            f"({evaluated['count']:,} images) | {stats['seconds']:.1f}s, {stats['img_per_s']:,.0f} img/s",
        )
        if not dist.is_main:
            continue
        metrics = {
            "recipe": cfg.recipe,
            "config": dataclasses.asdict(cfg),
            "env": env,
            "params": n_params,
            "eval_split": eval_name,
            "train_seconds": train_seconds,
            "compile_seconds": compile_seconds,
            "warmup_seconds": warmup_seconds,
            "epochs": history,
        }
        save_json(metrics, out / "metrics.json")
        checkpoint = {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch + 1,
            "config": dataclasses.asdict(cfg),
            "history": history,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
        }
        save_checkpoint(checkpoint, out / "last.pt")
        if row[f"{eval_name}_acc"] > best:
            best = row[f"{eval_name}_acc"]
            save_checkpoint(checkpoint, out / "best.pt")
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
    if writer is not None:
        writer.close()
    if dist.is_main and history:
        last = history[-1]
        log(
            dist,
            f"done: final {eval_name} accuracy {last[f'{eval_name}_acc']:.2%} (best {best:.2%}), "
            f"training {train_seconds:.1f}s over {len(history)} epochs -> {out}/metrics.json",
        )
        from train.report import save_predictions, write_run_plots

        ordered = (
            eval_loader
            if not dist.enabled
            else make_loader(
                cfg.loader,
                eval_x,
                eval_y,
                min(EVAL_BATCH_SIZE, len(eval_x)),
                spec=spec,
                train=False,
                shuffle=False,
                device=device,
                workers=cfg.workers,
                seed=cfg.seed,
            )
        )
        probabilities = predict(eval_net, ordered, device=device, amp=cfg.amp, tta=cfg.tta).numpy()
        save_predictions(out / "predictions.npz", eval_x, eval_y, probabilities)
        written = write_run_plots(out)
        log(dist, f"plots: {', '.join(p.name for p in written)}")
    return metrics


def ranks_in_sync(net: nn.Module) -> bool:
    """Whether every rank holds the same weights (DDP keeps them so; this checks it, cheaply, once an epoch)."""
    fingerprint = torch.stack([p.detach().double().sum() for p in net.parameters()])
    low, high = fingerprint.clone(), fingerprint.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def _joined(loader, net: nn.Module, dist: Dist):  # noqa: ANN001, ANN202
    """Under torchrun, shards may differ by one batch; DDP's Join lets the shorter ranks shadow the collectives."""
    if not dist.enabled:
        yield from loader
        return
    from torch.distributed.algorithms.join import Join

    with Join([net]):
        yield from loader


def warm_up(
    train_net: nn.Module,
    net: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    train_loader,  # noqa: ANN001
    eval_loader,
    epoch: int,
) -> float:  # noqa: ANN001
    """Run every shape the timed loop will see once, outside the timing: the first real training batch (forward
    and backward, no optimizer step), the last partial batch, and the evaluation batches. This is where CUDA and
    cuDNN pick kernels, lazy modules load, DALI allocates its buffers and torch.compile compiles; on the H200 it was
    ~6 s of the first epoch. Weights, BatchNorm statistics and the random state are put back afterwards, so the run
    computes exactly what it would have computed without it."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    sync(device)
    start = time.perf_counter()
    train_loader.set_epoch(epoch)
    first = next(iter(train_loader))[0]
    shapes = [first]
    full, tail = divmod(train_loader.num_samples, len(first))
    if tail and len(train_loader) > full:  # the last, partial batch is another shape
        shapes.append(
            first[:tail].clone(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        )
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
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
    return time.perf_counter() - start


def progress_bar(cfg: TrainConfig, dist: Dist, epoch: int, total: int):  # noqa: ANN201
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


def tensorboard_writer(cfg: TrainConfig, out: Path):  # noqa: ANN201
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))
