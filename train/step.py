"""The training step: forward, loss, backward and optimizer update, eager or replayed as one CUDA graph.

Why a graph: the networks here are small, so on a fast GPU the eager step is bound by the host launching its few
hundred kernels (an H200 took 3.3-3.7 ms a step for the seed net at batch 128 and 512 alike, bench/results/
nvidia-h200-20261126.json), not by the arithmetic. A CUDA graph replays all of them with one launch.

How (PyTorch's "whole-network capture", docs/source/notes/cuda.rst, CUDA Graphs): the step reads its batch from
static input buffers, and everything that changes between steps lives in device tensors the graph reads and writes
in place: the learning rate (looked up in a per-step table with a step counter that the graph advances), the running
loss/accuracy sums and the first non-finite batch. Nothing in the step syncs with the host.

`torch.compile(mode="reduce-overhead")` would capture the same step, but compiling forward, backward and update
takes tens of seconds, more than a whole fast-recipe run is allowed (25 s wall); `torch.cuda.graph` capture costs a
few warm-up steps.

torch.optim.SGD cannot be captured with a changing learning rate: it applies the lr as a host number
(`_foreach_add_(params, grads, alpha=-lr)`; a tensor lr there is read back with .item(), a sync that capture
forbids), so the graph would freeze the lr of the step it captured. `sgd_update_` below is the same update written
with the lr as a device tensor; tests/test_step.py holds it to torch.optim.SGD + LambdaLR step for step.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Eager iterations before capture, on the capture stream (PyTorch's docs use 3): they let cuDNN choose its
# algorithms and autograd create its buffers, none of which may happen during capture.
CAPTURE_WARMUP_STEPS = 3


@dataclass
class Sums:
    """Loss, correct and count summed on the device, read back rarely (each read is a host-device sync)."""

    loss: torch.Tensor  # float64 scalar: sum over images of the per-batch mean loss times the batch size
    correct: torch.Tensor  # float64 scalar: images whose arg-max logit is the label
    count: torch.Tensor  # float64 scalar: images seen

    @classmethod
    def zeros(cls, device: torch.device) -> Sums:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch in place (graph-safe: no new tensors are bound, no sync)."""
        n = y.numel()
        self.loss.add_(loss.detach().double() * n)
        self.correct.add_((logits.detach().argmax(1) == y).sum())
        self.count.add_(n)

    def reset(self) -> None:
        for t in (self.loss, self.correct, self.count):
            t.zero_()

    def all_reduce(self) -> None:
        """Sum over torchrun ranks (in place)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            packed = torch.stack([self.loss, self.correct, self.count])
            torch.distributed.all_reduce(packed)
            for t, total in zip((self.loss, self.correct, self.count), packed.unbind(), strict=True):
                t.copy_(total)

    def means(self) -> tuple[float, float, int]:
        """(mean loss, accuracy as a fraction, images): one host read of the three sums."""
        loss, correct, count = torch.stack([self.loss, self.correct, self.count]).tolist()
        return loss / max(count, 1), correct / max(count, 1), int(count)


def autocast(device: torch.device, amp: bool, *, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when `amp`, else nothing. `cache=False` inside CUDA-graph capture (PyTorch's docs:
    autocast's weight-cast cache must be off while capturing)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def sgd_update_(optimizer: torch.optim.SGD, grads: list[torch.Tensor], lr_factor: torch.Tensor) -> None:
    """torch.optim.SGD's update (dampening 0, not maximize) with the learning rate given as a device tensor:
    for every parameter group, d = g + wd * p; buf = momentum * buf + d; d = d + momentum * buf (Nesterov) or
    d = buf; p -= lr * d, with lr = group["initial_lr"] * lr_factor (what LambdaLR sets). `grads` follows the order
    of the groups' parameters. The momentum buffers are the optimizer's own `state[p]["momentum_buffer"]`, so
    checkpoints and resume are unchanged; a missing buffer starts at zero, which gives exactly SGD's first step
    (buf = d). Raises ValueError for settings this update does not implement."""
    start = 0
    for group in optimizer.param_groups:
        if group.get("dampening", 0) or group.get("maximize", False):
            raise ValueError("the captured SGD step implements dampening 0 and maximize=False only")
        params = group["params"]
        g = list(grads[start : start + len(params)])
        start += len(params)
        if group["weight_decay"]:
            g = torch._foreach_add(g, params, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum:
            bufs = [_momentum_buffer(optimizer, p) for p in params]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, g)
            g = torch._foreach_add(g, bufs, alpha=momentum) if group["nesterov"] else bufs
        # the lr in float64 then rounded once to float32, as SGD's python-float lr is rounded to the parameters'
        # type where it is applied
        lr = (lr_factor * -group["initial_lr"]).to(params[0].dtype)
        torch._foreach_add_(params, torch._foreach_mul(g, lr))


def _momentum_buffer(optimizer: torch.optim.SGD, p: torch.Tensor) -> torch.Tensor:
    """`p`'s momentum buffer, made (zeros) only if it does not exist yet. Not dict.setdefault: its default would be
    built on every call, and inside a captured graph every replay would run one fill kernel per parameter."""
    state = optimizer.state[p]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p)
    return state["momentum_buffer"]


class TrainStep:
    """One optimizer step per call on a batch (x float [B,3,H,W], y int64 [B]), with running sums on the device.

    eager (`graphed=False`): today's loop, unchanged: zero_grad, forward, cross-entropy, backward,
    `optimizer.step()`, `scheduler.step()`, then `after_step` (the weight EMA).
    graphed: forward, loss, `torch.autograd.grad`, `sgd_update_` with the lr read from a device table of the
    epoch's stretch of the schedule (`steps_per_epoch` + 1 entries, refilled by `begin_epoch`), the sums and the
    non-finite check, captured per input shape by `capture` and replayed; batches of a shape that was not captured
    (the last, partial batch) run the same function eagerly. The scheduler still steps
    on the host (bookkeeping only: what checkpoints and `get_last_lr` read). Needs SGD and a CUDA device.

    Either way `first_bad` holds the epoch's first batch whose loss was not finite (-1 if none) and `sums` the
    epoch's loss/accuracy sums; `begin_epoch` resets both. Nothing here reads the device.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        *,
        steps_per_epoch: int,
        label_smoothing: float,
        amp: bool,
        device: torch.device,
        graphed: bool,
        after_step: Callable[[], None] | None = None,
    ):
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler
        self.label_smoothing, self.amp, self.device, self.graphed = label_smoothing, amp, device, graphed
        self.after_step = after_step
        self.sums = Sums.zeros(device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.batch = torch.zeros((), dtype=torch.long, device=device)  # index of the next batch in the epoch
        self.step_index = torch.zeros((), dtype=torch.long, device=device)  # optimizer steps into this epoch
        # This epoch's stretch of the schedule as a table the graph indexes: the scheduler's own lambda, so there is
        # one schedule. One epoch, not the whole run: its size must not grow with --epochs (a table of every step
        # of 10**6 epochs would be gigabytes); begin_epoch refills it in place (the graph holds its address). One
        # entry more than an epoch has steps, and a clamped index, so the counter can never read outside it.
        self.lr_factors = torch.zeros(steps_per_epoch + 1, dtype=torch.float64, device=device)
        self._load_lr_window()
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        if graphed and not isinstance(optimizer, torch.optim.SGD):
            raise ValueError("the captured training step implements SGD only")

    def begin_epoch(self) -> None:
        """Zero the sums and the batch counter, forget the non-finite marker, load the lr table with the schedule
        from the scheduler's step on (after a resume too) and point the step counter at its start. One host-to-device
        copy of (steps_per_epoch + 1) float64 values, at the epoch boundary only."""
        self.sums.reset()
        self.first_bad.fill_(-1)
        self.batch.zero_()
        self._load_lr_window()
        self.step_index.zero_()

    def _load_lr_window(self) -> None:
        start = self.scheduler.last_epoch  # LambdaLR's count of steps taken
        factors = [self.scheduler.lr_lambdas[0](start + i) for i in range(len(self.lr_factors))]
        self.lr_factors.copy_(torch.tensor(factors, dtype=torch.float64))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.graphed:
            self._eager_step(x, y)
            return
        captured = self.graphs.get(_signature(x, y))
        if captured is None:
            self._graph_step(x, y)
        else:
            graph, static_x, static_y = captured
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
        if self.scheduler._step_count == 1:
            # LambdaLR warns that optimizer.step() was not called: the update above is the optimizer's step
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected call of", UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        if self.after_step is not None:
            self.after_step()

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(self.device, self.amp):
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.after_step is not None:
            self.after_step()
        self._count(loss, logits, y)

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The function that is captured (and run eagerly for uncaptured shapes). Gradients come from
        torch.autograd.grad, not .grad attributes, so replays and eager calls never depend on what .grad holds."""
        with autocast(self.device, self.amp, cache=False):
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            # index_select, not lr_factors[step_index]: indexing with a 0-d integer tensor reads the index back to
            # the host (.item(), a sync that CUDA-graph capture refuses, and that would freeze the index anyway)
            index = self.step_index.clamp(max=len(self.lr_factors) - 1).view(1)
            lr_factor = self.lr_factors.index_select(0, index).squeeze(0)
            sgd_update_(self.optimizer, list(grads), lr_factor)
            self.step_index.add_(1)
            self._count(loss, logits, y)

    def _count(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.sums.add(loss, logits, y)
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.batch, self.first_bad))
        self.batch.add_(1)

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Capture the step for batches shaped like (x, y). Runs CAPTURE_WARMUP_STEPS real steps first and then
        puts back everything they changed (weights, BatchNorm statistics, momentum, counters, sums), in place:
        the graph holds the addresses of these tensors. The random state is the caller's to keep (warm_up does)."""
        if not self.graphed or self.device.type != "cuda":
            raise ValueError("capture needs graphed=True on a CUDA device")
        static_x, static_y = x.clone(memory_format=_layout(x)), y.clone()
        for group in self.optimizer.param_groups:  # the momentum buffers must exist, at fixed addresses, before capture
            if group["momentum"]:
                for p in group["params"]:
                    _momentum_buffer(self.optimizer, p)
        saved = _snapshot(self)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(CAPTURE_WARMUP_STEPS):
                self._graph_step(static_x, static_y)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's own threads may call the CUDA API (allocations, syncs) while this thread captures;
        # under the default "global" mode such a call would abort the capture.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            self._graph_step(static_x, static_y)
        torch.cuda.synchronize(self.device)
        _restore(self, saved)
        self.graphs[_signature(x, y)] = (graph, static_x, static_y)


def _signature(x: torch.Tensor, y: torch.Tensor) -> tuple:
    return tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype


def _layout(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def _state_tensors(step: TrainStep) -> list[torch.Tensor]:
    """Every tensor a training step changes in place."""
    tensors = list(step.net.state_dict().values())  # parameters and buffers (BatchNorm statistics, counters)
    tensors += [s["momentum_buffer"] for s in step.optimizer.state.values() if "momentum_buffer" in s]
    tensors += [step.sums.loss, step.sums.correct, step.sums.count, step.first_bad, step.batch, step.step_index]
    return tensors


def _snapshot(step: TrainStep) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _state_tensors(step)]


def _restore(step: TrainStep, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, value in zip(_state_tensors(step), saved, strict=True):
            t.copy_(value)
