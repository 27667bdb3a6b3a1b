"""`python -m bench`: how fast each loader feeds the model, against the model's own ceiling, on this machine.

Prints one line per row as it is measured, writes <out>/<device>-<yyyymmdd>.json after every row and a PNG chart at
the end. The reports in bench/results/ come from bench/gpu_session.sh's archive (results.tgz) of a GPU run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

import model as models
from bench.core import LOADERS, WARMUP_BATCHES, Result, bench_epoch, bench_loader, bench_model
from bench.peers import PEERS, peer_available
from pipeline import cli, usable_cores
from pipeline.data import IMAGE_BYTES, IMAGE_SHAPE
from pipeline.errors import ConfigError
from pipeline.files import os_reason, write_whole

WHATS = ("loader", "model", "epoch")
# A folder in the current directory, not the package's bench/results/ (only the committed reports live there).
DEFAULT_OUT = Path("bench-results")
QUICK = {"batch_sizes": [64, 128], "images": 256, "repeats": 1, "model_steps": 2, "warmup": 1}
# The whole run's length guessed before anything is measured (each row's line corrects it): images per second (per
# core on a CPU) of each kind of row, plus ROW_START_S a row for starting workers, DALI's pipeline, the warm-up.
ROW_START_S = 2.0
GUESS_RATE = {"cpu": {"loader": 4e3, "model": 250, "epoch": 250}, "cuda": {"loader": 5e4, "model": 1e5, "epoch": 4e4}}
HEADER = "what   loader     batch workers step        img/s spread %  epoch s  left s"  # the widths of _line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.OneLineParser(
        prog="python -m bench",
        description="Images per second of each loader alone, the training step alone and a training epoch fed by each "
        "loader, on synthetic images. Loaders: cpu = albumentations; dali-gpu, dali-cpu = DALI's GPU graph, its CPU "
        "mode; kornia = kornia.augmentation on the device ([bench] extra); torch = the same in plain torch.",
        formatter_class=cli.DefaultsHelpFormatter,
    )
    p.add_argument("--batch-sizes", type=cli.positive_int, nargs="+", help="batch sizes (default 128 512 2048)")
    p.add_argument("--loaders", nargs="+", choices=LOADERS, help="loaders (default: all that this machine can run)")
    p.add_argument(
        "--workers", type=cli.worker_count, nargs="+", help="cpu loader workers (default: all cores, half, 1/4)"
    )
    p.add_argument("--what", nargs="+", default=list(WHATS), choices=WHATS, help="kinds of row")
    p.add_argument("--model", default="seed", choices=models.model_names(), help="network of model and epoch rows")
    steps = "training steps of model and epoch rows, graph = one CUDA graph (default: both on CUDA, eager on CPU)"
    p.add_argument("--steps", nargs="+", choices=["eager", "graph"], help=steps)
    p.add_argument("--compile", action="store_true", help="also measure the model step under torch.compile")
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile's mode for --compile (reduce-overhead: torch's own CUDA graphs, against --steps graph)",
    )
    p.add_argument("--images", type=cli.positive_int, default=50_000, help="images per epoch")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="timed repeats of each row")
    p.add_argument("--model-steps", type=cli.positive_int, default=50, help="steps per timed model repeat")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where the model runs")
    p.add_argument("--out", type=cli.output_dir, default=DEFAULT_OUT, help="folder for the JSON and the PNG")
    p.add_argument("--quick", action="store_true", help=f"a smoke run, every kind of row on a few batches: {QUICK}")
    args = p.parse_args(argv)
    args.warmup = WARMUP_BATCHES
    if args.quick:
        vars(args).update({**QUICK, "batch_sizes": args.batch_sizes or QUICK["batch_sizes"]})
    args.batch_sizes = args.batch_sizes or [128, 512, 2048]
    return args


def check_flags(args: argparse.Namespace, device: torch.device, dali: bool) -> None:
    """ConfigError (one line), before any work, for a batch beyond the epoch of loader or epoch rows, images beyond
    memory, a loader or step this machine lacks, an --out it cannot write."""
    if max(args.batch_sizes) > args.images and {"loader", "epoch"} & set(args.what):
        fix = "lower --batch-sizes or leave out --quick" if args.quick else "raise --images or lower --batch-sizes"
        raise ConfigError(
            f"--batch-sizes {max(args.batch_sizes)} is more than --images {args.images}"
            f"{' (set by --quick)' if args.quick else ''}: an epoch would be one smaller batch; {fix}"
        )
    cli.check_fits_in_memory(args.images * IMAGE_BYTES, f"--images {args.images}")
    if args.device == "cuda" and device.type != "cuda":
        raise ConfigError("--device cuda: no CUDA GPU is visible")
    missing = [name for name in args.loaders or [] if name not in default_loaders(device, dali)]
    if missing:
        raise ConfigError(
            f"--loaders {' '.join(missing)}: cannot run here (dali-gpu needs a CUDA GPU and DALI, dali-cpu needs DALI: "
            "pip install nvidia-dali-cuda130; kornia: pip install -e '.[bench]'); leave them out"
        )
    if args.compile_mode != "default" and not args.compile:
        raise ConfigError(f"--compile-mode {args.compile_mode} does nothing without --compile; add --compile")
    if device.type != "cuda" and args.compile and args.compile_mode == "reduce-overhead":
        raise ConfigError("--compile-mode reduce-overhead replays CUDA graphs, which need a CUDA GPU")
    if device.type != "cuda" and "graph" in (args.steps or []):
        raise ConfigError("--steps graph needs a CUDA GPU (a CUDA graph replays GPU work)")
    cli.writable_folder(args.out, "--out")  # or it would fail after the first row


def default_loaders(device: torch.device, dali: bool) -> list[str]:
    """Every loader this machine can run, in LOADERS order (DALI's and kornia where installed, dali-gpu on CUDA)."""
    usable = {"cpu": True, "dali-gpu": dali and device.type == "cuda", "dali-cpu": dali}
    usable.update({peer: peer_available(peer) for peer in PEERS})
    return [name for name in LOADERS if usable[name]]


def plan(args, device: torch.device, loaders: list[str], images: np.ndarray, labels: np.ndarray) -> list[tuple]:
    """The rows in the order measured: (a guess of its seconds, the function that measures it)."""
    cores, steps = usable_cores(), args.steps or (["eager", "graph"] if device.type == "cuda" else ["eager"])
    workers = args.workers or sorted({cores, max(cores // 2, 1), max(cores // 4, 1)}, reverse=True)
    timing = dict(repeats=args.repeats, warmup=args.warmup)
    rows: list[tuple[str, int, Callable[[], Result]]] = []  # (what, images it goes through, measure)
    for bs in args.batch_sizes:
        for kind in [*steps, *["compile"] * args.compile] if "model" in args.what else []:
            compile_mode = args.compile_mode if kind == "compile" else None
            measure = partial(bench_model, args.model, bs, device, steps=args.model_steps, compile_mode=compile_mode)
            measure = partial(measure, graphed=kind == "graph", **timing)
            rows.append(("model", (args.warmup + args.repeats * args.model_steps) * bs, measure))
        for name in loaders if "loader" in args.what else []:
            for w in workers if name == "cpu" else [None if name in PEERS else cores]:
                measure = partial(bench_loader, name, images, labels, bs, w, device, args.repeats)
                rows.append(("loader", (args.repeats + 1) * args.images, measure))
        for kind in steps if "epoch" in args.what else []:
            for feed in [None, *loaders]:
                w = None if feed in (None, *PEERS) else cores
                measure = partial(bench_epoch, feed, args.model, images, labels, bs, w, device, graphed=kind == "graph")
                rows.append(("epoch", args.repeats * args.images + args.warmup * bs, partial(measure, **timing)))
    rate, scale = GUESS_RATE[device.type], cores if device.type == "cpu" else 1
    return [(work / (rate[what] * scale) + ROW_START_S, measure) for what, work, measure in rows]


def _line(row: dict, left: float) -> str:
    spread = 100 * (row["img_per_s_max"] - row["img_per_s_min"]) / row["img_per_s"]
    epoch = f"{row['epoch_s']:8.3f}" if row["epoch_s"] else f"{'-':>8s}"
    workers = "-" if row["workers"] is None else str(row["workers"])
    return (
        f"{row['what']:6s} {row['loader']:10s} {row['batch_size']:5d} {workers:>7s} {row['step'] or '-':5s} "
        f"{row['img_per_s']:11,.0f} {spread:8.1f} {epoch} {left:7.0f}"
    )


@cli.one_line_errors("--batch-sizes or --images")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dali_version = None
    with contextlib.suppress(ImportError):
        import nvidia.dali

        dali_version = nvidia.dali.__version__
    try:
        check_flags(args, device, dali_version is not None)
    except ValueError as err:  # ConfigError, and pipeline.cli's checks
        cli.say_error(str(err))
        return 2
    loaders = args.loaders or default_loaders(device, dali_version is not None)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, *IMAGE_SHAPE, 3), dtype=np.uint8)
    rows = plan(args, device, loaders, images, rng.integers(0, 10, args.images).astype(np.int64))
    results: list[dict] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}core"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = args.out / (f"{slug}-{datetime.date.today():%Y%m%d}" + ("-quick" if args.quick else ""))
    report = {
        "device": name if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dali": dali_version,
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "images": args.images,
        "data": "synthetic uint8",
        "quick": args.quick,
        "date": datetime.date.today().isoformat(),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    guess = sum(seconds for seconds, _ in rows)
    if args.quick:
        print("SMOKE RUN (--quick): a few batches each, not a measurement")
    if not args.loaders and not peer_available("kornia") and {"loader", "epoch"} & set(args.what):
        print("kornia: not installed, left out (pip install -e '.[bench]' to measure it)")
    if "dali-cpu" in loaders and {"loader", "epoch"} & set(args.what):
        print("dali-cpu: DALI's CPU operators (expect CPU-loader speeds, not GPU ones)")
    about = f"{guess / 60:.0f} min" if guess >= 90 else f"{guess:.0f} s"
    print(f"{len(rows)} rows, {args.images:,} images an epoch: about {about} in all (a guess; 'left s' corrects it)")
    print(f"img/s: median of {args.repeats} repeat(s); spread %: (fastest - slowest) / median\n{HEADER}", flush=True)
    start, done, saved = time.perf_counter(), 0.0, 0
    try:
        for seconds, measure in rows:
            results.append(measure().row())
            # after every row, whole or not at all: a stopped run keeps the rows measured so far
            write_whole(stem.with_suffix(".json"), lambda f: f.write(json.dumps(report, indent=2).encode()))
            saved, done = len(results), done + seconds
            print(_line(results[-1], (time.perf_counter() - start) / done * (guess - done)), flush=True)
        from bench.plot import plot_report

        write_whole(stem.with_suffix(".png"), lambda f: plot_report(report, f))
    except OSError as err:  # the disk filled up or went read-only during the run
        held = f"{stem}.json holds the {saved} row(s) measured before" if saved else "no row was saved"
        cli.say_error(f"could not write into {args.out} ({os_reason(err)}); {held}; free space or choose another --out")
        return 2
    except KeyboardInterrupt:
        kept = f"{stem}.json holds the {saved} measured" if saved else "nothing was written"
        print(f"stopped (Ctrl-C) after {len(results)} of {len(rows)} rows; {kept}", file=sys.stderr)
        return 130
    print(f"wrote {stem}.json and .png" + (" (smoke run)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    code = main()
    if code == 130:  # Ctrl-C stopped the loader's workers too: leave before their threads and finalizers report it
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)
