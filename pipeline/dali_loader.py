"""The DALI loader: the AugSpec's augmentation units (pipeline/augs/) and normalize, from the same spec, on the GPU.

Two graphs share one parameter design (pipeline.params) and one box-blend+normalize function, and compose the units
by the kind of their effect (pipeline/augs/unit.py), so neither names an augmentation: every `Warp` folded into one
sampling matrix per image, a `Shift` (pad-and-crop) clamping the whole-pixel grid before it, each `Box` (cutout) a
mask blended with its fill. `GraphLayout` is what a spec's units put into a graph.

* GPU (`batched_pipeline`): one DALI *sample* is a whole batch, N images stacked into one tall (N*32, 32, 3)
  image. DALI's cost is per sample and per operator, not per pixel, for 32x32 images, so a batch of one sample
  costs the same few operator launches at any N. Sampling maps for all N images are built with broadcasting
  arithmetic, clamped inside each image's own tile (that is the replicate border), and one `experimental.remap`
  resamples everything. Boxes are mask blends; normalize is arithmetic. The training set stays resident on the GPU.
* CPU (`per_image_pipeline`): `experimental.remap` has no CPU implementation, so on a machine without a GPU each
  sample is one image and `warp_affine` takes its matrix (a second, whole-pixel one for a Shift). Same matrices,
  same box and normalize code.

Both emit NHWC float32; viewed as NCHW that is exactly torch's channels_last memory, so no transpose is ever made.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.augs import units_of
from pipeline.augs.unit import Box, Shift
from pipeline.order import Order, batch_sizes, epoch_batches, num_batches, shard_size
from pipeline.params import AugParams, draw_params, epoch_generator, grid_shifts, hole_boxes, sampling_matrices
from pipeline.spec import AugSpec

# Batches handed to DALI ahead of the training loop. Two keeps DALI busy while the model trains on the current one.
# (DALI's own prefetch_queue_depth stays 1: its first schedule_run() would otherwise run that many iterations at once,
# and with fed inputs it is simpler to schedule exactly one iteration per fed batch; the dynamic executor queues them.)
LOOKAHEAD = 2
# Images stacked into one tall DALI sample. Row coordinates in the tall image are float32: at 256 images (8,192
# rows) their resolution is 1/1024 px; a whole 2,048-image batch in one sample (65,536 rows) would leave 1/128 px
# and visibly shift the bilinear weights. A batch is split into samples of this many images.
IMAGES_PER_SAMPLE = 256

_warned_cpu_mode = False


class DaliUnavailable(RuntimeError):
    """DALI cannot be imported on this machine."""


def require_dali():  # -> the nvidia.dali module
    try:
        import nvidia.dali as dali
    except ImportError as err:
        raise DaliUnavailable(
            "NVIDIA DALI is not installed (import nvidia.dali failed: "
            f"{err}). Install it with `pip install nvidia-dali-cuda130` (CUDA 13 drivers) or "
            "`pip install nvidia-dali-cuda120` (CUDA 12), on Linux x86-64 or aarch64; or use --loader cpu."
        ) from None
    return dali


def _graphs():  # built on first use: importing DALI is slow and optional
    require_dali()
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    def grid(height: int, width: int, device: str) -> tuple:
        """Output pixel coordinates as broadcastable constants: gy is (H, 1), gx is (1, W). They are made on the
        graph's device: a CPU constant in a GPU expression would be copied to the GPU every iteration."""
        gy = types.Constant(np.arange(height, dtype=np.float32).reshape(height, 1), device=device)
        gx = types.Constant(np.arange(width, dtype=np.float32).reshape(1, width), device=device)
        return gy, gx

    def normalize(pixels, spec: AugSpec, device: str):
        """(x / 255 - mean) / std per channel, as one multiply-add; float32 out."""
        scale = np.float32([1 / (255 * s) for s in spec.std]).reshape(1, 1, 3)
        shift = np.float32([m / s for m, s in zip(spec.mean, spec.std, strict=True)]).reshape(1, 1, 3)
        return pixels * types.Constant(scale, device=device) - types.Constant(shift, device=device)

    def boxes_then_normalize(pixels, holes, gy, gx, layout: GraphLayout, spec: AugSpec, width: int, device: str):
        """Write each Box unit's fill into its box (the cutout hole), then normalize.

        `holes` holds 4 rows [y0, x0, y1, x1) per Box unit, shaped so each broadcasts against the (H, W) grid:
        (1, 1) per image in the per-image graph, (N, 1, 1) for N images in the batched one; an empty box means the
        unit is not applied to that image.
        """
        for k, fill in enumerate(layout.fills):
            y0, x0, y1, x1 = (holes[4 * k + i] for i in range(4))
            inside = (gy >= y0) & (gy < y1) & (gx >= x0) & (gx < x1)
            inside = fn.reshape(inside, shape=[-1, width, 1])  # rows of all images, then a channel axis to broadcast
            # bool and uint8 promote to int32 here: exact, and no uint8 wrap-around
            pixels = pixels * (1 - inside) + inside * fill
        return normalize(pixels, spec, device)

    def dali_remap(images, src_x, src_y):
        return fn.experimental.remap(
            images,
            src_x,
            src_y,
            pixel_origin="center",  # OpenCV's convention, the one albumentations (and pipeline.params) use
            interp=types.INTERP_LINEAR,
        )

    @pipeline_def
    def batched_pipeline(spec: AugSpec, height: int, width: int, augment: bool, device: str = "gpu", remap=dali_remap):
        """GPU graph. Inputs per iteration, per DALI sample of N <= IMAGES_PER_SAMPLE images:
        images (N*H, W, 3) uint8; warp (layout.warp_rows, N, 1, 1): the sampling matrix rows a..f, the Shift unit's
        (x, y) offsets if the spec has one, and each image's first row in the tall image; holes (4 per Box unit, N,
        1, 1). (`device`/`remap` exist so that CI can run this graph on the CPU with OpenCV standing in for the
        GPU-only remap.)"""
        images = fn.external_source(name="images", device=device, layout="HWC")
        if not augment:
            return normalize(images, spec, device)
        layout = graph_layout(spec)
        warp = fn.external_source(name="warp", device=device)
        holes = fn.external_source(name="holes", device=device) if layout.fills else None
        gy, gx = grid(height, width, device)
        # Where each output pixel reads the warped image: shifted and clamped first if a Shift unit follows the warp
        # (its own replicate border; (N, 1, W) and (N, H, 1), still separable), then through the matrix.
        px, py = gx, gy
        if layout.shifts:
            px = dmath.clamp(gx + warp[6], 0.0, width - 1.0)
            py = dmath.clamp(gy + warp[7], 0.0, height - 1.0)
        # Source position of every output pixel (pixel centres), clamped to its own image: the replicate border.
        src_x = dmath.clamp(warp[0] * px + warp[1] * py + warp[2], 0.0, width - 1.0)
        src_y = dmath.clamp(warp[3] * px + warp[4] * py + warp[5], 0.0, height - 1.0) + warp[layout.warp_rows - 1]
        warped = remap(
            images, fn.reshape(src_x, shape=[-1, width], layout="HW"), fn.reshape(src_y, shape=[-1, width], layout="HW")
        )
        return boxes_then_normalize(warped, holes, gy, gx, layout, spec, width, device)

    @pipeline_def
    def per_image_pipeline(spec: AugSpec, height: int, width: int, augment: bool):
        """CPU graph. Inputs per iteration, one DALI sample per image, matrices in DALI's pixel-corner convention:
        images (H, W, 3) uint8; warp (2, 3); shift (2, 3), a whole-pixel translation, if the spec has a Shift unit;
        holes (4 per Box unit, 1, 1)."""
        images = fn.external_source(name="images", layout="HWC")
        if not augment:
            return normalize(images, spec, "cpu")
        layout = graph_layout(spec)
        # No fill_value: DALI clamps at the border, which is the replicate border.
        warp = fn.external_source(name="warp")
        warped = fn.warp_affine(images, warp, inverse_map=True, interp_type=types.INTERP_LINEAR)
        if layout.shifts:
            # A second warp, because the shift clamps at its own border (see pipeline.augs.unit.Shift); with whole
            # pixels, nearest-neighbour sampling is an exact copy.
            shift = fn.external_source(name="shift")
            warped = fn.warp_affine(warped, shift, inverse_map=True, interp_type=types.INTERP_NN)
        holes = fn.external_source(name="holes") if layout.fills else None
        gy, gx = grid(height, width, "cpu")
        return boxes_then_normalize(warped, holes, gy, gx, layout, spec, width, "cpu")

    return batched_pipeline, per_image_pipeline


@dataclass(frozen=True)
class GraphLayout:
    """What the DALI graphs hold for a spec, derived from its units (pipeline/augs/): the composed warp always,
    a Shift unit's offsets if there is one, and each Box unit's fill."""

    shifts: int  # Shift units (0 or 1)
    fills: tuple[int, ...]  # the uint8 fill of each Box unit, in order

    @property
    def warp_rows(self) -> int:
        """Rows of the batched graph's warp input: matrix (6), offsets (2 per Shift), first row in the tall image."""
        return 6 + 2 * self.shifts + 1


def graph_layout(spec: AugSpec) -> GraphLayout:
    units = units_of(spec)
    return GraphLayout(
        shifts=sum(isinstance(unit.effect, Shift) for unit in units),
        fills=tuple(unit.effect.fill(spec) for unit in units if isinstance(unit.effect, Box)),
    )


def _to_dali_corner_convention(matrices: torch.Tensor) -> torch.Tensor:
    """OpenCV puts pixel centres at integers, DALI's warp at integer + 0.5: M_dali = T(+0.5) M T(-0.5)."""
    m = matrices.clone()
    m[:, :, 2] += 0.5 - 0.5 * (matrices[:, :, 0] + matrices[:, :, 1])
    return m


class DaliLoader:
    """Yields (x, y) like the CPU loader: x float32 [B,3,H,W] channels_last, normalized; y int64 [B]; on `device`.

    Each pass is one epoch (the epoch number advances by itself; `set_epoch` jumps), reshuffled from seed + epoch,
    this rank's shard only, in the batches `order` gives (pipeline.order, as the CPU loader). Augmentation parameters
    come from a generator seeded by (seed, epoch, rank), so an epoch is reproducible on its own, e.g. after resuming.
    Satisfies pipeline.Loader.

    `graph` picks the DALI graph: "batched" (the GPU design; the default on CUDA) or "per_image" (the default on
    the CPU). `remap` replaces the batched graph's resampling operator; tests use it to run that graph on the CPU.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        spec: AugSpec,
        train: bool,
        order: Order,
        device: str | torch.device,
        workers: int | None,
        graph: str | None = None,
        remap=None,
    ):
        if train:
            spec.check_image_size(*images.shape[1:3])
        batched_pipeline, per_image_pipeline = _graphs()
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.graph = graph or ("batched" if on_gpu else "per_image")
        self.spec, self.train, self.order, self.batch_size = spec, train, order, batch_size
        self.n = len(images)
        self.height, self.width = images.shape[1:3]
        self.num_samples = shard_size(self.n, order)
        # The pipelines' batch limit: batch_size (run_fixed's limit too), or one more where this rank's last batch
        # takes its shard's odd image (pipeline.order).
        largest = max([batch_size, *batch_sizes(self.n, batch_size, order)])
        self.layout = graph_layout(spec)
        self.epoch = 0
        # On the GPU the whole split is resident (150 MB for CIFAR-10's training set): no host-to-device copy per
        # batch, and the batch is gathered by index on the device.
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        if not on_gpu and order.rank == 0:
            _say_cpu_mode_once()
        options = dict(
            num_threads=workers or min(4, os.cpu_count() or 1),
            prefetch_queue_depth=1,
            seed=order.seed,
            device_id=(self.device.index or 0) if on_gpu else None,
        )
        if self.graph == "batched":
            extra = {"remap": remap} if remap is not None else {}
            self.pipe = batched_pipeline(
                spec,
                self.height,
                self.width,
                train,
                "gpu" if on_gpu else "cpu",
                **extra,
                batch_size=-(-largest // IMAGES_PER_SAMPLE),
                **options,
            )
        elif self.graph == "per_image":
            if on_gpu:
                raise ValueError("the per_image graph is DALI's CPU fallback; on CUDA use the batched graph")
            self.pipe = per_image_pipeline(spec, self.height, self.width, train, batch_size=largest, **options)
        else:
            raise ValueError(f"unknown DALI graph {graph!r}; choose batched or per_image")
        self.pipe.build()
        self._in_flight: deque = deque()  # DALI outputs whose asynchronous copy to torch may still be running

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, self.order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        chosen = epoch_batches(self.n, self.batch_size, epoch, self.order)
        index = torch.from_numpy(np.concatenate(chosen) if chosen else np.zeros(0, np.int64)).to(self.device)
        # Everything random about the epoch is drawn and turned into DALI's inputs here, in a few dozen kernels for
        # the whole epoch: per batch the host then only slices, which keeps the loader's host time off the
        # training loop's (on a launch-bound GPU host every kernel launch counts).
        params = (
            draw_params(
                self.spec,
                len(index),
                self.height,
                self.width,
                epoch_generator(self.order.seed, epoch, self.order.rank, self.device),
                self.device,
            )
            if self.train
            else None
        )
        batches = self._batches(index, self.labels[index], params, [len(b) for b in chosen])
        labels: deque[torch.Tensor] = deque()
        try:
            for batch in batches[:LOOKAHEAD]:
                labels.append(self._submit(*batch))
            for b in range(len(batches)):
                x = self._collect()
                y = labels.popleft()
                if b + LOOKAHEAD < len(batches):
                    labels.append(self._submit(*batches[b + LOOKAHEAD]))
                yield x, y
        finally:  # a consumer that stops early must not leave batches queued for the next epoch
            if self.pipe is not None and getattr(self.pipe, "_pipe", None) is not None:  # (None at interpreter exit)
                for _ in labels:
                    self.pipe.outputs()

    def run_fixed(self, images: np.ndarray, params: AugParams) -> torch.Tensor:
        """Augment `images` (uint8 [N, H, W, 3], N <= batch_size) with explicit parameters (the parity tests' seam);
        returns float32 [N, 3, H, W] channels_last, normalized."""
        saved = self.images
        self.images = torch.from_numpy(images).to(self.device)
        try:
            index = torch.arange(len(images), device=self.device)
            ((_, _, inputs),) = self._batches(index, torch.zeros_like(index), params, [len(images)])
            self._feed(index, inputs)
            self.pipe.schedule_run()
            return self._collect()
        finally:
            self.images = saved

    def _batches(
        self, order: torch.Tensor, labels: torch.Tensor, params: AugParams | None, sizes: list[int]
    ) -> list[tuple]:
        """(image indices, labels, DALI inputs by name) per batch of `sizes` images, cut from the epoch's `order`;
        the inputs are views into tensors made once."""
        h, w, n = self.height, self.width, len(order)
        ends = np.cumsum(sizes).tolist()
        spans = list(zip([0, *ends[:-1]], ends, strict=True))
        if not self.train:
            return [(order[a:b], labels[a:b], {}) for a, b in spans]
        params = params.for_units(units_of(self.spec), self.device)
        matrices, shifts, holes = sampling_matrices(params, h, w), grid_shifts(params), hole_boxes(params)
        if self.graph == "per_image":
            inputs = {"warp": _to_dali_corner_convention(matrices)}
            if self.layout.shifts:
                translation = torch.eye(2, 3, device=self.device).repeat(n, 1, 1)
                translation[:, :, 2] = shifts
                inputs["shift"] = _to_dali_corner_convention(translation)
            if self.layout.fills:
                inputs["holes"] = holes.view(n, -1, 1, 1)
            return [(order[a:b], labels[a:b], {k: v[a:b] for k, v in inputs.items()}) for a, b in spans]
        # batched graph, per DALI sample: warp (layout.warp_rows, N, 1, 1) = matrix rows a..f, the shift offsets, each
        # image's first row in the tall image; holes (4 per Box unit, N, 1, 1). Made contiguous per sample once, here.
        within = np.concatenate([np.arange(size) for size in sizes]) if sizes else np.zeros(0, np.int64)
        position = torch.from_numpy(within % IMAGES_PER_SAMPLE).to(self.device)
        rows = {"warp": torch.cat([matrices.view(n, 6), shifts, (position * h).float()[:, None]], 1)}
        if self.layout.fills:
            rows["holes"] = holes
        batches = []
        for a, b in spans:
            chunks = [(c, min(c + IMAGES_PER_SAMPLE, b)) for c in range(a, b, IMAGES_PER_SAMPLE)]
            inputs = {k: [v[c:d].T.reshape(v.shape[1], -1, 1, 1) for c, d in chunks] for k, v in rows.items()}
            batches.append((order[a:b], labels[a:b], inputs))
        return batches

    def _submit(self, index: torch.Tensor, labels: torch.Tensor, inputs: dict) -> torch.Tensor:
        self._feed(index, inputs)
        self.pipe.schedule_run()
        return labels

    def _feed(self, index: torch.Tensor, inputs: dict) -> None:
        images = self.images[index]
        if self.graph == "batched":
            per_sample = [
                images[c : c + IMAGES_PER_SAMPLE].view(-1, self.width, 3)
                for c in range(0, len(index), IMAGES_PER_SAMPLE)
            ]
            self._feed_input("images", per_sample, layout="HWC")
        else:
            self._feed_input("images", images, layout="HWC")
        for name, tensor in inputs.items():
            self._feed_input(name, tensor)

    def _feed_input(self, name: str, tensor: torch.Tensor | list[torch.Tensor], layout: str | None = None) -> None:
        """A tensor is a batch (first axis = samples); a list holds one tensor per sample."""
        if isinstance(tensor, list):
            samples = [t.contiguous() for t in tensor]
            if samples[0].is_cuda:
                self.pipe.feed_input(name, samples, layout=layout, cuda_stream=torch.cuda.current_stream(self.device))
            else:
                self.pipe.feed_input(name, [t.numpy() for t in samples], layout=layout)
            return
        tensor = tensor.contiguous()
        if tensor.is_cuda:
            # DALI copies on torch's stream, so the copy is ordered after the kernels that produced the tensor.
            self.pipe.feed_input(name, tensor, layout=layout, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            self.pipe.feed_input(name, tensor.numpy(), layout=layout)

    def _collect(self) -> torch.Tensor:
        (out,) = self.pipe.outputs()
        if self.graph == "batched":
            tall = [out[i] for i in range(len(out))]
            rows = [t.shape()[0] for t in tall]
            x = torch.empty((sum(rows), self.width, 3), dtype=torch.float32, device=self.device)
            if self.device.type == "cuda":
                self._copy_on_torch_stream(out, tall, torch.split(x, rows))
            else:
                for t, part in zip(tall, torch.split(x, rows), strict=True):
                    part.copy_(torch.from_numpy(np.asarray(t)))
            x = x.view(-1, self.height, self.width, 3)
        else:
            x = torch.from_numpy(np.array(out.as_array()))
        return x.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: channels_last

    def _copy_on_torch_stream(self, out, samples: list, parts: tuple[torch.Tensor, ...]) -> None:
        """Copy DALI's output into torch memory asynchronously, on torch's stream: the model's kernels queue behind
        the copy and the host never waits for the GPU. DALI's buffer must outlive the copy, so it is kept (with an
        event marking the copy's end) until LOOKAHEAD later batches have been collected."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device)
        for t, part in zip(samples, parts, strict=True):
            feed_ndarray(t, part, cuda_stream=stream)
        copied = torch.cuda.Event()
        copied.record(stream)
        self._in_flight.append((out, copied))
        while len(self._in_flight) > LOOKAHEAD:
            _, event = self._in_flight.popleft()
            event.synchronize()  # long done in practice: LOOKAHEAD training steps have been queued since


def _say_cpu_mode_once() -> None:
    global _warned_cpu_mode
    if not _warned_cpu_mode:
        _warned_cpu_mode = True
        print("DALI: no GPU in use, running DALI's CPU operators (expect CPU-loader speeds, not GPU ones).", flush=True)
