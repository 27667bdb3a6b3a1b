"""torchrun: the process group, who prints, the check that every rank runs the same number of steps, one model on
every rank at each evaluation and save (and the check of it), and which errors mean that another rank is gone."""

from __future__ import annotations

import datetime
import os
import re
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.order import Order, epoch_indices

# A rank that dies leaves the others blocked in a collective; this timeout turns that hang into an error.
DEFAULT_TIMEOUT_S = 300
TIMEOUT_ENV = "TRAIN_DIST_TIMEOUT_S"
# The longest timeout taken, a week: far beyond any healthy wait, and inside what the backends' counters hold.
MAX_TIMEOUT_S = 7 * 24 * 3600

# What gloo (transport/tcp), torch's NCCL watchdog and NCCL's ncclRemoteError say when a peer is gone or stopped
# answering: closed or reset connections, broken pipes, timeouts, aborted communicators. An error without any of
# these (a collective mismatch, a CUDA error, a bad argument) is a bug and keeps its traceback.
LOST_PEER = re.compile(r"by peer|broken pipe|socket (unexpectedly )?closed|timed? ?out|aborted|remote process", re.I)


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


def init_distributed(use_cuda: bool) -> Dist:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (NCCL on CUDA, gloo on the CPU), or
    a single-process run without them. Raises ConfigError, before joining, for variables that cannot be."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Dist()
    dist = Dist(_env_int("RANK", None), world_size, _env_int("LOCAL_RANK", 0))
    if not (0 <= dist.rank < world_size and dist.local_rank >= 0):
        raise ConfigError(
            f"RANK={dist.rank} and LOCAL_RANK={dist.local_rank} do not fit WORLD_SIZE={world_size} (RANK in "
            f"0..{world_size - 1}); launch with torchrun, which sets them, or unset WORLD_SIZE for one process"
        )
    timeout = datetime.timedelta(seconds=timeout_s())
    if use_cuda:
        local_world_size = _env_int("LOCAL_WORLD_SIZE", dist.local_rank + 1)
        gpus = torch.cuda.device_count()
        if local_world_size > gpus:
            raise ConfigError(
                f"torchrun started {local_world_size} processes on this node but torch sees {gpus} GPU(s), and each "
                f"process needs its own; use torchrun --nproc_per_node {gpus}, or --device cpu"
            )
        torch.cuda.set_device(dist.local_rank)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    return dist


def _env_int(name: str, default: int | None) -> int:
    """The whole number in environment variable `name`, `default` when unset. Raises ConfigError."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    if text is not None:
        with suppress(ValueError):
            return int(text)
    shown = "unset" if text is None else repr(text)
    raise ConfigError(
        f"{name} is {shown}, not a whole number (WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}); launch with "
        "torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK, or unset WORLD_SIZE for one process"
    )


def timeout_s() -> int:
    """The collective timeout in seconds: $TRAIN_DIST_TIMEOUT_S, else DEFAULT_TIMEOUT_S. Raises ConfigError."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"{TIMEOUT_ENV}={text!r} must be a positive whole number of seconds, at most {MAX_TIMEOUT_S} (a week)"
        )
    return seconds


def require_agreement(counts: dict[str, int], device: torch.device, dist: Dist) -> None:
    """ConfigError on every rank unless each of `counts` (name -> this rank's value) is the same on every rank.
    DDP and SyncBatchNorm wait for every rank at every step; pipeline.order gives every rank the same number of
    batches by construction (so DDP needs no Join), and this one all_reduce checks that promise."""
    if not dist.enabled:
        return
    values = torch.tensor([v for value in counts.values() for v in (value, -value)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    for i, name in enumerate(counts):
        most, fewest = int(values[2 * i]), -int(values[2 * i + 1])
        if most != fewest:
            raise ConfigError(
                f"the {dist.world_size} ranks disagree on the {name} ({fewest} to {most}); every rank must read the "
                "same CIFAR-10 files with the same flags, so that each runs the same number of steps"
            )


def lost_peer(err: BaseException | None) -> bool:
    """Whether `err` says that another rank died or stopped answering: a torch store or network error, or a backend
    error whose text LOST_PEER matches (or in the text of the error it was raised from)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, torch.distributed.DistNetworkError | torch.distributed.DistStoreError):
            return True
        if isinstance(err, RuntimeError) and LOST_PEER.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def lost_contact_message(err: BaseException, rank: int | str) -> str:
    """The one line a rank prints for an error that `lost_peer` recognizes (no traceback: it is not a bug here)."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    detail = re.sub(r"^\[[^\]]*:\d+\]\s*", "", detail)  # gloo's "[path/pair.cc:561] " prefix
    detail = detail.split(". ")[0][:200]  # gloo adds "This is typically caused by ..." sentences
    return (
        f"error: rank {rank} lost contact with the other ranks ({type(err).__name__}: {detail}). Another rank died, "
        f"stopped answering for longer than {TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)} s, or the "
        "network failed; the other ranks' logs (or torchrun's report) say which. Continue with --resume auto."
    )


def broadcast_buffers(*modules: nn.Module | None) -> None:
    """Copy rank 0's buffers of `modules` (None skipped) into every rank's, in place: BatchNorm statistics, the
    weight EMA's, any a model adds. DDP broadcasts buffers only at each training forward, so after an epoch's last
    step each rank holds its own batches' statistics; called before every evaluation and save, so that every rank
    evaluates, and rank 0 saves, one and the same model."""
    for module in modules:
        for buffer in module.buffers() if module is not None else ():
            torch.distributed.broadcast(buffer, src=0)


def ranks_in_sync(*modules: nn.Module | None) -> bool:
    """Whether every rank holds the same parameters and buffers of `modules` (None skipped): DDP keeps the parameters
    so, `broadcast_buffers` the buffers; this checks both, cheaply, once an epoch."""
    tensors = [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]
    fingerprint = torch.stack([t.detach().double().sum() for t in tensors])
    low, high = fingerprint.clone(), fingerprint.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(low, high))
