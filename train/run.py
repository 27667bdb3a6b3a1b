"""`python -m train`: flags, run folder, data, network, warm-up, epochs, predictions and plots; works under torchrun.
`main` reads top to bottom; `setup` builds the run's objects into one `Run` that every later phase reads."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import model as models
from pipeline import Loader
from pipeline.errors import ConfigError
from pipeline.order import batch_sizes
from train import wall_seconds
from train.checkpoint import RunState, contents, load_checkpoint, restore, rng_state, set_rng_state
from train.config import TrainConfig, check_hardware, cuda_graph_blockers, make_config, parse_flags, resolve_auto
from train.data import Data, eval_split, load_data, make_eval_loader, make_train_loader, rank_order
from train.dist import Dist, broadcast_buffers, gather_in_order, init_distributed, log, ranks_in_sync, require_agreement
from train.loop import evaluate, progress_bar, sync, train_one_epoch, tta_logits
from train.optim import make_optimizer, make_scheduler
from train.outdir import RunFolder, on_main, run_folder
from train.provenance import environment
from train.step import TrainStep, autocast


@dataclass
class Run:
    """The run's objects, built once by `setup`."""

    cfg: TrainConfig
    dist: Dist
    folder: RunFolder
    data: Data
    train_loader: Loader
    eval_loader: Loader
    state: RunState
    step: TrainStep
    eval_net: nn.Module  # the EMA copy, or the trained network itself
    net: nn.Module  # the trained network, compiled if asked, without DDP


def main(argv: list[str] | None = None) -> dict:
    """Run one training job (one rank under torchrun) from its command line; returns its metrics (empty off rank 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    values, given = parse_flags(argv)
    saved, source = None, None
    if values["resume"]:  # verified before anything else, and its settings become the run's
        source = Path(values["out"]) / "last.pt" if values["resume"] == "auto" else Path(values["resume"])
        saved = load_checkpoint(source)
    cfg = make_config(values, given, saved["config"] if saved else None, source)
    dist = init_distributed(use_cuda=cfg.device != "cpu" and torch.cuda.is_available())
    try:
        device = resolve_device(cfg.device, dist)
        check_hardware(cfg, device, dist)  # every check of a flag against the device or the world size
        cfg = resolve_auto(cfg, device)
        with run_folder(cfg.out, dist, cfg.epochs) as folder:  # locked by this run until it ends
            if saved is None:
                on_main(dist, folder.start_new, cfg.overwrite)
            else:
                on_main(dist, folder.resume, saved, source, best_epoch(saved["history"], eval_split(cfg)))
            run = setup(cfg, dist, device, folder, saved, source)
            run.state.commands.append({"command": shlex.join(["python", "-m", "train", *argv]), "wall_seconds": 0.0})
            metrics = train(run)
        if dist.enabled:  # no rank leaves while another still talks to it (only on success: the others may be gone)
            torch.distributed.barrier()
        return metrics
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup(
    cfg: TrainConfig, dist: Dist, device: torch.device, folder: RunFolder, saved: dict | None, source: Path | None
) -> Run:
    """Data, loaders, network, optimizer, schedule (restored from `saved` when resuming) and the training step."""
    data = load_data(cfg, dist)
    torch.manual_seed(cfg.seed)
    train_loader, eval_loader = make_train_loader(cfg, data, device, dist), make_eval_loader(cfg, data, device, dist)
    # every rank runs the same number of steps (so DDP needs no Join), and every node read the same data: checked
    counts = {"training images": len(data.train_x), "evaluation images": len(data.eval_x), "batches": len(train_loader)}
    require_agreement(counts, device, dist)
    state = build_state(cfg, device, dist, total_steps=cfg.epochs * len(train_loader))
    net, ema = state.net, state.ema
    if saved is not None and source is not None:
        restore(state, saved, source, device)
        log(dist, f"resuming {source} after epoch {len(state.history)}")
    # wrap: compile, DDP, and the step (a CUDA graph where --cuda-graph allows and nothing blocks it; see config.py)
    inner = torch.compile(net, mode=None if cfg.compile_mode == "default" else cfg.compile_mode) if cfg.compile else net
    train_net = inner
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_net = DDP(inner, device_ids=[device.index] if device.type == "cuda" else None)
    graphed = cfg.cuda_graph != "off" and not cuda_graph_blockers(cfg, device, dist)
    step = TrainStep(
        train_net,
        state.optimizer,
        state.scheduler,
        steps_per_epoch=len(train_loader),
        label_smoothing=cfg.label_smoothing,
        amp=bool(cfg.amp),
        device=device,
        graphed=graphed,
        after_step=(lambda: ema.update_parameters(net)) if ema is not None else None,  # eager only (config.py)
    )
    eval_net = ema.module if ema is not None else inner
    return Run(cfg, dist, folder, data, train_loader, eval_loader, state, step, eval_net, inner)


def build_state(cfg: TrainConfig, device: torch.device, dist: Dist, *, total_steps: int) -> RunState:
    """A fresh network (channels_last, SyncBatchNorm under torchrun if asked), its optimizer, lr schedule over
    `total_steps` and weight EMA: what `restore` loads a checkpoint into."""
    net = models.build(cfg.model).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = make_optimizer(net, cfg)
    ema = None
    if cfg.ema:
        ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema)
        ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=ema_fn, use_buffers=True)
    return RunState(net, optimizer, make_scheduler(optimizer, cfg, total_steps), ema)


def train(run: Run) -> dict:
    """Warm-up, then the remaining epochs, each committed to the run folder; then predictions and plots."""
    cfg, dist, data, state = run.cfg, run.dist, run.data, run.state
    graph = ", capturing the CUDA graph" if run.step.graphed else ""
    log(
        dist,
        f"{cfg.model}: {models.count_params(state.net):,} parameters | loader {cfg.loader} on {run.step.device} | "
        f"{'CUDA-graph' if run.step.graphed else 'eager'} step | {len(data.train_x):,} train, {len(data.eval_x):,} "
        f"{data.eval_name} images | global batch {cfg.batch_size} x {dist.world_size} rank(s)\n"
        f"warming up (every batch shape once{graph}; not timed)...",
    )
    warmup_seconds = warm_up(run, len(state.history))
    info = fixed_metrics(run, warmup_seconds) if dist.is_main else {}  # only rank 0 runs git and hashes the source
    writer = tensorboard_writer(cfg.out) if cfg.tensorboard and dist.is_main else None
    probabilities = None
    epochs_to_run = range(len(state.history), cfg.epochs)
    for epoch in epochs_to_run:
        row, probabilities = train_and_evaluate(epoch, run)
        state.history.append(row)
        if dist.is_main:
            state.commands[-1]["wall_seconds"] = wall_seconds()
            best = best_epoch(state.history, data.eval_name) == len(state.history)
            checkpoint = contents(state, cfg, run.step.device, run.folder.run_id)
            run.folder.commit_epoch(checkpoint, run_metrics(run, info), best=best)
            if writer is not None:
                for name, value in row.items():
                    if name != "epoch" and isinstance(value, int | float):
                        writer.add_scalar(name, value, len(state.history))
    if writer is not None:
        writer.close()
    if not epochs_to_run:  # resumed after its last epoch (killed before the run finished): finish only
        kwargs = {"device": run.step.device, "amp": bool(cfg.amp), "tta": cfg.tta}
        evaluated = evaluate(run.eval_net, run.eval_loader, keep_probabilities=True, **kwargs)
        probabilities = gather_in_order(evaluated["probabilities"], len(data.eval_x), dist)
    return finish(run, info, probabilities) if dist.is_main else {}


# --- setup ----------------------------------------------------------------------------------------------------------


def resolve_device(choice: str, dist: Dist) -> torch.device:
    """The torch device of `--device` (auto = CUDA if torch sees a GPU); this rank's GPU under torchrun."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank)


def best_epoch(history: list[dict], eval_name: str) -> int | None:
    """The evaluated epoch (1-based) with the highest accuracy, the earliest of equals: the one best.pt holds. None
    before the first evaluation (--eval-every)."""
    key, best = f"{eval_name}_acc", None
    for row in history:
        if key in row and (best is None or row[key] > history[best - 1][key]):
            best = row["epoch"]
    return best


def warm_up(run: Run, epoch: int) -> float:
    """Run every batch shape of `epoch` once outside the timing (captured as a CUDA graph, or forward and backward),
    and the evaluation batches: kernels are picked, DALI allocates, torch.compile compiles. Weights, optimizer and
    random state are put back afterwards. The network runs without DDP (the ranks' last batches may differ).
    Returns the seconds it took."""
    cfg, step, net, device = run.cfg, run.step, run.net, run.step.device
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    rng = rng_state(device)
    sync(device)
    start = time.perf_counter()
    run.train_loader.set_epoch(epoch)
    first_x, first_y = next(iter(run.train_loader))
    sizes = batch_sizes(len(run.data.train_x), cfg.batch_size // run.dist.world_size, rank_order(cfg, run.dist))
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
        with autocast(device, bool(cfg.amp)):
            loss = net(x).float().logsumexp(1).mean()
        loss.backward()
    net.zero_grad(set_to_none=True)
    run.eval_net.eval()
    with torch.no_grad():
        for xb, _ in run.eval_loader:
            tta_logits(run.eval_net, xb, device=device, amp=bool(cfg.amp), tta=cfg.tta)
            if not cfg.compile:
                break  # eager: one batch warms everything; compiled: every shape once
    sync(device)
    net.load_state_dict(saved)
    set_rng_state(rng, device)
    return time.perf_counter() - start


# --- epochs ---------------------------------------------------------------------------------------------------------


def train_and_evaluate(epoch: int, run: Run) -> tuple[dict, np.ndarray | None]:
    """One epoch of training, then (every --eval-every epochs, and the last) an evaluation: the epoch's metrics row,
    and after the last epoch the evaluation split's class probabilities (rank 0)."""
    cfg, dist, data, scheduler = run.cfg, run.dist, run.data, run.state.scheduler
    first_step = scheduler.last_epoch
    run.train_loader.set_epoch(epoch)
    show = cfg.progress if dist.is_main else False
    with progress_bar(show, f"epoch {epoch + 1}/{cfg.epochs}", run.train_loader) as bar:
        stats = train_one_epoch(run.step, bar, epoch=epoch, progress=bar)
    steps = range(first_step, scheduler.last_epoch)
    lr = scheduler.base_lrs[0] * sum(scheduler.lr_lambdas[0](i) for i in steps) / max(len(steps), 1)
    row = {"epoch": epoch + 1, **stats, "lr": lr}  # the epoch's mean learning rate
    if dist.enabled:  # evaluate, and save, rank 0's model on every rank (train.dist.broadcast_buffers says why)
        broadcast_buffers(run.state.net, run.state.ema)
        row["ranks_in_sync"] = ranks_in_sync(run.state.net, run.state.ema)
    summary = f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.2%}"
    probabilities, name, last = None, data.eval_name, epoch + 1 == cfg.epochs
    if last or (epoch + 1) % cfg.eval_every == 0:
        sync(run.step.device)
        start = time.perf_counter()
        with progress_bar(show, f"evaluating on {name}", run.eval_loader) as bar:
            evaluated = evaluate(
                run.eval_net, bar, device=run.step.device, amp=bool(cfg.amp), tta=cfg.tta, keep_probabilities=last
            )
        row |= {f"{name}_{k}": evaluated[k] for k in ("loss", "acc")} | {f"{name}_images": evaluated["count"]}
        row["eval_seconds"] = time.perf_counter() - start
        limited = f" of {data.eval_total:,} images: --limit-eval" if cfg.limit_eval else " images"
        count = f"{evaluated['count']:,}{limited}"
        summary += f" | {name} loss {evaluated['loss']:.4f} acc {evaluated['acc']:.2%} ({count})"
        if last:
            probabilities = gather_in_order(evaluated["probabilities"], len(data.eval_x), dist)
    log(dist, f"{summary} | {stats['seconds']:.1f}s, {stats['img_per_s']:,.0f} img/s")
    return row, probabilities


def fixed_metrics(run: Run, warmup_seconds: float) -> dict:
    """metrics.json's fields fixed for this command: env, what actually ran, the warm-up and compile seconds."""
    cfg, step, data, dist = run.cfg, run.step, run.data, run.dist
    resolved = {
        "data_dir": str(data.root),
        "device": str(step.device),
        "amp": bool(cfg.amp) and step.device.type == "cuda",
        "cuda_graph": step.graphed,
        "world_size": dist.world_size,
        "per_rank_batch_size": cfg.batch_size // dist.world_size,
        "train_images": len(data.train_x),  # after --val-split and --limit-train
        "eval_images": len(data.eval_x),  # after --limit-eval
        "workers": run.train_loader.workers,
    }
    return {
        "env": environment(step.device, dist.world_size),
        "resolved": resolved,
        "warmup_seconds": warmup_seconds,
        "compile_seconds": warmup_seconds if cfg.compile else 0.0,
    }


def run_metrics(run: Run, info: dict) -> dict:
    """metrics.json for the epochs so far; wall_seconds sums the run's commands, each with its own figure."""
    history, commands = run.state.history, run.state.commands
    return {
        "config": dataclasses.asdict(run.cfg),
        "params": models.count_params(run.state.net),
        "eval_split": run.data.eval_name,
        "train_seconds": sum(e["seconds"] for e in history),
        "eval_seconds": sum(e.get("eval_seconds", 0.0) for e in history),
        **info,
        "commands": commands,
        "wall_seconds": sum(c["wall_seconds"] for c in commands),
        "epochs": history,
    }


# --- finish ---------------------------------------------------------------------------------------------------------


def finish(run: Run, info: dict, probabilities: np.ndarray | None) -> dict:
    """Rank 0, at the end: the summary, predictions.npz, the plots, and metrics.json marked finished (returned)."""
    from train.report import save_predictions, write_run_plots

    data, folder, out = run.data, run.folder, run.folder.path
    metrics = run_metrics(run, info)
    key = f"{data.eval_name}_acc"
    evaluated = [e[key] for e in run.state.history if key in e]
    log(
        run.dist,
        f"done: final {data.eval_name} accuracy {evaluated[-1]:.2%} (best {max(evaluated):.2%}), training "
        f"{metrics['train_seconds']:.1f}s over {len(run.state.history)} epochs -> {out}/metrics.json",
    )
    log(run.dist, f"writing predictions.npz and the plots (curves, confusion, misclassified) to {out}...")
    written: list[Path] = []
    folder.write_outputs(lambda: save_predictions(out / "predictions.npz", data.eval_x, data.eval_y, probabilities))
    folder.write_outputs(lambda: written.extend(write_run_plots(out)))
    run.state.commands[-1]["wall_seconds"] = wall_seconds()
    metrics = folder.commit_finished(run_metrics(run, info))
    log(run.dist, f"plots: {', '.join(p.name for p in written)} | this command {wall_seconds():.1f}s")
    return metrics


def tensorboard_writer(out: str) -> object:
    """A tensorboard SummaryWriter in <out>/tensorboard."""
    try:  # config.validate found the package; an install that fails to import is one line too
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(f"--tensorboard: the tensorboard package does not import ({err})") from None
    return SummaryWriter(str(Path(out) / "tensorboard"))
