"""`python -m bench.host_ops`: the host work a loader does per training batch, in steady state.

Two counts for every batch handed out during one epoch (after a warm-up epoch):
- torch operations: on a launch-bound GPU host each one is a kernel launch of ~25 us that competes with the training
  step for the same Python thread. Counted with the torch profiler: top-level aten operations, leaving out views and
  allocations that launch nothing (an operation counts if it, or one it calls, is not in VIEWS).
- DALI calls: feed_input, schedule_run, run, outputs, share_outputs, release_outputs, counted by wrapping the
  loader's DALI pipeline object. Each iteration costs DALI a fixed ~2-3 ms of host time (issue 10).

The DALI loader touches DALI and runs torch operations only at chunk boundaries (pipeline/dali_loader.py): between
them both counts must be 0. The report gives that, the cost per chunk, and the epoch's start (where the epoch's
parameters are drawn). Runs anywhere: without a GPU it counts DALI's CPU mode.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import LOADERS, make_loader
from pipeline.cli import OneLineParser, check_fits_in_memory, one_line_on_out_of_memory, positive_int, say_error
from pipeline.data import IMAGE_BYTES, IMAGE_SHAPE

# Operations that only make views, metadata or uninitialized memory: no kernel behind them (unless they call one,
# e.g. aten::to -> aten::copy_ across devices, aten::reshape -> aten::clone of a non-contiguous tensor).
VIEWS = {
    "aten::detach",
    "aten::detach_",
    "aten::to",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::contiguous",
    "aten::view",
    "aten::lift_fresh",
    "aten::alias",
    "aten::slice",
    "aten::select",
    "aten::t",
    "aten::transpose",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::unsqueeze",
    "aten::permute",
    "aten::as_strided",
    "aten::expand",
    "aten::split",
    "aten::split_with_sizes",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::numpy_T",
}
# The DALI Pipeline methods that run, feed or collect an iteration.
DALI_CALLS = ("feed_input", "schedule_run", "run", "outputs", "share_outputs", "release_outputs")
_MARK = "host_ops.batch."


@dataclass
class HostWork:
    """What taking each batch of one epoch cost the host.

    ops[i]:     torch operations (name -> count) while batch i was taken from the loader
    dali[i]:    DALI pipeline calls (name -> count) in the same time
    seconds[i]: host wall time of taking batch i in another epoch, without profiler or counting (on a GPU the
                loader's host work; where the loader waits for DALI to finish a chunk, that wait too)
    chunk_batches: batches per DALI chunk (1 for a loader without chunks); batch i starts a chunk when
                i % chunk_batches == 0, and batch 0 also holds the epoch's start.
    """

    ops: list[Counter]
    dali: list[Counter]
    seconds: list[float]
    chunk_batches: int

    @property
    def chunks(self) -> int:
        """DALI iterations (chunks) in the epoch."""
        return -(-len(self.ops) // self.chunk_batches)

    def between(self) -> list[int]:
        """The batches that do not start a chunk."""
        return [i for i in range(len(self.ops)) if i % self.chunk_batches]

    def later_boundaries(self) -> list[int]:
        """The batches after the epoch's first that start a chunk."""
        return [i for i in range(1, len(self.ops)) if i % self.chunk_batches == 0]

    def total(self, batches: list[int]) -> tuple[Counter, Counter, float]:
        """(torch operations, DALI calls, seconds) summed over `batches`."""
        return (
            sum((self.ops[i] for i in batches), Counter()),
            sum((self.dali[i] for i in batches), Counter()),
            sum(self.seconds[i] for i in batches),
        )


class _CountingPipe:
    """A DALI pipeline that counts the calls named in DALI_CALLS into `calls` and forwards everything."""

    def __init__(self, pipe, calls: Counter):  # pipe: a nvidia.dali.Pipeline
        self._wrapped, self._calls = pipe, calls

    def __getattr__(self, name: str):
        attr = getattr(self._wrapped, name)
        if name not in DALI_CALLS:
            return attr

        def counted(*args, **kwargs):
            self._calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def _launches(event) -> bool:  # event: a profiler FunctionEvent
    """An aten operation that runs a kernel: not a view, or a view that calls one that does (its children named
    without "aten::" are autograd's bookkeeping, not operations)."""
    children = [child for child in event.cpu_children if child.name.startswith("aten::")]
    return event.name not in VIEWS or any(_launches(child) for child in children)


def host_work(loader, warmup_epochs: int = 1) -> HostWork:  # loader: a pipeline.Loader
    """Time, then count the torch operations and DALI calls of, each batch of one epoch of `loader` (two epochs),
    after `warmup_epochs` whole epochs (steady state: DALI's buffers allocated, torch's caching allocator warm).
    The loader's DALI pipeline (`loader.pipe`, if it has one) is wrapped for the counted epoch and restored after."""
    for _ in range(warmup_epochs):
        for _ in loader:
            pass
    seconds = []
    it = iter(loader)
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
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            it = iter(loader)
            for i in range(len(loader)):
                before = calls.copy()
                with torch.profiler.record_function(f"{_MARK}{i}"):
                    next(it)
                dali.append(calls - before)
            for _ in it:  # the epoch's end (nothing left: len() is exact)
                raise AssertionError("the loader yielded more batches than len() says")
    finally:
        if pipe is not None:
            loader.pipe = pipe
    ops = [Counter() for _ in dali]
    for event in prof.events():
        if event.name.startswith(_MARK):
            i = int(event.name[len(_MARK) :])
            ops[i].update(c.name for c in event.cpu_children if c.name.startswith("aten::") and _launches(c))
    return HostWork(ops, dali, seconds, getattr(loader, "chunk_batches", 1))


def _line(what: str, ops: Counter, dali: Counter, seconds: float, per: int) -> None:
    """One line of the report: counts and host time per `per` batches."""

    def say(counter: Counter) -> str:
        common = ", ".join(f"{name} x{count / per:.3g}" for name, count in counter.most_common(4))
        return f"{sum(counter.values()) / per:.3g}" + (f" ({common})" if common else "")

    parts = [f"torch ops {say(ops)}" if ops or not dali else "", f"DALI calls {say(dali)}" if dali or not ops else ""]
    if seconds:
        parts.append(f"host time {seconds / per * 1e3:.3g} ms")
    print(f"{what}: " + "; ".join(part for part in parts if part))


@one_line_on_out_of_memory("--images or --batch-size")
def main(argv: list[str] | None = None) -> int:
    from pipeline.dali_loader import CHUNK_IMAGES, CPU_CHUNK_IMAGES

    p = OneLineParser(
        prog="python -m bench.host_ops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--loader", choices=LOADERS, default="dali", help="loader to count (default: dali)")
    p.add_argument("--batch-size", type=positive_int, default=512, help="images per batch (default: 512)")
    p.add_argument(
        "--images",
        type=positive_int,
        default=3 * CHUNK_IMAGES,
        help=f"synthetic images per epoch (default: {3 * CHUNK_IMAGES:,}: 3 GPU chunks, "
        f"{3 * CHUNK_IMAGES // CPU_CHUNK_IMAGES} in DALI's CPU mode)",
    )
    args = p.parse_args(argv)
    try:  # the sizes alone can tell: before anything is allocated
        if args.images < args.batch_size:
            raise ValueError(
                f"--batch-size {args.batch_size} with --images {args.images}: need at least one batch of images; "
                "raise --images or lower --batch-size"
            )
        check_fits_in_memory(args.images * IMAGE_BYTES, f"--images {args.images}")
    except ValueError as err:
        say_error(str(err))
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = np.random.default_rng(0).integers(0, 256, (args.images, *IMAGE_SHAPE, 3), dtype=np.uint8)
    loader = make_loader(
        args.loader,
        images,
        np.zeros(len(images), np.int64),
        args.batch_size,
        device=device,
        workers=0 if args.loader == "cpu" else None,
    )
    work = host_work(loader)
    batches = len(work.ops)
    print(f"{args.loader} loader on {device}, batch {args.batch_size}, {args.images} images: {batches} batches")
    if getattr(loader, "pipe", None) is None:
        _line("per batch", *work.total(list(range(batches))), batches)
        return 0
    print(f"{work.chunks} chunk(s) (DALI iterations) of up to {work.chunk_batches} batches")
    inner, later = work.between(), work.later_boundaries()
    _line(f"per batch between chunk boundaries ({len(inner)} batches)", *work.total(inner), len(inner))
    _line("per chunk, DALI", Counter(), work.total(list(range(batches)))[1], 0.0, work.chunks)
    if later:
        _line(f"per chunk boundary after the epoch's first batch ({len(later)})", *work.total(later), len(later))
    _line("epoch start (first batch: parameters drawn, first chunks fed)", *work.total([0]), 1)
    _line("per batch over the whole epoch", *work.total(list(range(batches))), batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
