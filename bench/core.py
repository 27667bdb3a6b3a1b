"""Throughput measurements: a loader alone, the model step alone, and a full training epoch with each loader.

Every timed region starts after a warm-up and is closed by torch.cuda.synchronize() on CUDA, and is repeated; the
median and the spread (min, max) are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

import model as models
from bench.peers import PEERS, PeerLoader
from pipeline import Loader, make_loader
from train.config import TrainConfig
from train.loop import sync, train_one_epoch
from train.optim import make_optimizer, make_scheduler
from train.step import TrainStep

# What each row's "loader" field can say: the loaders measured, and "model-only" for the model step alone and the
# model-only epoch (one tensor already on the device, no loader).
LOADERS = ("cpu", "dali-gpu", "dali-cpu", *PEERS)
MODEL_ONLY = "model-only"
# Untimed batches before a model or epoch measurement: the first steps allocate memory, pick kernels, start workers.
WARMUP_BATCHES = 5


@dataclass
class Result:
    what: str  # "loader" | "model" | "epoch"
    loader: str  # one of LOADERS, or MODEL_ONLY
    batch_size: int
    workers: int | None  # CPU loader: worker processes; DALI: threads; None where there are none
    images: int  # images per timed repeat
    seconds: list[float] = field(default_factory=list)
    step: str | None = None  # "eager" | "graph" (train/step.py) for model and epoch rows; None for loaders alone
    compile_mode: str | None = None  # the model ran under torch.compile(mode=...); None: not compiled
    warmup_s: float | None = None  # the untimed warm-up (with capture or compilation), seconds: what a run pays once

    def row(self) -> dict:
        median = statistics.median(self.seconds)
        img_per_s = [self.images / s for s in self.seconds]
        return {
            "what": self.what,
            "loader": self.loader,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "images": self.images,
            "img_per_s": self.images / median,
            "img_per_s_min": min(img_per_s),
            "img_per_s_max": max(img_per_s),
            "epoch_s": median if self.what == "epoch" else None,
            "seconds": self.seconds,
            "repeats": len(self.seconds),
            "step": self.step,
            "compiled": self.compile_mode is not None,
            "compile_mode": self.compile_mode,
            "warmup_s": self.warmup_s,
        }


def timed(device: torch.device, fn: Callable[[], None]) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def loader_for(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    workers: int | None,
    device: torch.device,
):
    """name: cpu (albumentations), dali-gpu (batched graph on CUDA), dali-cpu (DALI's CPU operators), kornia or
    torch (the benchmark peers of bench.peers, on `device`; they take no workers)."""
    if name in PEERS:
        return PeerLoader(name, images, labels, batch_size, device=device)
    if name == "cpu":
        return make_loader("cpu", images, labels, batch_size, device=device, workers=workers)
    if name == "dali-gpu":
        return make_loader("dali", images, labels, batch_size, device=device, workers=workers)
    cpu_mode = make_loader("dali", images, labels, batch_size, device="cpu", workers=workers)
    return cpu_mode if device.type == "cpu" else _ToDevice(cpu_mode, device)


def _epoch(loader: Loader) -> int:
    """Take one whole epoch from `loader`; the number of images."""
    return sum(len(x) for x, _ in loader)


def bench_loader(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    workers: int | None,
    device: torch.device,
    repeats: int,
) -> Result:
    """Images per second out of the loader alone, on the device the model would use, over whole epochs: a chunked
    loader works ahead of its consumer, so part of an epoch would count work it never credits (and an early stop
    drains the chunk in flight inside the timing). One untimed epoch first: workers started, buffers allocated."""
    loader = loader_for(name, images, labels, batch_size, workers, device)
    _epoch(loader)
    result = Result("loader", name, batch_size, workers, loader.num_samples)
    for _ in range(repeats):
        result.seconds.append(timed(device, lambda: _epoch(loader)))
    return result


def training_step(
    model_name: str,
    device: torch.device,
    *,
    total_steps: int,
    steps_per_epoch: int | None = None,
    graphed: bool = False,
    compile_mode: str | None = None,
) -> TrainStep:
    """The training step `python -m train` uses (train/step.py: bf16 autocast on CUDA, SGD with the default
    config's settings, the onecycle schedule over `total_steps`), on a fresh channels_last `model_name`.
    `steps_per_epoch` (default: all `total_steps`) is the most steps between two `begin_epoch` calls; `compile_mode`
    (torch.compile's mode) compiles the network, None leaves it eager."""
    net = models.build(model_name).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net, TrainConfig())
    scheduler = make_scheduler(optimizer, TrainConfig(), total_steps=total_steps)
    return TrainStep(
        torch.compile(net, mode=compile_mode) if compile_mode else net,
        optimizer,
        scheduler,
        steps_per_epoch=steps_per_epoch or total_steps,
        label_smoothing=0.0,
        amp=True,
        device=device,
        graphed=graphed,
    )


def bench_model(
    model_name: str,
    batch_size: int,
    device: torch.device,
    repeats: int,
    steps: int,
    compile_mode: str | None = None,
    graphed: bool = False,
    warmup: int = WARMUP_BATCHES,
) -> Result:
    """Training steps per second on one batch already on the device: the ceiling any loader can reach, after
    `warmup` untimed steps. `graphed` replays the step as a CUDA graph (captured before the timing); `compile_mode`
    runs the network under torch.compile(mode=...) instead ("reduce-overhead": torch's own CUDA graphs of the
    compiled forward and backward). The row's `warmup_s` is the capture or compilation plus the warm-up steps."""
    step = training_step(
        model_name, device, total_steps=warmup + repeats * steps, graphed=graphed, compile_mode=compile_mode
    )
    x = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def run(n: int) -> None:
        for _ in range(n):
            step(x, y)

    def warm() -> None:
        if graphed:
            step.capture(x, y)
        step.net.train()
        step.begin_epoch()
        run(warmup)

    warmup_s = timed(device, warm)
    kind = "graph" if graphed else "eager"
    result = Result(
        "model",
        MODEL_ONLY,
        batch_size,
        None,
        steps * batch_size,
        step=kind,
        compile_mode=compile_mode,
        warmup_s=warmup_s,
    )
    for _ in range(repeats):
        result.seconds.append(timed(device, lambda: run(steps)))
    return result


def bench_epoch(
    name: str | None,
    model_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    workers: int | None,
    device: torch.device,
    repeats: int,
    compile_mode: str | None = None,
    graphed: bool = False,
    warmup: int = WARMUP_BATCHES,
) -> Result:
    """One training epoch (forward, backward, SGD step, lr schedule) fed by loader `name`, after `warmup` untimed
    batches; name None feeds the model the same number of batches from one tensor already on the device (the
    model-only epoch). `graphed` replays the step as a CUDA graph, as `python -m train --cuda-graph on` does."""
    if name is None:
        x = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch_size,), device=device)
        feed = _Repeat(x, y, -(-len(images) // batch_size))
    else:
        feed = loader_for(name, images, labels, batch_size, workers, device)
    step = training_step(
        model_name,
        device,
        total_steps=warmup + (repeats + 1) * len(feed),
        steps_per_epoch=max(len(feed), warmup),  # train_one_epoch begins an epoch per pass
        graphed=graphed,
        compile_mode=compile_mode,
    )
    if graphed:
        step.capture(*next(iter(feed)))
    train_one_epoch(step, _Take(feed, warmup), epoch=0)  # warm-up
    kind = "graph" if graphed else "eager"
    result = Result("epoch", name or MODEL_ONLY, batch_size, workers, len(images), step=kind, compile_mode=compile_mode)
    for _ in range(repeats):
        result.seconds.append(train_one_epoch(step, feed, epoch=0)["seconds"])
    return result


class _Repeat:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int):
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        for _ in range(self.steps):
            yield self.x, self.y


class _ToDevice:
    """DALI's CPU mode feeding a GPU model: the batches cross to the GPU like the CPU loader's do."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _Take:
    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                break
            yield batch
