"""`python -m bench`: how fast each loader feeds the model, against the model's own ceiling, on this machine.

Writes bench/results/<device>-<yyyymmdd>.json and a PNG chart beside it, and prints a table. See --help.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import numpy as np
import torch

from bench.core import bench_epoch, bench_loader, bench_model
from pipeline import usable_cores

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure (a) each loader alone, (b) the model's training step alone, (c) a full training epoch "
        "with each loader, for several batch sizes. Loaders: cpu = albumentations + DataLoader with "
        "several worker counts; dali-gpu = the batched DALI graph on CUDA; dali-cpu = DALI's CPU "
        "operators. Timed regions follow a warm-up and are closed by torch.cuda.synchronize().",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes to measure (default 128 512 2048; --quick: 64 128)",
    )
    p.add_argument(
        "--loaders",
        nargs="+",
        default=None,
        choices=["cpu", "dali-gpu", "dali-cpu"],
        help="loaders to measure (default: all that this machine can run)",
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="CPU loader worker counts (default: all cores, half, a quarter)",
    )
    p.add_argument(
        "--what",
        nargs="+",
        default=["loader", "model", "epoch"],
        choices=["loader", "model", "epoch"],
        help="which measurements",
    )
    p.add_argument("--model", default="seed", help="network for the model and epoch measurements")
    p.add_argument("--compile", action="store_true", help="also measure the model step under torch.compile")
    p.add_argument(
        "--steps",
        nargs="+",
        default=None,
        choices=["eager", "graph"],
        help="training steps for the model and epoch rows: eager, and/or graph = replayed as one CUDA graph "
        "(train/step.py; CUDA only). Default: both on CUDA, eager on the CPU",
    )
    p.add_argument("--images", type=int, default=50_000, help="images per epoch (synthetic uint8 data)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement")
    p.add_argument("--max-loader-batches", type=int, default=100, help="batches per timed loader repeat")
    p.add_argument("--model-steps", type=int, default=50, help="steps per timed model repeat")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where the model runs")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG")
    p.add_argument(
        "--quick",
        action="store_true",
        help="seconds-long smoke run: batch sizes 64 128, 2048 images, 1 repeat, few steps",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes = args.batch_sizes or [64, 128]
        args.images, args.repeats, args.max_loader_batches, args.model_steps = 2048, 1, 8, 5
    args.batch_sizes = args.batch_sizes or [128, 512, 2048]
    return args


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    loaders = args.loaders or (["cpu", "dali-gpu", "dali-cpu"] if device.type == "cuda" else ["cpu", "dali-cpu"])
    if device.type != "cuda" and "dali-gpu" in loaders:
        print("error: dali-gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    steps = args.steps or (["eager", "graph"] if device.type == "cuda" else ["eager"])
    if device.type != "cuda" and "graph" in steps:
        print("error: --steps graph needs a CUDA GPU (a CUDA graph replays GPU work)", file=sys.stderr)
        return 2
    cores = usable_cores()
    workers = args.workers or sorted({cores, max(cores // 2, 1), max(cores // 4, 1)}, reverse=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.int64)

    results: list[dict] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device_slug(device)}-{datetime.date.today():%Y%m%d}" + ("-quick" if args.quick else "")
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dali": _dali_version(),
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "images": args.images,
        "data": "synthetic uint8",
        "date": datetime.date.today().isoformat(),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }

    def record(result) -> None:  # noqa: ANN001
        row = result.row()
        results.append(row)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))  # after every row: a cut-off run keeps its rows
        print(
            f"{row['what']:6s} {row['loader'] or 'model':11s} bs {row['batch_size']:5d} "
            f"workers {row['workers'] if row['workers'] is not None else '-':>3} step {row['step'] or '-':5s} "
            f"{row['img_per_s']:12,.0f} img/s  [{row['img_per_s_min']:,.0f} .. {row['img_per_s_max']:,.0f}]"
            + (f"  epoch {row['epoch_s']:.2f}s" if row["epoch_s"] else ""),
            flush=True,
        )

    for bs in args.batch_sizes:
        if "model" in args.what:
            for kind in steps:
                record(bench_model(args.model, bs, device, args.repeats, args.model_steps, graphed=kind == "graph"))
            if args.compile:
                compiled = bench_model(args.model, bs, device, args.repeats, args.model_steps, compile_model=True)
                compiled.loader = "model-compiled"
                record(compiled)
        if "loader" in args.what:
            for name in loaders:
                for w in workers if name == "cpu" else [cores]:
                    record(bench_loader(name, images, labels, bs, w, device, args.repeats, args.max_loader_batches))
        if "epoch" in args.what:
            for kind in steps:
                record(
                    bench_epoch(
                        None, args.model, images, labels, bs, None, device, args.repeats, graphed=kind == "graph"
                    )
                )
                for name in loaders:
                    record(
                        bench_epoch(
                            name, args.model, images, labels, bs, cores, device, args.repeats, graphed=kind == "graph"
                        )
                    )

    from bench.plot import plot_report

    plot_report(report, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")
    return 0


def _dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except ImportError:
        return None
    return dali.__version__


if __name__ == "__main__":
    sys.exit(main())
