"""The training step (train/step.py): the function captured as a CUDA graph, held to today's eager loop.

On the CPU the captured function runs eagerly (a graph needs CUDA): it must give the same weights, momentum,
schedule, loss/accuracy sums and non-finite marker as the eager step (torch.optim.SGD + LambdaLR) step for step. On
a GPU the replayed graph is held to the eager step within bf16 tolerance.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model as models
from train.config import TrainConfig
from train.optim import make_optimizer, make_scheduler
from train.step import TrainStep

STEPS = 8


def make_step(
    name: str, graphed: bool, device: str = "cpu", *, steps_per_epoch: int = STEPS, **overrides: object
) -> TrainStep:
    cfg = TrainConfig(**{"lr": 0.2, "warmup_frac": 0.25, "weight_decay": 5e-4, **overrides})
    torch.manual_seed(0)
    net = models.build(name).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=STEPS)
    return TrainStep(
        net,
        optimizer,
        scheduler,
        steps_per_epoch=steps_per_epoch,
        label_smoothing=0.1,
        amp=True,
        device=torch.device(device),
        graphed=graphed,
    )


def batches(n: int, batch_size: int = 16, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, 3, 32, 32, generator=g).to(device, memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (batch_size,), generator=g).to(device)))
    return out


def run(step: TrainStep, data: list) -> None:
    step.net.train()
    step.begin_epoch()
    torch.manual_seed(2)  # the seed net's dropout draws the same masks on both sides
    for x, y in data:
        step(x, y)


def copy_state(source: TrainStep, target: TrainStep) -> None:
    """Put source's weights, buffers and momentum into target, in place."""
    with torch.no_grad():
        for a, b in zip(source.net.state_dict().values(), target.net.state_dict().values(), strict=True):
            b.copy_(a)
        for p_source, p_target in zip(source.params, target.params, strict=True):
            if "momentum_buffer" in source.optimizer.state[p_source]:
                target.optimizer.state[p_target]["momentum_buffer"].copy_(
                    source.optimizer.state[p_source]["momentum_buffer"]
                )


@pytest.mark.parametrize("name", ["seed", "dwres"])
@pytest.mark.parametrize("settings", [{}, {"nesterov": False}, {"momentum": 0.0}, {"weight_decay": 0.0}])
def test_captured_step_function_matches_the_eager_loop_on_the_cpu(name, settings):
    """Step by step over a whole schedule (warm-up, peak, decay) and a last, partial batch: after every step the
    two agree to float32 rounding (the update's last operation rounds differently: one ulp). Then the eager state is
    copied over, so that rounding cannot compound into chaos over many steps."""
    data = batches(STEPS - 1) + [(x[:5], y[:5]) for x, y in batches(1)]
    eager, graphed = make_step(name, False, **settings), make_step(name, True, **settings)
    for step in (eager, graphed):
        step.net.train()
        step.begin_epoch()
    for i, (x, y) in enumerate(data):
        for step in (eager, graphed):
            torch.manual_seed(i)  # the seed net's dropout draws the same masks on both sides
            step(x, y)
        for (key, a), b in zip(eager.net.state_dict().items(), graphed.net.state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"step {i + 1}: {key}")
        for p_eager, p_graphed in zip(eager.params, graphed.params, strict=True):
            buf_eager = eager.optimizer.state[p_eager].get("momentum_buffer")
            if buf_eager is not None:
                torch.testing.assert_close(
                    graphed.optimizer.state[p_graphed]["momentum_buffer"], buf_eager, rtol=1e-5, atol=1e-7
                )
        copy_state(eager, graphed)
    assert eager.scheduler.last_epoch == graphed.scheduler.last_epoch == int(graphed.step_index) == STEPS
    assert eager.scheduler.get_last_lr() == graphed.scheduler.get_last_lr()
    for a, b in zip(eager.sums.means(), graphed.sums.means(), strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    assert int(eager.first_bad) == int(graphed.first_bad) == -1


def test_a_wrong_learning_rate_would_be_seen():
    """The comparison above can fail: the same step with the lr table off by one step differs clearly."""
    data = batches(3)
    eager, graphed = make_step("dwres", False), make_step("dwres", True)
    for step in (eager, graphed):
        step.net.train()
        step.begin_epoch()
    graphed.step_index.fill_(1)
    eager(*data[0])
    graphed(*data[0])
    worst = max(float((a - b).detach().abs().max()) for a, b in zip(eager.params, graphed.params, strict=True))
    assert worst > 1e-4


@pytest.mark.parametrize("graphed", [False, True])
def test_first_non_finite_batch_is_marked_on_the_device(graphed):
    data = batches(6)
    data[3] = (torch.full_like(data[3][0], float("nan")), data[3][1])
    data[5] = (torch.full_like(data[5][0], float("inf")), data[5][1])
    step = make_step("dwres", graphed)
    run(step, data)
    assert int(step.first_bad) == 3  # the first bad batch, not the last
    step.begin_epoch()
    assert int(step.first_bad) == -1 and int(step.batch) == 0 and float(step.sums.count) == 0


def test_lr_table_follows_the_scheduler_after_a_resume():
    """A step built on a restored optimizer and scheduler continues the schedule where it stopped."""
    data = batches(STEPS)
    whole = make_step("dwres", True)
    run(whole, data)
    first = make_step("dwres", True)
    run(first, data[:5])
    resumed = make_step("dwres", True)
    resumed.net.load_state_dict(first.net.state_dict())
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.scheduler.load_state_dict(first.scheduler.state_dict())
    resumed.net.train()
    resumed.begin_epoch()
    # the table now starts at the scheduler's step 5: its first entry is the factor of step 5, the counter at 0
    assert int(resumed.step_index) == 0
    assert float(resumed.lr_factors[0]) == resumed.scheduler.lr_lambdas[0](5)
    torch.manual_seed(3)
    for x, y in data[5:]:
        resumed(x, y)
    torch.testing.assert_close(resumed.net.state_dict(), whole.net.state_dict(), rtol=1e-5, atol=1e-6)


def test_the_schedule_continues_across_epochs():
    """Three epochs of three steps each (begin_epoch refills the lr table from the scheduler's step): the captured
    function ends where the eager loop does, over a schedule that spans the epochs (warm-up in the first, decay
    after)."""
    data = batches(3)
    eager, graphed = make_step("dwres", False), make_step("dwres", True, steps_per_epoch=3)
    for step in (eager, graphed):
        step.net.train()
    for epoch in range(3):
        for step in (eager, graphed):
            step.begin_epoch()
        for i, (x, y) in enumerate(data[: 3 if epoch < 2 else 2]):  # 3 + 3 + 2 = STEPS
            for step in (eager, graphed):
                step(x, y)
            # as in the test above: to float32 rounding after every step, then the eager state copied over
            for (key, a), b in zip(eager.net.state_dict().items(), graphed.net.state_dict().values(), strict=True):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"epoch {epoch}, step {i}: {key}")
            copy_state(eager, graphed)
        assert int(graphed.step_index) == (3 if epoch < 2 else 2)
    assert eager.scheduler.last_epoch == graphed.scheduler.last_epoch == STEPS


def test_the_lr_table_does_not_grow_with_the_run():
    """The table holds one epoch of the schedule, however many epochs the run has: a run of 10**9 steps builds a
    step at once (a table of the whole run would be 8 GB of float64)."""
    cfg = TrainConfig()
    net = models.build("dwres")
    optimizer = make_optimizer(net, cfg)
    step = TrainStep(
        net,
        optimizer,
        make_scheduler(optimizer, cfg, 10**9),
        steps_per_epoch=98,
        label_smoothing=0.0,
        amp=False,
        device=torch.device("cpu"),
        graphed=True,
    )
    assert step.lr_factors.numel() == 99


class _Ops(TorchDispatchMode):
    """Counts the aten operations run inside it (what a CUDA graph would capture, whatever the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


# Operations that read the device back to the host: capture refuses them (and a replay would not redo the read).
# _local_scalar_dense is .item() and what indexing with a 0-d integer tensor calls; the others have data-dependent
# output shapes.
HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")


@pytest.mark.parametrize("name", ["seed", "dwres"])
@pytest.mark.parametrize("settings", [{}, {"momentum": 0.0}])
def test_captured_step_function_never_reads_the_device_nor_rebuilds_optimizer_state(name, settings):
    """What capture needs of the function, checked on the CPU through the operations it runs: no host read (a sync
    that torch.cuda.graph capture fails on), and no new momentum buffers once they exist (each would be a fill
    kernel in every replay)."""
    step = make_step(name, True, **settings)
    step.net.train()
    step.begin_epoch()
    x, y = batches(1)[0]
    step._graph_step(x, y)  # the first step may create the optimizer's state
    with _Ops() as recorded:
        step._graph_step(x, y)
    reads = {op: n for op, n in recorded.ops.items() if op.startswith(HOST_READS)}
    assert not reads, f"the captured step reads the device back: {reads}"
    assert recorded.ops["aten.zeros_like.default"] == 0


def test_capture_is_refused_without_cuda():
    step = make_step("dwres", True)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="needs graphed=True on a CUDA device"):
        step.capture(x, y)
    with pytest.raises(ValueError, match="SGD only"):
        cfg = TrainConfig(optimizer="adamw")
        net = models.build("dwres")
        optimizer = make_optimizer(net, cfg)
        TrainStep(
            net,
            optimizer,
            make_scheduler(optimizer, cfg, 4),
            steps_per_epoch=4,
            label_smoothing=0.0,
            amp=False,
            device=torch.device("cpu"),
            graphed=True,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replayed_graph_matches_the_eager_step_on_the_gpu():
    data = batches(STEPS - 1, 64, "cuda") + [(x[:20], y[:20]) for x, y in batches(1, 64, "cuda")]
    eager, graphed = make_step("dwres", False, "cuda"), make_step("dwres", True, "cuda")
    before = {k: v.clone() for k, v in graphed.net.state_dict().items()}
    graphed.capture(*data[0])
    for key, value in graphed.net.state_dict().items():  # the capture's own warm-up steps were undone
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    run(eager, data)
    run(graphed, data)
    assert len(graphed.graphs) == 1  # the partial batch ran eagerly
    for key, value in eager.net.state_dict().items():
        if value.is_floating_point():  # bf16 autocast: the two sides round differently
            torch.testing.assert_close(graphed.net.state_dict()[key], value, rtol=2e-2, atol=2e-3, msg=key)
    assert graphed.sums.means()[0] == pytest.approx(eager.sums.means()[0], rel=2e-2)
