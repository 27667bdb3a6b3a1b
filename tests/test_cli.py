"""`python -m train` as a user runs it: a smoke run that writes its outputs, and refusals that are one clear line."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import torch
from runs import run_train, small_run_args


def cli(argv: list[str]) -> int:
    from train.__main__ import cli

    return cli(argv)


def train_help(*args: str) -> subprocess.CompletedProcess:
    """`python -m train ARGS --help`, in this process (argparse prints and exits 0 before any work)."""
    import contextlib
    import io

    from train.__main__ import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli([*args, "--help"])
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess([*args, "--help"], code, out.getvalue(), err.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["cpu", "dali"])
def test_smoke_run_writes_metrics_and_checkpoints(tiny_cifar, tmp_path, loader):
    out = tmp_path / loader
    result = run_train(*small_run_args(tiny_cifar, out, "--loader", loader))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loader"] == loader and metrics["config"]["epochs"] == 2
    assert {"torch", "dali", "device", "cpu_count"} <= set(metrics["env"])
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for epoch in metrics["epochs"]:
        assert {"train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img_per_s"} <= set(epoch)
        assert 0 <= epoch["test_acc"] <= 1 and 0 <= epoch["train_acc"] <= 1
    assert metrics["train_seconds"] > 0 and metrics["params"] == 190_880
    assert metrics["warmup_seconds"] > 0 and metrics["compile_seconds"] == 0  # warm-up is timed apart
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        assert state["epoch"] in (1, 2) and "model" in state
    assert "final test accuracy" in result.stdout
    if loader == "dali":
        assert result.stdout.count("running DALI's CPU operators") == 1  # said once, not per loader


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--batch-size", "-4"], "--batch-size must be > 0"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        # flags alone can tell: refused before the data is read, not at the first step's non-finite loss
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "1e400"], "--lr must be a finite number > 0, got inf"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
        # an empty path (an unset shell variable) is not the current folder, the default data or "no resume"
        (["--data-dir", ""], "--data-dir is empty"),
        (["--resume", ""], "--resume is empty"),
        (["--model", "vgg"], "--model 'vgg' is unknown"),
        (["--loader", "ffcv"], "invalid choice: 'ffcv'"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--aug", "flip_p=3"], "flip_p must be a probability in [0, 1], got 3.0"),
        (["--aug", "wobble=1"], "--aug expects KEY=VALUE"),
        (["--aug", "cutout_min_px=40", "--aug", "cutout_max_px=40"], "cutout_min_px=40 does not fit a 32x32 image"),
        (["--aug", "cutout_max_px=33"], "cutout_max_px=33 does not fit a 32x32 image"),
        (["--aug", "scale_max_delta=0.99"], "scale_max_delta=0.99 can shrink a 32x32 image"),
        (["--aug", "pad_crop_px=32"], "pad_crop_px=32 lets the crop miss a 32x32 image"),
        (["--aug", "pad_crop_px=2.5"], "pad_crop_px: '2.5' is not a whole number"),
        (["--aug", "std=inf"], "std must be finite per channel"),
        (["--aug", "mean=nan"], "mean must be finite per channel"),
        (["--aug", "std=1e-40"], "beyond float32"),
        (["--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar: folder not found"),
        # seeds outside [0, 2**63 - 1], the range numpy, torch and DALI all take as they are
        (["--seed", "-1"], "--seed must be an integer in [0, 2**63 - 1]"),
        (["--seed", str(2**63)], "--seed must be an integer in [0, 2**63 - 1]"),
        (["--seed", str(2**70)], "--seed must be an integer in [0, 2**63 - 1]"),
        # abbreviations are not a second spelling of a flag
        (["--recipe", "fast", "--epoch", "3"], "unrecognized arguments: --epoch 3"),
        (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead does nothing without --compile"),
        # worker processes: each is a whole process, so a typo would fork until memory runs out
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--workers", "100000"], "--workers 100000 is more than 4 per usable core"),
    ],
)
def test_bad_flags_are_refused_in_one_line(args, message, tmp_path, refused):
    line = refused(cli, [*args, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert message in line
    assert not (tmp_path / "out").exists()  # refused before any work


def test_an_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, refused):
    monkeypatch.chdir(tmp_path)
    line = refused(cli, ["--out", "", "--device", "cpu"])
    assert "--out is empty" in line
    assert list(tmp_path.iterdir()) == []  # nothing written where the command was run


@pytest.mark.parametrize(
    "args, images",
    [(["--batch-size", "1000000000"], 300), (["--limit-train", "100", "--batch-size", "101"], 100)],
)
def test_a_batch_larger_than_the_training_split_is_refused(args, images, tiny_cifar, tmp_path, refused):
    """Not clipped: the run would train on smaller batches than metrics.json says, at a learning rate chosen for
    another batch size. Only the data can tell, so it comes after reading and before any loader."""
    out = tmp_path / "out"
    line = refused(cli, ["--data-dir", tiny_cifar, "--allow-small-data", "--out", str(out), "--device", "cpu", *args])
    assert f"is more than the {images} training images" in line and f"--batch-size {images} or less" in line
    assert not out.exists()


@pytest.mark.parametrize("flag, images", [("--limit-train", 300), ("--limit-eval", 100)])
def test_a_limit_beyond_its_split_is_refused_not_clamped(flag, images, tiny_cifar, tmp_path, refused):
    args = ["--data-dir", tiny_cifar, "--allow-small-data", "--out", str(tmp_path / "out"), "--device", "cpu"]
    line = refused(cli, [*args, "--loader", "cpu", flag, str(images + 1)])
    assert f"{flag} {images + 1} is more than the {images} images of its split" in line
    assert not (tmp_path / "out").exists()


def test_the_graph_is_off_under_ema_with_one_line_saying_why():
    from train.config import TrainConfig, cuda_graph_blockers
    from train.dist import Dist

    blockers = cuda_graph_blockers(TrainConfig(cuda_graph="auto", ema=0.99), torch.device("cuda", 0), Dist())
    assert blockers == ["--ema updates the weight average on the host after every step"]


def test_help_names_no_issue_numbers_or_commits():
    text = train_help("--recipe", "fast").stdout
    assert text.count("--") > 40 and not re.search(r"\bissues? \d+|#\d+|\b[0-9a-f]{7,40}\b", text)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--epochs", "0"], ["--aug", "std=inf"], ["--seed", "-1"], ["--epoch", "3"]])
def test_a_refusal_through_the_real_command_is_one_line(args, tmp_path):
    """The same refusals through `python -m train` in a process of its own, as a user meets them."""
    result = run_train(*args, "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sync-bn"], "--sync-bn: torch's SyncBatchNorm has no CPU implementation"),
        (["--compile", "--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead replays CUDA graphs"),
        (["--amp"], "--amp (bf16 autocast) works on CUDA only"),
    ],
)
def test_settings_the_cpu_cannot_run_are_refused_before_the_data_is_read(args, message, tmp_path, refused):
    # The data folder does not exist: a check that came after reading the data would report that instead.
    argv = [*args, "--device", "cpu", "--data-dir", "/nonexistent/cifar", "--out", str(tmp_path / "out")]
    assert message in refused(cli, argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dali_loader_without_dali_is_refused_before_the_data_is_read(tmp_path):
    # A regular package named `nvidia` earlier on the path hides the installed nvidia.dali, as on a machine without it.
    (tmp_path / "nvidia").mkdir()
    (tmp_path / "nvidia" / "__init__.py").write_text("")
    result = run_train(
        "--loader",
        "dali",
        "--device",
        "cpu",
        "--data-dir",
        "/nonexistent/cifar",
        "--out",
        str(tmp_path / "out"),
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NVIDIA DALI is not installed" in lines[0] and "--loader cpu" in lines[0], result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("loader, seed", [("dali", 0), ("dali", 2**63 - 1), ("cpu", 2**63 - 1)])
def test_seed_range_boundaries_train(tiny_cifar, tmp_path, loader, seed):
    out = tmp_path / "run"
    args = small_run_args(tiny_cifar, out, "--loader", loader, "--seed", str(seed), "--limit-train", "64")
    args[args.index("--epochs") + 1] = "1"
    result = run_train(*args)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["seed"] == seed
    assert config["amp"] is False  # --amp not given: off on the CPU, and recorded as what ran


def test_help_explains_every_flag():
    result = train_help()
    assert result.returncode == 0
    for flag in (
        "--loader",
        "--model",
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--schedule",
        "--data-dir",
        "--download",
        "--out",
        "--seed",
        "--device",
        "--workers",
        "--limit-train",
        "--amp",
        "--channels-last",
        "--compile",
        "--recipe",
        "--val-split",
        "--tta",
        "--resume",
    ):
        assert flag in result.stdout


@pytest.mark.slow
def test_data_dir_from_environment(tiny_cifar, tmp_path):
    result = run_train(
        "--allow-small-data",
        "--out",
        str(tmp_path / "o"),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--loader",
        "cpu",
        "--limit-train",
        "64",
        "--batch-size",
        "32",  # at most the 64 images: a larger batch is refused
        "--device",
        "cpu",
        env={"CIFAR10_ROOT": tiny_cifar},
    )
    assert result.returncode == 0, result.stderr


def test_help_shows_the_recipe_values_as_defaults():
    result = train_help("--recipe", "fast")
    assert result.returncode == 0
    assert "training epochs (default: 19)" in " ".join(result.stdout.split())
    assert "[0, 2**63 - 1]" in " ".join(result.stdout.split())  # the accepted seeds are documented


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--recipe", "fast", "--epochs", "3"], {"epochs": 3, "batch_size": 512}),
        (["--recipe", "fast", "--epochs=3"], {"epochs": 3, "batch_size": 512}),
        (["--epochs", "3", "--recipe", "fast"], {"epochs": 3, "batch_size": 512}),  # --recipe after the flags
        (["--batch-size", "64", "--recipe", "fast"], {"batch_size": 64, "epochs": 19}),
        (["--recipe", "fast", "--batch-size=64"], {"batch_size": 64}),
        (["--recipe", "fast", "--lr", "0.1"], {"lr": 0.1, "warmup_frac": 0.15}),
        (["--recipe", "fast", "--tta", "none"], {"tta": "none", "label_smoothing": 0.1}),
        (["--recipe", "seed", "--recipe", "fast"], {"recipe": "fast", "epochs": 19}),  # the last one, like any flag
        (["--recipe", "fast", "--recipe", "seed", "--epochs", "2"], {"recipe": "seed", "epochs": 2, "lr": 0.05}),
        (["--recipe", "fast", "--no-amp"], {"amp": False}),
        (["--recipe", "fast", "--amp"], {"amp": True}),
        (["--recipe", "fast"], {"amp": None}),  # not given: resolved per device when the run starts
        (["--aug", "flip_p=0.1", "--aug", "ssr_p=0.2"], {"aug": ["flip_p=0.1", "ssr_p=0.2"]}),
    ],
)
def test_every_flag_given_overrides_the_recipe(argv, expected):
    from train.config import parse_config

    cfg = parse_config(argv)
    assert {key: getattr(cfg, key) for key in expected} == expected


@pytest.mark.parametrize("spelling", ["--epoch", "--epo", "--batch", "--batch-s", "--no-nest", "--sync", "--recip"])
def test_abbreviated_flags_are_refused_not_ignored(spelling, capsys):
    from train.config import parse_config

    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--recipe", "fast", spelling, "3"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"unrecognized arguments: {spelling}" in lines[0]


def test_a_recipe_with_a_repeatable_flag_is_extended_not_mutated(monkeypatch):
    from train import config

    monkeypatch.setitem(config.RECIPES, "test", {"aug": ["flip_p=0.1"], "epochs": 2})
    first = config.parse_config(["--recipe", "test", "--aug", "ssr_p=0.2"])
    assert first.aug == ["flip_p=0.1", "ssr_p=0.2"] and first.epochs == 2
    assert config.parse_config(["--recipe", "test"]).aug == ["flip_p=0.1"]  # the recipe's own list is unchanged
    assert config.RECIPES["test"]["aug"] == ["flip_p=0.1"]


def test_every_recipe_key_is_a_flag():
    from train.config import RECIPES, build_parser

    dests = {action.dest for action in build_parser()._actions}
    for recipe in RECIPES.values():
        assert set(recipe) <= dests


def test_recipes_set_defaults_and_flags_override_them():
    from train.config import RECIPES, parse_config

    cfg = parse_config(["--recipe", "fast"])
    for key, value in RECIPES["fast"].items():
        assert getattr(cfg, key) == value
    assert cfg.recipe == "fast"
    cfg = parse_config(["--recipe", "fast", "--epochs", "3", "--no-amp"])
    assert cfg.epochs == 3 and cfg.amp is False and cfg.batch_size == RECIPES["fast"]["batch_size"]
    seed = parse_config(["--recipe", "seed"])
    assert (seed.model, seed.batch_size, seed.epochs) == ("seed", 128, 60)


# --- checks of a flag against the device and the world size (train.config.check_hardware), GPU branches included ---


def _check(monkeypatch, device: str, world_size: int = 1, bf16: bool = True, **flags) -> None:
    from train.config import TrainConfig, check_hardware
    from train.dist import Dist

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    check_hardware(TrainConfig(loader="cpu", **flags), torch.device(device), Dist(0, world_size, 0))


@pytest.mark.parametrize(
    "device, world_size, bf16, flags, message",
    [
        ("cuda", 1, True, {"sync_bn": True}, "--sync-bn synchronizes BatchNorm across torchrun ranks and does nothing"),
        ("cpu", 2, True, {"sync_bn": True}, "--sync-bn: torch's SyncBatchNorm has no CPU implementation"),
        ("cuda", 1, False, {"amp": True}, "--amp: this GPU has no native bf16"),
        ("cpu", 1, True, {"amp": True}, "--amp (bf16 autocast) works on CUDA only"),
        ("cpu", 1, True, {"compile": True, "compile_mode": "reduce-overhead"}, "replays CUDA graphs"),
        ("cpu", 4, True, {"batch_size": 6}, "--batch-size 6 (global) must divide by the 4 ranks"),
        # AveragedModel reads its counter on the host every step: the graph is off under --ema, never half-captured
        ("cuda", 1, True, {"cuda_graph": "on", "ema": 0.9}, "--ema updates the weight average on the host"),
    ],
)
def test_check_hardware_refuses(monkeypatch, device, world_size, bf16, flags, message):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _check(monkeypatch, device, world_size, bf16, **flags)


@pytest.mark.parametrize(
    "device, world_size, flags",
    [
        ("cuda", 2, {"sync_bn": True, "amp": True, "compile": True, "compile_mode": "reduce-overhead"}),
        ("cpu", 1, {"amp": False}),
        ("cpu", 1, {}),  # the default --amp (None) is no error on the CPU
        ("cpu", 4, {"batch_size": 8}),
    ],
)
def test_check_hardware_accepts(monkeypatch, device, world_size, flags):
    _check(monkeypatch, device, world_size, **flags)


@pytest.mark.parametrize(
    "device, bf16, given, expected",
    [
        ("cpu", True, None, False),
        ("cuda", True, None, True),
        ("cuda", False, None, False),
        ("cuda", True, False, False),
    ],
)
def test_amp_default_is_resolved_per_device(monkeypatch, device, bf16, given, expected):
    from train.config import TrainConfig, resolve_auto

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert resolve_auto(TrainConfig(amp=given), torch.device(device)).amp is expected


@pytest.mark.parametrize("seed, ok", [(0, True), (2**63 - 1, True), (np.int64(5), True), (-1, False), (2**63, False)])
def test_loaders_take_the_same_seeds_as_the_cli(seed, ok):
    from pipeline import Order

    if ok:
        assert Order(seed=seed).seed == seed
    else:
        with pytest.raises(ValueError, match=re.escape("--seed must be an integer in [0, 2**63 - 1]")):
            Order(seed=seed)


def test_help_gives_each_default_once_and_never_none():
    import re

    result = train_help()
    assert result.returncode == 0
    options = re.split(r"\n  (?=-)", result.stdout.split("options:", 1)[1])
    for option in options:
        text = " ".join(option.split())
        assert text.count("(default:") + text.count("default:") <= 2, text  # "(default: x)" once, or said in words
        assert "(default: None)" not in text and "(default: False)" not in text, text
    workers = " ".join(next(o for o in options if o.startswith("--workers")).split())  # as one line, unwrapped
    assert "every usable core" in workers and "all cores / 4" not in workers


def test_a_resume_takes_the_commands_own_out_overwrite_and_progress_not_the_checkpoints():
    """A run started with --overwrite (or --progress) resumes with the stop line's command alone: those flags are
    about one command, so the checkpoint's values are not inherited (--overwrite with --resume would be refused)."""
    import dataclasses

    from train.config import TrainConfig, make_config, parse_flags

    saved = dataclasses.asdict(TrainConfig(overwrite=True, progress=True, epochs=3, data_dir="/data", out="old"))
    cfg = make_config(*parse_flags(["--resume", "auto", "--out", "runs/x"]), saved, None)
    assert (cfg.overwrite, cfg.progress, cfg.resume, cfg.out) == (False, None, "auto", "runs/x")
    assert (cfg.epochs, cfg.data_dir) == (3, "/data")  # what the epochs compute and where the data is: the run's
    assert make_config(*parse_flags(["--resume", "auto", "--no-tensorboard"]), {**saved, "tensorboard": True}, None)
