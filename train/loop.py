"""One training epoch and one evaluation pass. Neither knows which loader feeds it."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import Diverged
from train.step import Sums, TrainStep, autocast

# Read the running loss/accuracy and the non-finite marker back from the device only this often: each read is a
# host-device sync, which would stall the queue of launched work (and, with a CUDA graph, most of the speed).
SYNC_EVERY = 25


def progress_bar(show: bool | None, title: str, loader: Iterable) -> tqdm:
    """`loader` with a tqdm bar that advances every batch: shown with `show` True, hidden with False, and with None
    only when stderr is a terminal (tqdm's own rule), so that a log file gets no redraws."""
    disable = None if show is None else not show
    return tqdm(loader, desc=title, unit="batch", leave=False, dynamic_ncols=True, disable=disable)


def sync(device: torch.device) -> None:
    """Wait for the device to finish queued work (a no-op on the CPU): the edge of every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(step: TrainStep, loader: Iterable, *, epoch: int, progress: tqdm | None = None) -> dict[str, float]:
    """Train for one pass over `loader`, one `step` per batch; returns train_loss, train_acc (a fraction), seconds,
    img_per_s and images (summed over torchrun ranks). Every SYNC_EVERY batches one read of the device checks that
    the loss stayed finite (Diverged names the epoch and the first bad batch otherwise) and shows the running numbers
    on the `progress` bar."""
    device = step.device
    step.net.train()
    step.begin_epoch()
    sync(device)
    start = time.perf_counter()
    for batch, (x, y) in enumerate(loader):
        step(x, y)
        if (batch + 1) % SYNC_EVERY == 0:
            _read_back(step, epoch, progress, start)
    sync(device)
    seconds = time.perf_counter() - start
    step.sums.all_reduce()
    loss, acc, count = _read_back(step, epoch, progress, start)
    return {"train_loss": loss, "train_acc": acc, "seconds": seconds, "img_per_s": count / seconds, "images": count}


def _read_back(step: TrainStep, epoch: int, progress: tqdm | None, start: float) -> tuple[float, float, int]:
    """(mean loss, accuracy, images) so far, and the non-finite check, from one host read of the device."""
    sums = step.sums
    bad, loss, correct, count = torch.stack([step.first_bad.double(), sums.loss, sums.correct, sums.count]).tolist()
    if bad >= 0:
        raise Diverged(
            f"the training loss became non-finite (NaN or inf) in epoch {epoch + 1}, batch {int(bad) + 1}. "
            "Lower --lr, or check the data and the augmentation settings."
        )
    n = max(count, 1)
    if progress is not None:
        rate = count / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{loss / n:.3f}", acc=f"{correct / n:.1%}", img_s=f"{rate:,.0f}")
    return loss / n, correct / n, int(count)


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
    sums.all_reduce()
    loss, acc, count = sums.means()
    result: dict = {"loss": loss, "acc": acc, "count": count}
    if keep_probabilities:
        result["probabilities"] = torch.cat(kept) if kept else torch.empty(0)
    return result
