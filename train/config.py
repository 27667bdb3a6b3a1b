"""Training configuration: plain defaults, named recipes, CLI overrides (in that order of precedence, last wins).

Two checks refuse what cannot work before any data is read: `validate` (the flags alone, at parse time) and
`check_hardware` (the flags against the device and the torchrun world, once those are known).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import model
from pipeline import LOADERS, check_seed, check_workers
from pipeline.cli import DefaultsHelpFormatter, OneLineParser
from pipeline.data import IMAGE_SHAPE
from pipeline.errors import ConfigError
from pipeline.spec import AugSpec

if TYPE_CHECKING:
    import torch

    from train.dist import Dist


@dataclass
class TrainConfig:
    loader: str = "dali"
    model: str = "seed"
    epochs: int = 60
    batch_size: int = 128  # global: the images in one optimizer step, summed over all ranks under torchrun
    lr: float = 0.05  # peak learning rate of the schedule
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_frac: float = 0.2  # fraction of the steps spent rising linearly to the peak (every schedule)
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of an exponential moving average of the weights used for evaluation; 0 = off
    tta: str = "none"  # "flip": average the logits of each test image and its mirror image
    aug: list[str] = field(default_factory=list)  # AugSpec overrides, KEY=VALUE
    val_split: int = 0  # hold out this many training images; evaluate on them instead of the test set
    data_dir: str | None = None
    download: bool = False
    allow_small_data: bool = False
    limit_train: int = 0  # 0 = all
    out: str = "runs/latest"
    resume: str | None = None  # a checkpoint path, or "auto" for <out>/last.pt
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    # bf16 autocast. None (--amp not given) = on where the GPU does bf16 natively: `resolve_auto` makes it True or
    # False for the device before the run records or checks its config, so metrics.json and checkpoints hold a bool.
    amp: bool | None = None
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" replays CUDA graphs (fewest launches)
    # Replay the training step as one CUDA graph (train/step.py): "on", "off", or "auto" = on wherever it can work
    # (CUDA, SGD, one process, no torch.compile), off elsewhere.
    cuda_graph: str = "off"
    eval_every: int = 1  # evaluate after every N-th epoch; the last epoch is always evaluated
    sync_bn: bool = False
    tensorboard: bool = False
    progress: bool = True
    recipe: str | None = None

    def aug_spec(self) -> AugSpec:
        """The seed's spec with the --aug overrides, checked against CIFAR-10's image size (before any data is
        read). Raises ValueError naming the field."""
        spec = AugSpec.from_overrides(self.aug)
        spec.check_image_size(*IMAGE_SHAPE)
        return spec


# Named recipes: every value that differs from the defaults above, in one place.
RECIPES: dict[str, dict[str, object]] = {
    # The seed's settings: its net, batch size 128, 60 epochs, its augmentations (AugSpec defaults).
    "seed": {"model": "seed", "batch_size": 128, "epochs": 60, "lr": 0.05, "optimizer": "sgd", "schedule": "onecycle"},
    # Time to 85%: see README "Time to 85%" for how each value was chosen on a validation split.
    "fast": {
        "model": "dwres",  # model/fast.py: residual depthwise-separable net, 187,882 parameters
        "batch_size": 512,  # big enough to keep the GPU busy with a 190k-parameter net, small enough for 19 epochs
        # As many epochs as fit in 13.5 s at dwres's measured step rate on the H200 (78k img/s at bs 512, minus
        # 8% for the loader): picked before any accuracy was seen (bench/gpu_session.sh, phase 1).
        "epochs": 19,
        "lr": 0.8,  # best of 0.2 / 0.4 / 0.8 on a 5,000-image validation split (86.1 / 87.1 / 87.3%)
        "warmup_frac": 0.15,  # then linear decay to zero (onecycle); zero-init residual BN makes the high peak safe
        "weight_decay": 5e-4,  # on conv/linear weights only
        "label_smoothing": 0.1,  # softer targets for a short schedule
        "tta": "flip",  # the net never learns left from right; averaging an image with its mirror is nearly free
        "cuda_graph": "auto",  # the eager step is launch-bound on a fast GPU (train/step.py); off on the CPU
    },
}

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
DEVICES = ("auto", "cuda", "cpu")
TTAS = ("none", "flip")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
CUDA_GRAPH = ("auto", "on", "off")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineParser(
        prog="python -m train",
        description="Train a small CIFAR-10 network, fed by the DALI GPU loader or the albumentations CPU loader.",
        formatter_class=DefaultsHelpFormatter,
        # Flags are spelled out: an abbreviation (--epoch, --batch) would be a second spelling of every flag, and one
        # that stops meaning the same flag as soon as a flag with the same prefix is added.
        allow_abbrev=False,
    )
    a = p.add_argument
    _add_recipe_flag(p)
    a(
        "--loader",
        choices=LOADERS,
        default=d.loader,
        help="dali: DALI pipeline (GPU operators on CUDA, CPU operators otherwise); cpu: albumentations + DataLoader",
    )
    a("--model", default=d.model, help=f"network: one of {', '.join(model.model_names())}")
    a("--epochs", type=int, default=d.epochs, help="training epochs")
    a(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global batch size (images per optimizer step, over all torchrun ranks)",
    )
    a("--lr", type=float, default=d.lr, help="peak learning rate")
    a("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer")
    a("--momentum", type=float, default=d.momentum, help="SGD momentum (AdamW beta1)")
    a("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov, help="Nesterov momentum for SGD")
    a("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    a("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule, stepped every batch")
    a(
        "--warmup-frac",
        type=float,
        default=d.warmup_frac,
        help="fraction of the steps warming up linearly to the peak lr",
    )
    a("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing of the cross-entropy")
    a("--ema", type=float, default=d.ema, help="weight EMA decay per step for evaluation (0 = off)")
    a("--tta", choices=TTAS, default=d.tta, help="test-time augmentation: flip averages an image and its mirror")
    a(
        "--aug",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an AugSpec field, e.g. --aug cutout_p=0.3 (repeatable; see pipeline/spec.py)",
    )
    a(
        "--val-split",
        type=int,
        default=d.val_split,
        help="hold out N training images and evaluate on them instead of the test set (for tuning)",
    )
    a(
        "--data-dir",
        default=d.data_dir,
        help="folder holding cifar-10-batches-py/ (or that folder); default $CIFAR10_ROOT, else ~/data/cifar10",
    )
    a("--download", action="store_true", help="download and verify the official archive if the data is missing")
    a("--allow-small-data", action="store_true", help="accept splits smaller than 50,000/10,000 (tests)")
    a("--limit-train", type=int, default=d.limit_train, help="train on the first N images only (smoke runs); 0 = all")
    a("--out", default=d.out, help="output folder for metrics.json, checkpoints and plots")
    a("--resume", default=d.resume, metavar="PATH|auto", help="continue from a checkpoint (auto = <out>/last.pt)")
    a("--overwrite", action="store_true", help="allow --out to hold another run's files (they are replaced)")
    a(
        "--seed",
        type=int,
        default=d.seed,
        help="seed for the order, the augmentations and the weights: an integer in [0, 2**63 - 1] (the range numpy, "
        "torch and DALI all accept as it is)",
    )
    a("--device", choices=DEVICES, default=d.device, help="auto = CUDA if available")
    a(
        "--workers",
        type=int,
        default=d.workers,
        help="--loader cpu: DataLoader worker processes (0 = in the main process; default: every usable core); "
        "--loader dali: DALI's CPU threads (at least 1; default: 4 on a GPU, every usable core in DALI's CPU mode); "
        "at most 4 per usable core. "
        "metrics.json records the number used (resolved.workers)",
    )
    a(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,  # not given: TrainConfig's None, resolved per device by resolve_auto
        help="bf16 autocast, CUDA only (default: on with a GPU that does bf16 natively, off on the CPU)",
    )
    a(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=d.channels_last,
        help="channels_last memory format for the model and its input",
    )
    a("--compile", action="store_true", help="torch.compile the model (time reported as compile_seconds)")
    a(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=d.compile_mode,
        help="torch.compile mode: reduce-overhead replays CUDA graphs, for launch-bound small nets",
    )
    a("--sync-bn", action="store_true", help="torchrun on CUDA GPUs: SyncBatchNorm across ranks")
    a(
        "--cuda-graph",
        choices=CUDA_GRAPH,
        default=d.cuda_graph,
        help="replay the training step as one CUDA graph: on, off, or auto (on where it can work: CUDA, SGD, one "
        "process, no --compile; the fast recipe's setting)",
    )
    a("--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs (the last epoch always)")
    a("--tensorboard", action="store_true", help="also log to <out>/tensorboard (needs the [tensorboard] extra)")
    a("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="show the tqdm progress bar")
    return p


def _add_recipe_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="named settings (see train/config.py RECIPES): they become the defaults, and every flag given overrides "
        "them, wherever it stands",
    )


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line (sys.argv[1:] if `argv` is None), validated.

    A recipe's values are the parser's defaults (argparse's own precedence: a flag given on the command line always
    wins over a default), so no flag can be ignored whatever its position or spelling. Raises ConfigError for values
    that cannot work; argparse errors exit with code 2 and one line.
    """
    recipe_parser = OneLineParser(add_help=False, allow_abbrev=False)
    _add_recipe_flag(recipe_parser)
    recipe = recipe_parser.parse_known_args(argv)[0].recipe  # the last --recipe given, as in the full parse
    parser = build_parser()
    if recipe:
        parser.set_defaults(**RECIPES[recipe])
    values = vars(parser.parse_args(argv))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in names})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Refuse values that cannot work, before any work is done."""
    checks = [
        (cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}"),
        (cfg.eval_every > 0, f"--eval-every must be > 0, got {cfg.eval_every}"),
        (
            cfg.cuda_graph != "on" or cfg.optimizer == "sgd",
            "--cuda-graph on: the captured step implements SGD only; use --optimizer sgd or --cuda-graph off",
        ),
        (cfg.cuda_graph != "on" or not cfg.compile, "--cuda-graph on and --compile both capture the step; pick one"),
        (cfg.batch_size > 0, f"--batch-size must be > 0, got {cfg.batch_size}"),
        # finite: an infinite lr or weight decay makes every weight non-finite at the first step, which the flags
        # alone can tell (the run would otherwise read the data and warm up to stop at batch 2)
        (0 < cfg.lr < math.inf, f"--lr must be a finite number > 0, got {cfg.lr}"),
        (
            cfg.model in model.model_names(),
            f"--model {cfg.model!r} is unknown; choose one of {', '.join(model.model_names())}",
        ),
        (cfg.loader in LOADERS, f"--loader {cfg.loader!r} is unknown; choose one of {', '.join(LOADERS)}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (0 <= cfg.weight_decay < math.inf, f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}"),
        (0 <= cfg.warmup_frac < 1, f"--warmup-frac must be in [0, 1), got {cfg.warmup_frac}"),
        (0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (0 <= cfg.ema < 1, f"--ema must be in [0, 1), got {cfg.ema}"),
        (cfg.val_split >= 0, f"--val-split must be >= 0, got {cfg.val_split}"),
        (cfg.limit_train >= 0, f"--limit-train must be >= 0, got {cfg.limit_train}"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other; pick one"),
        # An empty path (an unset shell variable, `--out "$OUT"`) is refused, not read as the current folder
        # (--out), the default data folder (--data-dir) or no resume at all (--resume).
        (cfg.out != "", "--out is empty; give the run's folder (. for the current one)"),
        (cfg.data_dir != "", "--data-dir is empty; give the data folder, or leave the flag out for the default"),
        (cfg.resume != "", "--resume is empty; give a checkpoint or auto, or leave the flag out for a new run"),
        (
            cfg.compile or cfg.compile_mode == "default",
            f"--compile-mode {cfg.compile_mode} does nothing without --compile; add --compile",
        ),
    ]
    import importlib.util

    checks.append(
        (
            not cfg.tensorboard or importlib.util.find_spec("tensorboard") is not None,
            "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'",
        )
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        cfg.aug_spec()
        check_seed(cfg.seed)
        check_workers(cfg.workers, "--workers")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_hardware(cfg: TrainConfig, device: torch.device, dist: Dist) -> None:
    """Refuse the settings that this device and this launch cannot run, before any data is read.

    `device` is the resolved training device (train.run.resolve_device), `dist` the torchrun world. Every check that
    needs a flag together with the device or the world size belongs here (those on the flags alone are in
    `validate`). Raises ConfigError (one line: what is wrong and what to do), or DaliUnavailable for --loader dali
    on a machine without DALI.
    """
    import torch

    on_cpu = device.type != "cuda"
    checks = [
        (
            not (cfg.sync_bn and on_cpu),
            "--sync-bn: torch's SyncBatchNorm has no CPU implementation (it needs CUDA GPUs); drop --sync-bn",
        ),
        (
            not cfg.sync_bn or dist.enabled,
            "--sync-bn synchronizes BatchNorm across torchrun ranks and does nothing in a single process; drop it, "
            "or launch several ranks with torchrun",
        ),
        (
            not (cfg.compile_mode == "reduce-overhead" and on_cpu),
            "--compile-mode reduce-overhead replays CUDA graphs, which need a CUDA GPU; on the CPU use "
            "--compile-mode default",
        ),
        (
            not (cfg.amp and on_cpu),
            "--amp (bf16 autocast) works on CUDA only: a CPU run computes in float32; drop --amp (off by default "
            "on the CPU)",
        ),
        (
            # short-circuits before asking CUDA anything on the CPU
            not (cfg.amp and not on_cpu and not torch.cuda.is_bf16_supported(including_emulation=False)),
            "--amp: this GPU has no native bf16 (that needs compute capability 8.0 or newer); drop --amp",
        ),
        (
            cfg.batch_size % dist.world_size == 0,
            f"--batch-size {cfg.batch_size} (global) must divide by the {dist.world_size} ranks",
        ),
    ]
    blockers = cuda_graph_blockers(cfg, device, dist)
    checks.append(
        (
            cfg.cuda_graph != "on" or not blockers,
            f"--cuda-graph on cannot work here: {'; '.join(blockers)}. Use --cuda-graph off or auto",
        )
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.loader == "dali":
        from pipeline.dali_loader import require_dali

        require_dali()


def cuda_graph_blockers(cfg: TrainConfig, device: torch.device, dist: Dist) -> list[str]:
    """Why the training step cannot be captured as a CUDA graph here (empty: it can; see train/step.py)."""
    return [
        why
        for why, applies in (
            ("it needs a CUDA device", device.type != "cuda"),
            ("the captured step implements SGD only", cfg.optimizer != "sgd"),
            ("torch.compile captures the step itself", cfg.compile),
            # DDP's gradient all-reduce inside a captured graph is not something this project has tested
            ("it is not tested under torchrun", dist.enabled),
        )
        if applies
    ]


def resolve_auto(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """`cfg` with its device-dependent defaults made concrete, as metrics.json and checkpoints record them: --amp not
    given means bf16 autocast on a CUDA GPU that does bf16 natively, float32 elsewhere."""
    import torch

    if cfg.amp is None:
        amp = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        cfg = dataclasses.replace(cfg, amp=amp)
    return cfg
