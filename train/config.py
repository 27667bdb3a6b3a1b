"""Training configuration: every flag declared once, as a TrainConfig field with its help text; named recipes.
Precedence, last wins: the defaults (a resumed run: its checkpoint's settings), the recipe, the flags given."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import model
from pipeline import LOADERS, check_seed, check_workers
from pipeline.cli import DefaultsHelpFormatter, OneLineParser
from pipeline.data import IMAGE_SHAPE
from pipeline.errors import CheckpointError, ConfigError
from pipeline.spec import AugSpec

if TYPE_CHECKING:
    import torch

    from train.dist import Dist

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
DEVICES = ("auto", "cuda", "cpu")
TTAS = ("none", "flip")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
CUDA_GRAPH = ("auto", "on", "off")


# The ranges a number may be in (a flag's `valid`). Finite: an infinite lr or weight decay makes every weight
# non-finite at the first step, which the flags alone can tell.
VALID = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "a finite number > 0": lambda v: 0 < v < math.inf,
    "a finite number >= 0": lambda v: 0 <= v < math.inf,
}


# Flags about one command, not the run: a resumed run takes them from its own command line (or their defaults), never
# from the checkpoint (a run started with --overwrite must still resume; a bar belongs to the terminal at hand).
PER_COMMAND = ("out", "resume", "overwrite", "progress", "download")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag(default: Any, help: str, *, resumable: bool = False, **argparse_kwargs: Any) -> Any:
    """A TrainConfig field and its flag: the default, the --help text and argparse's other keywords in one place.
    `resumable`: the flag may differ between a run and its resumption (it changes nothing the epochs compute);
    `valid`: the range (VALID) a number must be in."""
    metadata = {"help": help, "resumable": resumable, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    recipe: str | None = flag(None, "named settings (train/config.py RECIPES) as defaults; every flag given wins")
    loader: str = flag(
        "dali", "dali: DALI pipeline (on the GPU where there is one); cpu: albumentations", choices=LOADERS
    )
    model: str = flag("seed", f"network: one of {', '.join(model.model_names())}")
    epochs: int = flag(60, "training epochs", valid="> 0")
    batch_size: int = flag(128, "global batch size (images per optimizer step, over all torchrun ranks)", valid="> 0")
    lr: float = flag(
        0.05, "peak learning rate (metrics.json's per-epoch lr is the epoch's mean)", valid="a finite number > 0"
    )
    optimizer: str = flag("sgd", "optimizer", choices=OPTIMIZERS)
    momentum: float = flag(0.9, "SGD momentum (AdamW beta1)", valid="in [0, 1)")
    nesterov: bool = flag(True, "Nesterov momentum for SGD")
    weight_decay: float = flag(5e-4, "weight decay of conv and linear weights", valid="a finite number >= 0")
    schedule: str = flag("onecycle", "learning-rate schedule, stepped every batch", choices=SCHEDULES)
    warmup_frac: float = flag(0.2, "fraction of the steps warming up linearly to the peak lr", valid="in [0, 1)")
    label_smoothing: float = flag(0.0, "label smoothing of the cross-entropy", valid="in [0, 1)")
    ema: float = flag(0.0, "weight EMA decay per step, for evaluation (0 = off; no CUDA graph)", valid="in [0, 1)")
    tta: str = flag("none", "test-time augmentation: flip averages an image and its mirror", choices=TTAS)
    aug: list[str] = flag([], "set an AugSpec field, e.g. cutout_p=0.3 (repeatable)", action="append", metavar="K=V")
    val_split: int = flag(0, "hold out N training images and evaluate on them, not the test set", valid=">= 0")
    limit_train: int = flag(0, "train on the first N images only (smoke runs); 0 = all", valid=">= 0")
    limit_eval: int = flag(0, "evaluate on the first N images only (smoke runs); 0 = all", valid=">= 0")
    data_dir: str | None = flag(None, "CIFAR-10's folder (default: $CIFAR10_ROOT, else ~/data/cifar10)", resumable=True)
    download: bool = flag(False, "download and verify the official archive if the data is missing", resumable=True)
    allow_small_data: bool = flag(False, "accept splits smaller than 50,000/10,000 (tests)")
    out: str = flag("runs/latest", "output folder for metrics.json, checkpoints and plots", resumable=True)
    resume: str | None = flag(
        None, "continue a run with its settings (auto: <out>/last.pt)", resumable=True, metavar="PATH"
    )
    overwrite: bool = flag(False, "allow --out to hold another run's files (they are replaced)", resumable=True)
    seed: int = flag(0, "seed of the order, the augmentations and the weights: an integer in [0, 2**63 - 1]")
    device: str = flag("auto", "auto = CUDA if available", choices=DEVICES)
    workers: int | None = flag(
        None,
        "--loader cpu: DataLoader worker processes (0 = the main process; default: every usable core); --loader dali: "
        "DALI's CPU threads (at least 1; default: 4 on a GPU, every usable core in its CPU mode); at most 4 per core",
        resumable=True,
        type=int,
    )
    # None (not given): resolve_auto makes it True where the GPU does bf16 natively, else False, before it is recorded
    amp: bool | None = flag(None, "bf16 autocast, CUDA only (default: on with a GPU that does bf16 natively)")
    channels_last: bool = flag(True, "channels_last memory format for the model and its input")
    compile: bool = flag(False, "torch.compile the model (compile_seconds: the warm-up, compilation included)")
    compile_mode: str = flag("default", "torch.compile mode", choices=COMPILE_MODES)
    cuda_graph: str = flag(
        "off",
        "replay the training step as one CUDA graph: on, off, or auto (on where it can: CUDA, SGD, one process, no "
        "--compile, no --ema)",
        choices=CUDA_GRAPH,
    )
    eval_every: int = flag(1, "evaluate every N epochs (the last epoch always)", valid="> 0")
    sync_bn: bool = flag(False, "torchrun on CUDA GPUs: SyncBatchNorm across ranks")
    tensorboard: bool = flag(False, "also log to <out>/tensorboard (needs the [tensorboard] extra)", resumable=True)
    progress: bool | None = flag(None, "progress bars (default: only when stderr is a terminal)", resumable=True)

    def aug_spec(self) -> AugSpec:
        """The seed's spec with the --aug overrides, checked against CIFAR-10's image size. Raises ValueError."""
        spec = AugSpec.from_overrides(self.aug)
        spec.check_image_size(*IMAGE_SHAPE)
        return spec


# Named recipes: every value that differs from the defaults above, in one place.
RECIPES: dict[str, dict[str, object]] = {
    # The seed's settings: its net, batch size 128, 60 epochs, its augmentations (AugSpec defaults).
    "seed": {"model": "seed", "batch_size": 128, "epochs": 60, "lr": 0.05, "optimizer": "sgd", "schedule": "onecycle"},
    # Time to 85%: docs/results.md says how each value was chosen on a validation split.
    "fast": {
        "model": "dwres",  # model/fast.py: residual depthwise-separable net, 187,882 parameters
        "batch_size": 512,  # big enough to keep the GPU busy with a 190k-parameter net, small enough for 19 epochs
        # As many epochs as fit in 13.5 s at dwres's measured step rate on the H200 (78k img/s at bs 512, minus
        # 8% for the loader): picked before any accuracy was seen.
        "epochs": 19,
        "lr": 0.8,  # best of 0.2 / 0.4 / 0.8 on a 5,000-image validation split (86.1 / 87.1 / 87.3%)
        "warmup_frac": 0.15,  # then linear decay to zero (onecycle); zero-init residual BN makes the high peak safe
        "weight_decay": 5e-4,  # on conv/linear weights only
        "label_smoothing": 0.1,  # softer targets for a short schedule
        "tta": "flip",  # the net never learns left from right; averaging an image with its mirror is nearly free
        "cuda_graph": "auto",  # the eager step is launch-bound on a fast GPU (train/step.py); off on the CPU
    },
}


def build_parser(*, defaults: bool = True) -> argparse.ArgumentParser:
    """The parser of `python -m train`, one flag per TrainConfig field; without `defaults`, it returns only the
    flags given."""
    parser = OneLineParser(
        prog="python -m train",
        description="Train a small CIFAR-10 network, fed by the DALI GPU loader or the albumentations CPU loader.",
        formatter_class=DefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        kwargs = {k: v for k, v in f.metadata.items() if k not in ("resumable", "valid")}
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if f.name == "recipe":
            kwargs["choices"] = sorted(RECIPES)
        elif isinstance(default, bool) or f.name in ("amp", "progress"):  # --x and --no-x: a saved True can be undone
            kwargs["action"] = argparse.BooleanOptionalAction
        elif type(default) in (int, float):
            kwargs.setdefault("type", type(default))
        kwargs["default"] = default if defaults else argparse.SUPPRESS
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parse_flags(argv: list[str]) -> tuple[dict[str, Any], set[str]]:
    """(every field's value, the names of the fields given on the command line). Bad flags exit 2, in one line."""
    recipe_parser = OneLineParser(add_help=False)
    recipe_parser.add_argument("--recipe", choices=sorted(RECIPES))
    recipe = recipe_parser.parse_known_args(argv)[0].recipe  # the last --recipe given, as in the full parse
    parser = build_parser()
    if recipe:
        parser.set_defaults(**RECIPES[recipe])  # argparse's own precedence: a flag given always wins over a default
    values = vars(parser.parse_args(argv))
    return values, set(vars(build_parser(defaults=False).parse_args(argv)))


def make_config(
    values: dict[str, Any], given: set[str], saved: dict | None = None, source: Path | None = None
) -> TrainConfig:
    """The validated TrainConfig of parsed flags, or of checkpoint config `saved` (read from `source`) with the
    flags given on top. Raises CheckpointError if a given flag changes what the epochs compute."""
    if saved is not None:
        names = {f.name: f for f in dataclasses.fields(TrainConfig)}
        differ = [
            f"{k}: {saved.get(k)!r} -> {values[k]!r}"
            for k in sorted(given)
            if not names[k].metadata["resumable"] and saved.get(k, names[k].default) != values[k]
        ]
        if differ:
            raise CheckpointError(
                f"{source}: was written with other settings ({'; '.join(differ)}). Leave those flags out to continue "
                "with the checkpoint's settings, or start a new run in another --out."
            )
        kept = {k: v for k, v in saved.items() if k in names and k not in PER_COMMAND}
        values = {**values, **kept, **{k: values[k] for k in given}}
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def parse_config(argv: list[str]) -> TrainConfig:
    """The validated TrainConfig of a command line without --resume's checkpoint (see `make_config`)."""
    return make_config(*parse_flags(argv))


def validate(cfg: TrainConfig) -> None:
    """Refuse values that cannot work, before any work is done. Raises ConfigError."""
    checks = [
        (
            VALID[f.metadata["valid"]](getattr(cfg, f.name)),
            f"{_flag(f.name)} must be {f.metadata['valid']}, got {getattr(cfg, f.name)}",
        )
        for f in dataclasses.fields(TrainConfig)
        if "valid" in f.metadata
    ]
    checks += [
        (
            cfg.model in model.model_names(),
            f"--model {cfg.model!r} is unknown; choose one of {', '.join(model.model_names())}",
        ),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other; pick one"),
        # An empty path (an unset shell variable) is refused, not read as the current folder or as no flag at all.
        (cfg.out != "", "--out is empty; give the run's folder (. for the current one)"),
        (cfg.data_dir != "", "--data-dir is empty; give the data folder, or leave the flag out for the default"),
        (cfg.resume != "", "--resume is empty; give a checkpoint or auto, or leave the flag out for a new run"),
        (
            cfg.compile or cfg.compile_mode == "default",
            f"--compile-mode {cfg.compile_mode} does nothing without --compile; add --compile",
        ),
        (
            not cfg.tensorboard or importlib.util.find_spec("tensorboard") is not None,
            "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        cfg.aug_spec()
        check_seed(cfg.seed)
        check_workers(cfg.workers, "--workers", cfg.loader)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_hardware(cfg: TrainConfig, device: torch.device, dist: Dist) -> None:
    """Refuse what this device and torchrun world cannot run, before any data is read. Raises ConfigError, or
    DaliUnavailable for --loader dali without DALI."""
    import torch

    on_cpu = device.type != "cuda"
    blockers = cuda_graph_blockers(cfg, device, dist)
    checks = [
        (
            not (cfg.sync_bn and on_cpu),
            "--sync-bn: torch's SyncBatchNorm has no CPU implementation (it needs CUDA GPUs); drop --sync-bn",
        ),
        (
            not cfg.sync_bn or dist.enabled,
            "--sync-bn synchronizes BatchNorm across torchrun ranks and does nothing in a single process; drop it",
        ),
        (
            not (cfg.compile_mode == "reduce-overhead" and on_cpu),
            "--compile-mode reduce-overhead replays CUDA graphs, which need a CUDA GPU; use --compile-mode default",
        ),
        (not (cfg.amp and on_cpu), "--amp (bf16 autocast) works on CUDA only; drop --amp (off by default on the CPU)"),
        (
            # short-circuits before asking CUDA anything on the CPU
            not (cfg.amp and not on_cpu and not torch.cuda.is_bf16_supported(including_emulation=False)),
            "--amp: this GPU has no native bf16 (that needs compute capability 8.0 or newer); drop --amp",
        ),
        (
            cfg.batch_size % dist.world_size == 0,
            f"--batch-size {cfg.batch_size} (global) must divide by the {dist.world_size} ranks",
        ),
        (
            cfg.cuda_graph != "on" or not blockers,
            f"--cuda-graph on cannot work here: {'; '.join(blockers)}. Use --cuda-graph off or auto",
        ),
    ]
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
            # AveragedModel reads its step counter on the host after every step: a sync the graph exists to avoid
            ("--ema updates the weight average on the host after every step", cfg.ema > 0),
        )
        if applies
    ]


def resolve_auto(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """`cfg` with --amp made concrete for `device`: on where the GPU does bf16 natively, else off."""
    import torch

    if cfg.amp is None:
        amp = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        cfg = dataclasses.replace(cfg, amp=amp)
    return cfg
