"""torchrun: the process group, who prints, and the per-epoch check that every rank holds the same weights."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# A rank that dies leaves the others blocked in a collective; this timeout turns that hang into an error.
DEFAULT_TIMEOUT_S = 300


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

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
    """Print on rank 0 only (one report per job, not one per rank)."""
    if dist.is_main:
        print(message, flush=True)


def init_distributed(use_cuda: bool) -> Dist:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (NCCL on CUDA, gloo on the CPU);
    without those variables this is a single-process run. The collective timeout is $TRAIN_DIST_TIMEOUT_S seconds."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    dist = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(dist.local_rank)
    timeout = datetime.timedelta(seconds=int(os.environ.get("TRAIN_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    return dist


def ranks_in_sync(net: nn.Module) -> bool:
    """Whether every rank holds the same weights (DDP keeps them so; this checks it, cheaply, once an epoch)."""
    fingerprint = torch.stack([p.detach().double().sum() for p in net.parameters()])
    low, high = fingerprint.clone(), fingerprint.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def joined(loader: Iterable, net: nn.Module, dist: Dist) -> Iterator:
    """Under torchrun, shards may differ by one batch; DDP's Join lets the shorter ranks shadow the collectives."""
    if not dist.enabled:
        yield from loader
        return
    from torch.distributed.algorithms.join import Join

    with Join([net]):
        yield from loader
