"""Throughput of a loader alone, of the model's training step alone, and of a training epoch fed by each loader.

Every timed region follows a warm-up and ends with a device sync; it is repeated, and a row reports the median.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

import model as models
from bench.peers import PEERS, PeerLoader
from pipeline import make_loader
from train.config import TrainConfig
from train.loop import sync, train_one_epoch
from train.optim import make_optimizer, make_scheduler
from train.step import TrainStep

LOADERS = ("cpu", "dali-gpu", "dali-cpu", *PEERS)
MODEL_ONLY = "model-only"  # a row's loader for the model step alone and the epoch fed from one resident tensor
# Untimed batches before a model or epoch measurement: the first steps allocate memory, pick kernels, start workers.
WARMUP_BATCHES = 5


@dataclasses.dataclass
class Result:
    what: str  # "loader" | "model" | "epoch"
    loader: str  # one of LOADERS, or MODEL_ONLY
    batch_size: int
    workers: int | None  # CPU loader: worker processes; DALI: threads; None where there are none
    images: int  # images per timed repeat
    seconds: list[float] = dataclasses.field(default_factory=list)
    step: str | None = None  # "eager" | "graph" (train/step.py) for model and epoch rows; None for loaders alone
    warmup_s: float | None = None  # model rows: the untimed warm-up with the graph's capture, seconds

    def row(self) -> dict:
        """The JSON row: these fields, img_per_s of the median repeat, _min and _max of the slowest and fastest."""
        rates, median = [self.images / s for s in self.seconds], statistics.median(self.seconds)
        return {
            **dataclasses.asdict(self),
            "img_per_s": self.images / median,
            "img_per_s_min": min(rates),
            "img_per_s_max": max(rates),
            "epoch_s": median if self.what == "epoch" else None,
            "repeats": len(self.seconds),
        }


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds `fn` takes, queued device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def loader_for(name: str, images: np.ndarray, labels: np.ndarray, batch_size: int, workers: int | None, device):
    """name: cpu (albumentations), dali-gpu (the batched graph on CUDA), dali-cpu (DALI's CPU operators), kornia or
    torch (bench.peers, on `device`; they take no workers). images uint8 [N, 32, 32, 3], labels int64 [N]."""
    if name in PEERS:
        return PeerLoader(name, images, labels, batch_size, device=device)
    if name == "cpu":
        return make_loader("cpu", images, labels, batch_size, device=device, workers=workers)
    if name == "dali-gpu":
        return make_loader("dali", images, labels, batch_size, device=device, workers=workers)
    # DALI's CPU-mode notice would land inside the table: bench's plan names the mode before the table instead
    with contextlib.redirect_stdout(io.StringIO()):
        cpu_mode = make_loader("dali", images, labels, batch_size, device="cpu", workers=workers)
    return cpu_mode if device.type == "cpu" else _ToDevice(cpu_mode, device)


def bench_loader(name: str, images, labels, batch_size: int, workers: int | None, device, repeats: int) -> Result:
    """Images per second out of loader `name` alone, on the model's device, over whole epochs (a chunked loader works
    ahead: part of an epoch would time work it never hands out), after one untimed epoch."""
    loader = loader_for(name, images, labels, batch_size, workers, device)
    result = Result("loader", name, batch_size, workers, loader.num_samples)
    result.seconds = [timed(device, lambda: [len(x) for x, _ in loader]) for _ in range(repeats + 1)][1:]
    return result


def training_step(
    model_name: str,
    device: torch.device,
    *,
    total_steps: int,
    steps_per_epoch: int | None = None,
    graphed=False,
    compile_mode: str | None = None,
) -> TrainStep:
    """`python -m train`'s step (train/step.py: bf16 autocast on CUDA, SGD as the default config, onecycle over
    `total_steps`) on a fresh channels_last `model_name`; at most `steps_per_epoch` steps between `begin_epoch`s.
    `compile_mode`: the network under torch.compile(mode=...), as `python -m train --compile` runs it."""
    net = models.build(model_name).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net, TrainConfig())
    scheduler = make_scheduler(optimizer, TrainConfig(), total_steps=total_steps)
    options = dict(label_smoothing=0.0, amp=True, device=device, graphed=graphed)
    model = torch.compile(net, mode=compile_mode) if compile_mode else net
    return TrainStep(model, optimizer, scheduler, steps_per_epoch=steps_per_epoch or total_steps, **options)


def _resident_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch_size,), device=device)


def bench_model(
    model_name: str,
    batch_size: int,
    device,
    repeats: int,
    steps: int,
    graphed=False,
    warmup=WARMUP_BATCHES,
    compile_mode: str | None = None,
) -> Result:
    """Training steps per second on one batch already on the device: the ceiling of every loader. `graphed` replays
    the step as a CUDA graph, `compile_mode` runs it under torch.compile; the row's warmup_s is the capture or the
    compilation plus `warmup` untimed steps."""
    total = warmup + repeats * steps
    step = training_step(model_name, device, total_steps=total, graphed=graphed, compile_mode=compile_mode)
    x, y = _resident_batch(batch_size, device)

    def run(n: int) -> None:
        for _ in range(n):
            step(x, y)

    def warm() -> None:
        if graphed:
            step.capture(x, y)
        step.net.train()
        step.begin_epoch()
        run(warmup)

    kind = f"compile:{compile_mode}" if compile_mode else "graph" if graphed else "eager"
    warmup_s = timed(device, warm)
    result = Result("model", MODEL_ONLY, batch_size, None, steps * batch_size, step=kind, warmup_s=warmup_s)
    result.seconds = [timed(device, lambda: run(steps)) for _ in range(repeats)]
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
    graphed: bool = False,
    warmup: int = WARMUP_BATCHES,
) -> Result:
    """One training epoch (forward, backward, SGD step, lr schedule) fed by loader `name` (None: batches of one
    resident tensor, the model-only epoch) after `warmup` untimed batches; `graphed`: the step as a CUDA graph."""
    if name is None:
        feed = [_resident_batch(batch_size, device)] * -(-len(images) // batch_size)
    else:
        feed = loader_for(name, images, labels, batch_size, workers, device)
    step = training_step(
        model_name,
        device,
        total_steps=warmup + (repeats + 1) * len(feed),
        steps_per_epoch=max(len(feed), warmup),  # train_one_epoch begins an epoch per pass
        graphed=graphed,
    )
    if graphed:
        step.capture(*next(iter(feed)))
    train_one_epoch(step, itertools.islice(feed, warmup), epoch=0)
    result = Result("epoch", name or MODEL_ONLY, batch_size, workers, len(images), step="graph" if graphed else "eager")
    result.seconds = [train_one_epoch(step, feed, epoch=0)["seconds"] for _ in range(repeats)]
    return result


class _ToDevice:
    """DALI's CPU mode feeding a GPU model: the batches cross to the GPU as the CPU loader's do."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device, self.num_samples = loader, device, loader.num_samples

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
