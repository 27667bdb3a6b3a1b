"""`python -m bench.host_ops`: how many torch operations the loaders run on the host per batch, in steady state.

On a launch-bound GPU host every operation is a kernel launch of ~25 us that competes with the training step for the
same Python thread, so this count is the loader's share of the host. Counted with the torch profiler (top-level aten
operations; views, which launch nothing, are left out). Runs anywhere: without a GPU it counts DALI's CPU mode.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np
import torch

from pipeline import make_loader

# Operations that only make views or metadata: no kernel behind them.
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
    "aten::empty",
    "aten::empty_like",
    "aten::numpy_T",
}


def ops_per_batch(loader, batches: int = 8) -> tuple[float, Counter]:  # noqa: ANN001
    """Mean torch operations per batch while `batches` batches are taken from the middle of an epoch."""
    it = iter(loader)
    next(it), next(it)  # past the epoch's start (the once-per-epoch work is not per batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(batches):
            next(it)
    ops = Counter(
        e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None and e.name not in VIEWS
    )
    it.close()
    return sum(ops.values()) / batches, ops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.host_ops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--loader", choices=["dali", "cpu"], default="dali")
    p.add_argument("--batch-size", type=int, default=512)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size * 12, 32, 32, 3), dtype=np.uint8)
    loader = make_loader(
        args.loader,
        images,
        np.zeros(len(images), np.int64),
        args.batch_size,
        device=device,
        workers=0 if args.loader == "cpu" else None,
    )
    mean, ops = ops_per_batch(loader)
    print(f"{args.loader} loader on {device}, batch {args.batch_size}: {mean:.1f} torch operations per batch")
    print("most frequent:", ", ".join(f"{name} x{count}" for name, count in ops.most_common(6)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
