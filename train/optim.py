"""The optimizer and the learning-rate schedule (shared by `python -m train` and `python -m bench`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import TrainConfig

# The warm-up starts at this fraction of the peak lr, as OneCycleLR's default div_factor=25 does.
WARMUP_START = 1 / 25


def make_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov if cfg.nesterov) or AdamW (beta1 = cfg.momentum) over `net`'s parameters, at peak lr cfg.lr.
    Weight decay only on weights with more than one dimension: decaying BatchNorm scales and biases fights the
    normalization. Raises ValueError for an unknown optimizer."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def lr_factor(schedule: str, step: int, total: int, warmup_frac: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`: a linear warm-up from WARMUP_START
    over the first `warmup_frac` of the steps, then "onecycle" decays linearly to zero (as airbench does), "cosine"
    follows half a cosine to zero, "constant" stays at the peak. Raises ValueError for an unknown schedule."""
    warmup = int(total * warmup_frac)
    if step < warmup:
        return WARMUP_START + (1 - WARMUP_START) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        return max(1.0 - progress, 0.0)
    raise ValueError(f"unknown schedule {schedule!r}; choose onecycle, cosine or constant")


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over `lr_factor` (cfg.schedule, cfg.warmup_frac), stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.schedule, step, total_steps, cfg.warmup_frac)
    )
