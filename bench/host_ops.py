"""`python -m bench.host_ops`: the host work a loader does per training batch, in steady state.

For each batch of one epoch (after a warm-up epoch) it counts torch operations (on a GPU host each is a kernel
launch of ~25 us, competing with the training step for the Python thread; views and allocations that launch nothing
are left out) and DALI pipeline calls (each DALI iteration costs ~2-3 ms of host time), and times taking the batch.
The DALI loader works a chunk at a time: between chunk boundaries both counts must be 0. Without a GPU it counts
DALI's CPU mode.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import LOADERS, make_loader
from pipeline.cli import OneLineParser, check_fits_in_memory, one_line_errors, positive_int
from pipeline.data import IMAGE_BYTES, IMAGE_SHAPE

# Operations that make views, metadata or uninitialized memory: no kernel behind them unless they call one (aten::to
# -> aten::copy_ across devices, aten::reshape -> aten::clone of a non-contiguous tensor).
VIEWS = re.compile(
    r"aten::(detach_?|to|resolve_conj|resolve_neg|contiguous|view|lift_fresh|alias|slice|select|t|transpose|reshape"
    r"|_reshape_alias|unsqueeze|permute|as_strided|expand|split|split_with_sizes|empty|empty_like|empty_strided|numpy_T)"
)
DALI_CALLS = ("feed_input", "schedule_run", "run", "outputs", "share_outputs", "release_outputs")
_MARK = "host_ops.batch."


@dataclass
class HostWork:
    """Batch i of an epoch took ops[i] torch operations and dali[i] DALI calls (name -> count), and seconds[i] of host
    time in an epoch without counting; it starts a chunk when i % chunk_batches == 0 (batch 0: the epoch's too)."""

    ops: list[Counter]
    dali: list[Counter]
    seconds: list[float]
    chunk_batches: int

    @property
    def chunks(self) -> int:
        return -(-len(self.ops) // self.chunk_batches)


class _CountingPipe:
    """A DALI pipeline that counts the calls named in DALI_CALLS into `calls` and forwards everything."""

    def __init__(self, pipe, calls: Counter):
        self._wrapped, self._calls = pipe, calls

    def __getattr__(self, name: str):
        if name in DALI_CALLS:
            self._calls[name] += 1  # (every call looks its method up first)
        return getattr(self._wrapped, name)


def _launches(event) -> bool:
    """A profiler event of an aten operation that runs a kernel: not a view, or a view calling one that does."""
    children = [child for child in event.cpu_children if child.name.startswith("aten::")]
    return not VIEWS.fullmatch(event.name) or any(_launches(child) for child in children)


def host_work(loader, warmup_epochs: int = 1) -> HostWork:
    """Time, then count the torch operations and DALI calls of, each batch of one epoch of `loader` (a
    pipeline.Loader) after `warmup_epochs` whole epochs. Its DALI pipeline (`loader.pipe`) is wrapped to count."""
    for _ in range(warmup_epochs):
        for _ in loader:
            pass
    seconds, it = [], iter(loader)
    for _ in range(len(loader)):
        start = time.perf_counter()
        next(it)
        seconds.append(time.perf_counter() - start)
    it.close()
    calls: Counter = Counter()
    pipe = getattr(loader, "pipe", None)
    if pipe is not None:
        loader.pipe = _CountingPipe(pipe, calls)
    dali = []
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's own USDT/ERROR lines say nothing about the loader
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            it = iter(loader)
            for i in range(len(loader)):
                before = calls.copy()
                with torch.profiler.record_function(f"{_MARK}{i}"):
                    next(it)
                dali.append(calls - before)
            if next(it, None) is not None:
                raise AssertionError("the loader yielded more batches than len() says")
    finally:
        if pipe is not None:
            loader.pipe = pipe
    ops: list[Counter] = [Counter() for _ in dali]
    for event in prof.events():
        if event.name.startswith(_MARK):
            i = int(event.name[len(_MARK) :])
            ops[i].update(c.name for c in event.cpu_children if c.name.startswith("aten::") and _launches(c))
    return HostWork(ops, dali, seconds, getattr(loader, "chunk_batches", 1))


def report(work: HostWork) -> list[str]:
    """The table: per kind of batch, how many, and per batch the mean torch operations, DALI calls and host ms."""
    n, every = len(work.ops), work.chunk_batches
    groups = {"whole epoch": list(range(n))}
    if every > 1:
        groups["between chunk boundaries"] = [i for i in range(n) if i % every]
        groups["later chunk boundaries"] = [i for i in range(1, n) if i % every == 0]
        groups["epoch start (first batch)"] = [0]
        groups["whole epoch"] = groups.pop("whole epoch")  # last
    lines = [f"{'batches':33s} {'count':>5s} {'torch ops':>9s} {'DALI calls':>10s} {'host ms':>9s}  (means per batch)"]
    for name, batches in groups.items():
        if batches:
            ops = sum(sum(work.ops[i].values()) for i in batches) / len(batches)
            dali = sum(sum(work.dali[i].values()) for i in batches) / len(batches)
            ms = 1e3 * sum(work.seconds[i] for i in batches) / len(batches)
            lines.append(f"{name:33s} {len(batches):5d} {ops:9.2f} {dali:10.2f} {ms:9.3f}")
    for what, counts in (("torch ops", work.ops), ("DALI calls", work.dali)):
        common = sum(counts, Counter()).most_common(4)
        if common:
            lines.append(f"{what} in the epoch, most frequent: " + ", ".join(f"{k} x{v}" for k, v in common))
    return lines


@one_line_errors("--images or --batch-size")
def main(argv: list[str] | None = None) -> int:
    from pipeline.dali_loader import CHUNK_IMAGES

    p = OneLineParser(
        prog="python -m bench.host_ops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--loader", choices=LOADERS, default="dali", help="loader to count (default: dali)")
    p.add_argument("--batch-size", type=positive_int, default=512, help="images per batch (default: 512)")
    p.add_argument("--images", type=positive_int, default=3 * CHUNK_IMAGES, help="images per epoch (default: 3 chunks)")
    args = p.parse_args(argv)
    if args.images < args.batch_size:  # the sizes alone can tell: before anything is allocated
        p.error(f"--batch-size {args.batch_size} with --images {args.images}: raise --images or lower --batch-size")
    try:
        check_fits_in_memory(args.images * IMAGE_BYTES, f"--images {args.images}")
    except ValueError as err:
        p.error(str(err))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = np.random.default_rng(0).integers(0, 256, (args.images, *IMAGE_SHAPE, 3), dtype=np.uint8)
    labels = np.zeros(len(images), np.int64)
    workers = 0 if args.loader == "cpu" else None
    loader = make_loader(args.loader, images, labels, args.batch_size, device=device, workers=workers)
    work = host_work(loader)
    head = f"{args.loader} loader on {device}, batch {args.batch_size}, {args.images:,} images: {len(work.ops)} batches"
    chunks = f" in {work.chunks} DALI chunk(s) of up to {work.chunk_batches}" if work.chunk_batches > 1 else ""
    print(head + chunks, *report(work), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
