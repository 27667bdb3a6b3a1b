"""`python -m bench`: how fast each loader feeds the model, against the model's own ceiling, on this machine.

Writes ./bench-results/<device>-<yyyymmdd>.json (--out to choose) and a PNG chart beside it, and prints a table.
The committed reports in bench/results/ are written there by bench/gpu_session.sh with --out. See --help.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

import model as models
from bench.core import LOADERS, WARMUP_BATCHES, bench_epoch, bench_loader, bench_model
from bench.peers import PEERS, peer_available
from pipeline import usable_cores
from pipeline.cli import (
    DefaultsHelpFormatter,
    OneLineParser,
    check_fits_in_memory,
    one_line_on_out_of_memory,
    output_dir,
    positive_int,
    say_error,
    worker_count,
    writable_folder,
)
from pipeline.data import IMAGE_BYTES, IMAGE_SHAPE
from pipeline.files import os_reason, write_whole
from train.config import COMPILE_MODES

# Where reports go unless --out says otherwise: a folder in the current directory, not the package's own
# bench/results/ (that holds only the committed reports, which bench/gpu_session.sh writes with --out).
DEFAULT_OUT = Path("bench-results")
# --quick: every kind of row (model step, each loader alone, an epoch with each loader) on a few batches, so that
# it is a smoke test of the whole benchmark (well under 30 s on an otherwise idle 2-core machine), not a measurement.
QUICK = {"batch_sizes": [64, 128], "images": 256, "repeats": 1, "model_steps": 2, "warmup": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m bench",
        description="Measure (a) each loader alone, (b) the model's training step alone, (c) a full training epoch "
        "with each loader, for several batch sizes. Loaders: cpu = albumentations + DataLoader with several worker "
        "counts; dali-gpu = the batched DALI graph on CUDA; dali-cpu = DALI's CPU operators; kornia = "
        "kornia.augmentation on tensors resident on the device (needs the [bench] extra); torch = the project's "
        "epoch parameters applied in plain torch (affine_grid + grid_sample), the airbench way. Timed regions "
        "follow a warm-up and are closed by torch.cuda.synchronize().",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--batch-sizes",
        type=positive_int,
        nargs="+",
        default=None,
        help="batch sizes to measure (default 128 512 2048; --quick: 64 128)",
    )
    p.add_argument(
        "--loaders",
        nargs="+",
        default=None,
        choices=LOADERS,
        help="loaders to measure (default: all that this machine can run)",
    )
    p.add_argument(
        "--workers",
        type=worker_count,
        nargs="+",
        default=None,
        help="CPU loader worker counts, 0 = in the main process, at most 4 per usable core (default: all cores, half, "
        "a quarter)",
    )
    p.add_argument(
        "--what",
        nargs="+",
        default=["loader", "model", "epoch"],
        choices=["loader", "model", "epoch"],
        help="which measurements (default: all three)",
    )
    p.add_argument(
        "--model", default="seed", choices=models.model_names(), help="network for the model and epoch measurements"
    )
    p.add_argument("--compile", action="store_true", help="also measure the model step under torch.compile")
    p.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile's mode for --compile (reduce-overhead: torch's own CUDA graphs, the alternative to "
        "--steps graph; CUDA only)",
    )
    p.add_argument(
        "--steps",
        nargs="+",
        default=None,
        choices=["eager", "graph"],
        help="training steps for the model and epoch rows: eager, and/or graph = replayed as one CUDA graph "
        "(train/step.py; CUDA only). Default: both on CUDA, eager on the CPU",
    )
    p.add_argument("--images", type=positive_int, default=50_000, help="images per epoch (synthetic uint8 data)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats of each measurement")
    p.add_argument("--model-steps", type=positive_int, default=50, help="steps per timed model repeat")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where the model runs")
    p.add_argument(
        "--out",
        type=output_dir,
        default=DEFAULT_OUT,
        help=f"folder for the JSON and PNG (default: ./{DEFAULT_OUT}, in the current directory)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run, seconds long, not a measurement: every kind of row on a few batches (batch sizes "
        f"{' '.join(map(str, QUICK['batch_sizes']))} unless given; --images {QUICK['images']}, --repeats "
        f"{QUICK['repeats']}, --model-steps "
        f"{QUICK['model_steps']}, {QUICK['warmup']} warm-up batch, whatever those flags say)",
    )
    args = p.parse_args(argv)
    args.warmup = WARMUP_BATCHES
    if args.quick:
        quick = {**QUICK, "batch_sizes": args.batch_sizes or QUICK["batch_sizes"]}
        for key, value in quick.items():
            setattr(args, key, value)
    args.batch_sizes = args.batch_sizes or [128, 512, 2048]
    return args


def sizes_fit(args: argparse.Namespace) -> None:
    """ValueError (one line) if a batch is larger than the epoch that loader or epoch rows go through (they would
    time one smaller batch, not the batch size they report) or the synthetic images could not fit in memory (uint8,
    3,072 bytes each). Model rows alone step on one random batch of their own: any batch size fits them."""
    if max(args.batch_sizes) > args.images and {"loader", "epoch"} & set(args.what):
        # under --quick, --images is QUICK's whatever the flag says: raising it would change nothing
        fix = "lower --batch-sizes or leave out --quick" if args.quick else "raise --images or lower --batch-sizes"
        raise ValueError(
            f"--batch-sizes {max(args.batch_sizes)} is more than --images {args.images}"
            f"{' (set by --quick)' if args.quick else ''}: an epoch would be one smaller batch; {fix}"
        )
    check_fits_in_memory(args.images * IMAGE_BYTES, f"--images {args.images}")


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_loaders(device: torch.device, dali: bool) -> list[str]:
    """Every loader this machine can run, in LOADERS order: DALI's when it is installed (`dali`; dali-gpu only on
    CUDA), kornia when it is installed, cpu and torch always."""
    usable = {
        "cpu": True,
        "dali-gpu": dali and device.type == "cuda",
        "dali-cpu": dali,
        **{peer: peer_available(peer) for peer in PEERS},
    }
    return [name for name in LOADERS if usable[name]]


def refusal(loaders: list[str], device: torch.device, dali: bool) -> str | None:
    """Why the asked-for loaders cannot run here (one line), or None."""
    if "dali-gpu" in loaders and device.type != "cuda":
        return "dali-gpu needs a CUDA GPU; leave it out of --loaders, or run where a GPU is visible"
    if not dali and any(name.startswith("dali") for name in loaders):
        return "DALI is not installed (import nvidia.dali failed); install nvidia-dali-cuda130 or leave dali-* out"
    if "kornia" in loaders and not peer_available("kornia"):
        return "--loaders kornia needs kornia: pip install -e '.[bench]' (or leave kornia out of --loaders)"
    return None


@one_line_on_out_of_memory("--batch-sizes or --images")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # the sizes alone can tell: before any device or data is touched
        sizes_fit(args)
    except ValueError as err:
        say_error(str(err))
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        say_error("--device cuda: no CUDA GPU is visible")
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dali_version = _dali_version()
    loaders = args.loaders or default_loaders(device, dali_version is not None)
    problem = refusal(loaders, device, dali_version is not None)
    if problem:
        say_error(problem)
        return 2
    steps = args.steps or (["eager", "graph"] if device.type == "cuda" else ["eager"])
    if args.compile_mode != "default" and not args.compile:
        say_error(f"--compile-mode {args.compile_mode} does nothing without --compile; add --compile")
        return 2
    if device.type != "cuda" and args.compile and args.compile_mode == "reduce-overhead":
        say_error("--compile-mode reduce-overhead replays CUDA graphs, which need a CUDA GPU")
        return 2
    if device.type != "cuda" and "graph" in steps:
        say_error("--steps graph needs a CUDA GPU (a CUDA graph replays GPU work)")
        return 2
    try:  # before any measurement: a folder it cannot write would otherwise fail after the first row
        writable_folder(args.out, "--out")
    except ValueError as err:
        say_error(str(err))
        return 2
    cores = usable_cores()
    workers = args.workers or sorted({cores, max(cores // 2, 1), max(cores // 4, 1)}, reverse=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, *IMAGE_SHAPE, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.int64)

    results: list[dict] = []
    out = args.out
    stem = f"{device_slug(device)}-{datetime.date.today():%Y%m%d}" + ("-quick" if args.quick else "")
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dali": dali_version,
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "images": args.images,
        "data": "synthetic uint8",
        "date": datetime.date.today().isoformat(),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }

    def record(result) -> None:
        row = result.row()
        results.append(row)
        # after every row, whole or not at all: a cut-off run keeps the rows measured so far
        save(out / f"{stem}.json", lambda f: f.write(json.dumps(report, indent=2).encode()), kept=len(results) - 1)
        name = row["loader"] + (f" {row['compile_mode']}" if row["compiled"] else "")
        print(
            f"{row['what']:6s} {name:11s} bs {row['batch_size']:5d} "
            f"workers {row['workers'] if row['workers'] is not None else '-':>3} step {row['step'] or '-':5s} "
            f"{row['img_per_s']:12,.0f} img/s  [{row['img_per_s_min']:,.0f} .. {row['img_per_s_max']:,.0f}]"
            + (f"  epoch {row['epoch_s']:.2f}s" if row["epoch_s"] else ""),
            flush=True,
        )

    def threads(name: str) -> int | None:  # DALI's threads, the CPU loader's workers in an epoch; peers have none
        return None if name in PEERS else cores

    try:
        timing = dict(repeats=args.repeats, warmup=args.warmup)
        for bs in args.batch_sizes:
            if "model" in args.what:
                for kind in steps:
                    record(
                        bench_model(args.model, bs, device, steps=args.model_steps, graphed=kind == "graph", **timing)
                    )
                if args.compile:
                    record(
                        bench_model(
                            args.model, bs, device, steps=args.model_steps, compile_mode=args.compile_mode, **timing
                        )
                    )
            if "loader" in args.what:
                for name in loaders:
                    for w in workers if name == "cpu" else [threads(name)]:
                        record(bench_loader(name, images, labels, bs, w, device, args.repeats))
            if "epoch" in args.what:
                for kind in steps:
                    for name in [None, *loaders]:
                        w = None if name is None else threads(name)
                        record(
                            bench_epoch(
                                name, args.model, images, labels, bs, w, device, graphed=kind == "graph", **timing
                            )
                        )
        from bench.plot import plot_report

        save(out / f"{stem}.png", lambda f: plot_report(report, f), kept=len(results))
    except CannotWrite as err:
        say_error(str(err))
        return 2
    print(f"wrote {out / stem}.json and .png")
    return 0


class CannotWrite(Exception):
    """A report file that --out refused during the run (the disk filled up, went read-only); the message says what
    was kept."""


def save(path: Path, write: Callable[[BinaryIO], object], *, kept: int) -> None:
    """`path` written whole or not at all (pipeline/files.py write_whole); CannotWrite, saying that the JSON beside it
    holds `kept` rows, when the system refuses."""
    try:
        write_whole(path, write)
    except OSError as err:
        held = f"{path.with_suffix('.json')} holds the {kept} row(s) measured before" if kept else "no row was saved"
        raise CannotWrite(
            f"could not write {path} ({os_reason(err)}); {held}; free space or choose another --out"
        ) from None


def _dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except ImportError:
        return None
    return dali.__version__


if __name__ == "__main__":
    sys.exit(main())
