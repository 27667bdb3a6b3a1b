"""One training epoch and one evaluation pass. Neither knows which loader feeds it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Read the running loss/accuracy back from the GPU only this often: each read is a host-device sync.
SYNC_EVERY = 25


class Diverged(RuntimeError):
    """The loss stopped being finite."""


@dataclass
class Sums:
    """Loss, correct and count summed on the device, read back rarely."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> Sums:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = y.numel()
        self.loss += loss.detach().double() * n
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.count += n

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            packed = torch.stack([self.loss, self.correct, self.count])
            torch.distributed.all_reduce(packed)
            self.loss, self.correct, self.count = packed.unbind()

    def means(self) -> tuple[float, float, int]:
        count = max(int(self.count.item()), 1)
        return self.loss.item() / count, self.correct.item() / count, int(self.count.item())


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    epoch: int,
    amp: bool,
    label_smoothing: float,
    after_step: Callable[[], None] | None = None,
    progress: Callable[[int, float, float, float], None] | None = None,
) -> dict[str, float]:
    """Train for one pass over `loader`. `progress(batch, loss, acc, img_per_s)` is called every SYNC_EVERY batches.

    A non-finite loss raises Diverged naming the epoch and the first bad batch (found on the device, no per-batch sync).
    """
    model.train()
    sums = Sums.zeros(device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    sync(device)
    start = time.perf_counter()
    batch = -1
    for batch, (x, y) in enumerate(loader):
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        sums.add(loss, logits, y)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), batch, first_bad)
        if (batch + 1) % SYNC_EVERY == 0:
            _check_finite(first_bad, epoch)
            if progress is not None:
                loss_mean, acc, count = sums.means()
                progress(batch + 1, loss_mean, acc, count / (time.perf_counter() - start))
    _check_finite(first_bad, epoch)
    sync(device)
    seconds = time.perf_counter() - start
    sums.all_reduce()
    loss_mean, acc, count = sums.means()
    if progress is not None:
        progress(batch + 1, loss_mean, acc, count / seconds)
    return {
        "train_loss": loss_mean,
        "train_acc": acc,
        "seconds": seconds,
        "img_per_s": count / seconds,
        "images": count,
    }


def _check_finite(first_bad: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad.item())
    if bad >= 0:
        raise Diverged(
            f"the training loss became non-finite (NaN or inf) in epoch {epoch + 1}, batch {bad + 1}. "
            "Lower --lr, or check the data and the augmentation settings."
        )


def tta_logits(model: nn.Module, x: torch.Tensor, *, device: torch.device, amp: bool, tta: str) -> torch.Tensor:
    """float32 logits of an evaluation batch; tta='flip' averages them with those of the mirror images."""
    with autocast(device, amp):
        logits = model(x).float()
        if tta == "flip":
            logits = (logits + model(x.flip(3)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device, amp: bool, tta: str) -> dict[str, float]:
    """Loss and accuracy over every image of `loader` (summed over ranks under torchrun). tta='flip' averages the
    logits of each image and its mirror image."""
    model.eval()
    sums = Sums.zeros(device)
    for x, y in loader:
        logits = tta_logits(model, x, device=device, amp=amp, tta=tta)
        sums.add(F.cross_entropy(logits, y), logits, y)
    sums.all_reduce()
    loss, acc, count = sums.means()
    return {"loss": loss, "acc": acc, "count": count}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, device: torch.device, amp: bool, tta: str) -> torch.Tensor:
    """Class probabilities for every image of an unshuffled loader, in order (same TTA as evaluate)."""
    model.eval()
    out = []
    for x, _ in loader:
        out.append(tta_logits(model, x, device=device, amp=amp, tta=tta).softmax(1).cpu())
    return torch.cat(out)
