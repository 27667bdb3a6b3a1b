"""One training epoch and one evaluation pass. Neither knows which loader feeds it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import Diverged
from train.step import Sums, TrainStep, autocast

# Read the running loss/accuracy and the non-finite marker back from the device only this often: each read is a
# host-device sync, which would stall the queue of launched work (and, with a CUDA graph, most of the speed).
SYNC_EVERY = 25


class Progress(Protocol):
    """What the epoch loop reports to (the tqdm bar in train/run.py)."""

    def advance(self) -> None:
        """One more batch was queued (called every batch; must not read the device)."""

    def show(self, loss: float, acc: float, img_per_s: float) -> None:
        """The running numbers, at the sync points."""


def sync(device: torch.device) -> None:
    """Wait for the device to finish queued work (a no-op on the CPU): the edge of every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(
    step: TrainStep, loader: Iterable, *, epoch: int, progress: Progress | None = None
) -> dict[str, float]:
    """Train for one pass over `loader`, one `step` per batch; returns train_loss, train_acc (a fraction), seconds,
    img_per_s and images (summed over torchrun ranks). The progress bar advances every batch and its numbers are
    refreshed every SYNC_EVERY batches. A non-finite loss raises Diverged naming the epoch and the first bad batch
    (found on the device; read back at those same sync points)."""
    device = step.device
    step.net.train()
    step.begin_epoch()
    sync(device)
    start = time.perf_counter()
    for batch, (x, y) in enumerate(loader):
        step(x, y)
        if progress is not None:
            progress.advance()
        if (batch + 1) % SYNC_EVERY == 0:
            _check_finite(step.first_bad, epoch)
            if progress is not None:
                loss, acc, count = step.sums.means()
                progress.show(loss, acc, count / (time.perf_counter() - start))
    _check_finite(step.first_bad, epoch)
    sync(device)
    seconds = time.perf_counter() - start
    step.sums.all_reduce()
    loss, acc, count = step.sums.means()
    if progress is not None:
        progress.show(loss, acc, count / seconds)
    return {"train_loss": loss, "train_acc": acc, "seconds": seconds, "img_per_s": count / seconds, "images": count}


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
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    amp: bool,
    tta: str,
    keep_probabilities: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Loss, accuracy (a fraction) and image count over every image of `loader`, summed over ranks under torchrun.
    tta='flip' averages the logits of each image and its mirror image. With `keep_probabilities`, also
    "probabilities": float32 [N, classes] softmax of every image in loader order, on the CPU (this rank's images)."""
    model.eval()
    sums = Sums.zeros(device)
    kept = []
    for x, y in loader:
        logits = tta_logits(model, x, device=device, amp=amp, tta=tta)
        sums.add(F.cross_entropy(logits, y), logits, y)
        if keep_probabilities:
            kept.append(logits.softmax(1).cpu())
        if progress is not None:
            progress.advance()
    sums.all_reduce()
    loss, acc, count = sums.means()
    result: dict = {"loss": loss, "acc": acc, "count": count}
    if keep_probabilities:
        result["probabilities"] = torch.cat(kept) if kept else torch.empty(0)
    return result
