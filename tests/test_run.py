"""What a run records and says: metrics.json holds what actually ran, the run talks, evaluation every N epochs, the
CUDA-graph step's refusals and its automatic choice, predictions from the final evaluation (not a second pass)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from runs import metrics_of, run_train, small_run_args

from train.optim import lr_factor


@pytest.mark.slow
def test_metrics_record_what_actually_ran(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1", "--limit-eval", "40")
    args.remove("--data-dir")
    args.remove(tiny_cifar)  # the data folder comes from the environment, as many users set it
    args.remove("--no-progress")  # no flag: bars only on a terminal, and stderr is a pipe here
    result = run_train(*args, env={"CIFAR10_ROOT": tiny_cifar})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar redrawn into a log file
    assert "test loss" in result.stdout and "(40 of 100 images: --limit-eval)" in result.stdout
    m = metrics_of(out)
    assert m["config"]["data_dir"] is None  # what was asked ...
    assert m["resolved"]["data_dir"] == str(Path(tiny_cifar).resolve())  # ... and what was used
    # --amp not given: resolved per device before anything records it (bf16 autocast needs CUDA)
    assert m["resolved"]["amp"] is False and m["config"]["amp"] is False
    assert m["resolved"]["cuda_graph"] is False and m["resolved"]["device"] == "cpu"
    assert m["config"]["workers"] == 0 and m["resolved"]["workers"] == 0  # --workers 0: the main process
    assert m["config"]["limit_eval"] == 40 and m["epochs"][0]["test_images"] == 40
    assert m["resolved"]["train_images"] == 300 and m["resolved"]["eval_images"] == 40
    # the epoch's mean learning rate (the last step's was 0 for a one-epoch onecycle run)
    mean = sum(lr_factor("onecycle", step, 5, 0.2) for step in range(5)) / 5  # 300 images, batch 64: 5 steps
    assert m["epochs"][0]["lr"] == pytest.approx(0.05 * mean)
    assert re.fullmatch(r"[0-9a-f]{64}", m["env"]["code"]["source_sha256"])
    assert m["env"]["code"]["package"] == "0.1.0"
    assert m["eval_seconds"] > 0 and m["epochs"][0]["eval_seconds"] > 0
    # wall_seconds is the whole command: at least training, warm-up and evaluation together
    assert m["wall_seconds"] >= m["train_seconds"] + m["warmup_seconds"] + m["eval_seconds"]


@pytest.mark.slow
def test_a_run_says_what_it_is_doing(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    result = run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "1"))
    assert result.returncode == 0, result.stderr
    said = result.stdout
    for phrase in ("reading CIFAR-10 from", "warming up", "eager step", "writing predictions.npz", "this command"):
        assert phrase in said, phrase
    assert said.index("reading CIFAR-10") < said.index("warming up") < said.index("epoch 1/1:")


@pytest.mark.slow
def test_progress_bar_moves_every_batch(tiny_cifar, tmp_path):
    """5 batches an epoch, fewer than the 25 between device reads: the bar still shows each one. tqdm redraws at most
    every 0.1 s by default (its `mininterval`), so on a fast machine it may skip a count; TQDM_MININTERVAL=0 (tqdm's
    own environment override, tqdm >= 4.66) makes it draw every update, which is what this test asks about: that our
    code updates the bar per batch, not per device read. Any other TQDM_* of the caller's environment is removed and
    the width fixed (tests/conftest.py), so the bar is drawn the same way on every machine."""
    args = small_run_args(tiny_cifar, tmp_path / "run", "--loader", "cpu", "--epochs", "1")
    args[args.index("--no-progress")] = "--progress"
    result = run_train(*args, env={"TQDM_MININTERVAL": "0"})
    assert result.returncode == 0, result.stderr
    for done in range(1, 6):
        assert f"| {done}/5 [" in result.stderr, f"the bar never showed {done}/5"
    assert "evaluating on test" in result.stderr  # evaluation has a bar too


@pytest.mark.slow
def test_eval_every_skips_epochs_but_never_the_last(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    result = run_train(*small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "3", "--eval-every", "2"))
    assert result.returncode == 0, result.stderr
    epochs = metrics_of(out)["epochs"]
    assert ["test_acc" in e for e in epochs] == [False, True, True]
    assert (out / "best.pt").exists() and (out / "curves.png").stat().st_size > 5_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cuda-graph", "on", "--device", "cpu"], "--cuda-graph on cannot work here: it needs a CUDA device"),
        (["--cuda-graph", "on", "--optimizer", "adamw"], "the captured step implements SGD only"),
        (["--cuda-graph", "on", "--compile"], "torch.compile captures the step itself"),
        (["--eval-every", "0"], "--eval-every must be > 0"),
    ],
)
def test_cuda_graph_refusals_come_before_any_work(tmp_path, args, message, refused):
    from train.__main__ import cli

    argv = [*args, "--device", "cpu", "--out", str(tmp_path / "out"), "--data-dir", "/nonexistent"]
    assert message in refused(cli, argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fast_recipe_on_the_cpu_runs_eagerly(tiny_cifar, tmp_path):
    out = tmp_path / "fast"
    result = run_train(*small_run_args(tiny_cifar, out, "--recipe", "fast", "--loader", "cpu", "--epochs", "1"))
    assert result.returncode == 0, result.stderr
    m = metrics_of(out)
    assert m["config"]["cuda_graph"] == "auto" and m["resolved"]["cuda_graph"] is False


@pytest.mark.slow
def test_predictions_come_from_the_final_evaluation(tiny_cifar, tmp_path, monkeypatch):
    """One pass over the evaluation split per evaluation: the final one's probabilities become predictions.npz."""
    import numpy as np

    import train.run

    calls = []
    real = train.run.evaluate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("keep_probabilities", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(train.run, "evaluate", counting)
    out = tmp_path / "run"
    metrics = train.run.main(small_run_args(tiny_cifar, out, "--loader", "cpu", "--epochs", "2"))
    assert calls == [False, True]  # one evaluation per epoch, no extra pass for the predictions
    predictions = np.load(out / "predictions.npz")
    accuracy = float((predictions["predicted"] == predictions["labels"]).mean())
    assert accuracy == pytest.approx(metrics["epochs"][-1]["test_acc"])
    assert metrics["wall_seconds"] >= metrics["train_seconds"]


def test_the_epoch_loop_reads_the_device_once_every_sync_every_steps(monkeypatch):
    """Each read is a host-device sync that stalls the queue of launched work: the loss, accuracy and non-finite
    marker come back together, once every SYNC_EVERY steps and once at the end."""
    import torch

    import model as models
    from train.config import TrainConfig
    from train.loop import SYNC_EVERY, train_one_epoch
    from train.optim import make_optimizer, make_scheduler
    from train.step import TrainStep

    cfg, steps = TrainConfig(model="dwres"), 2 * SYNC_EVERY
    net = models.build(cfg.model)
    optimizer = make_optimizer(net, cfg)
    kwargs = {"steps_per_epoch": steps, "label_smoothing": 0.0, "amp": False, "device": torch.device("cpu")}
    step = TrainStep(net, optimizer, make_scheduler(optimizer, cfg, steps), graphed=False, **kwargs)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    reads = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, real=real, name=name: reads.append(name) or real(t))
    stats = train_one_epoch(step, [batch] * steps, epoch=0)
    assert len(reads) == steps // SYNC_EVERY + 1 and stats["images"] == 2 * steps
