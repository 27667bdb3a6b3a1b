"""The DALI loader: the AugSpec's units (pipeline/augs/) and normalize, from the same spec, on the GPU.

Two graphs compose the units by their kind, so neither names an augmentation: every `Warp` folded into one sampling
matrix per image, a `Shift` clamping the whole-pixel grid before it, each `Box` a mask blended with its fill.

* GPU (`batched_pipeline`): one DALI sample is N images stacked into one tall (N*32, 32, 3) image. DALI's cost is
  per sample and per operator, not per pixel, so a sample costs the same few operator launches at any N. Sampling
  maps are built with broadcasting arithmetic, clamped inside each image's tile (the replicate border), and one
  `experimental.remap` resamples everything. The training set stays resident on the GPU.
* CPU (`per_image_pipeline`): `experimental.remap` has no CPU implementation, so each sample is one image and
  `warp_affine` takes its matrix. Same matrices, same box and normalize code.

Both emit NHWC float32, which viewed as NCHW is torch's channels_last memory: no transpose is made.

One DALI iteration augments a *chunk* of whole training batches into fresh device memory, one chunk ahead of the
training loop (at an epoch's end, the next epoch's first chunk); batches are slices of it. Per batch the loader
calls no DALI function and runs no torch kernel (`python -m bench.host_ops` counts both).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.augs import Box, Shift
from pipeline.errors import DaliUnavailable
from pipeline.order import Order, batch_sizes, epoch_batches, num_batches, shard_size
from pipeline.params import AugParams, draw_params, epoch_generator, grid_shifts, hole_boxes, sampling_matrices
from pipeline.spec import AugSpec

# Images per chunk on the GPU. DALI costs a fixed ~2-3 ms of host time per iteration (measured on an H200 host): paid
# per batch it capped the loader at 59k/179k/605k img/s at batch 128/512/2048; over 8,192 images it is ~0.3 us per
# image, while a chunk's output stays small (8,192 x 3x32x32 float32 = 100.7 MB). A chunk holds as many whole
# batches as fit, at least one.
CHUNK_IMAGES = 8192
# Images per chunk on the CPU, where a chunk that outgrows the caches costs more than the iterations it saves
# (2-core machine, batch 512: 70 us of CPU time per image with a chunk per batch, 54 us at 4,096, 63 us at 8,192).
CPU_CHUNK_IMAGES = 4096
# Chunks queued in DALI ahead of the one the loop trains on: one keeps DALI busy as long as it augments faster than
# the model trains (the loader-alone target, >= 1.5M img/s, is five times the model's ~300k img/s).
CHUNKS_AHEAD = 1
# Images per tall DALI sample. Its row coordinates are float32: at 256 images (8,192 rows) they resolve 1/1024 px,
# at 2,048 images 1/128 px, which visibly shifts the bilinear weights. Batches are cut into samples from their own
# start, so an image's coordinates, to the last bit, do not depend on the chunk size.
IMAGES_PER_SAMPLE = 256

_warned_cpu_mode = False


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
        scale, shift = (np.array(v, np.float32).reshape(1, 1, 3) for v in spec.pixel_scale_shift())
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
            interp=types.DALIInterpType.INTERP_LINEAR,
        )

    @pipeline_def
    def batched_pipeline(spec: AugSpec, height: int, width: int, augment: bool, device: str = "gpu", remap=dali_remap):
        """GPU graph. Inputs per DALI sample of N <= IMAGES_PER_SAMPLE images: images (N*H, W, 3) uint8; warp
        (layout.warp_rows, N, 1, 1): the matrix rows a..f, the Shift unit's (x, y) offsets if any, each image's first
        row in the tall image; holes (4 per Box unit, N, 1, 1). `device`/`remap` let CI run it on the CPU."""
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
        holes (Box units, 4)."""
        images = fn.external_source(name="images", layout="HWC")
        if not augment:
            return normalize(images, spec, "cpu")
        layout = graph_layout(spec)
        # No fill_value: DALI clamps at the border, which is the replicate border.
        warp = fn.external_source(name="warp")
        warped = fn.warp_affine(images, warp, inverse_map=True, interp_type=types.DALIInterpType.INTERP_LINEAR)
        if layout.shifts:
            # A second warp, because the shift clamps at its own border (see pipeline.augs.unit.Shift); with whole
            # pixels, nearest-neighbour sampling is an exact copy.
            shift = fn.external_source(name="shift")
            warped = fn.warp_affine(warped, shift, inverse_map=True, interp_type=types.DALIInterpType.INTERP_NN)
        if layout.fills:
            # fn.erase, not the batched graph's mask blend: the same pixels, but erase writes only the box (55k img/s
            # against the blend's 32k on the 2-core machine); an empty box erases nothing.
            holes = fn.external_source(name="holes")  # per image: (Box units, 4) [y0, x0, y1, x1)
            for k, fill in enumerate(layout.fills):
                box = holes[k]
                warped = fn.erase(warped, anchor=box[0:2], shape=box[2:4] - box[0:2], axis_names="HW", fill_value=fill)
        return normalize(warped, spec, "cpu")

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
    return GraphLayout(
        shifts=sum(isinstance(unit, Shift) for unit in spec.included),
        fills=tuple(unit.fill_uint8 for unit in spec.included if isinstance(unit, Box)),
    )


def _to_dali_corner_convention(matrices: torch.Tensor) -> torch.Tensor:
    """OpenCV puts pixel centres at integers, DALI's warp at integer + 0.5: M_dali = T(+0.5) M T(-0.5)."""
    m = matrices.clone()
    m[:, :, 2] += 0.5 - 0.5 * (matrices[:, :, 0] + matrices[:, :, 1])
    return m


@dataclass(frozen=True)
class _Chunk:
    """One DALI iteration: a run of whole training batches of the epoch, and what DALI is fed for it."""

    start: int  # position of its first image in the epoch's order
    index: torch.Tensor  # (n,) int64: dataset indices of its images, in order, on the loader's device
    spans: list[tuple[int, int]]  # [start, end) of each of its training batches in the epoch's order
    samples: list[int]  # batched graph: images in each DALI sample (each batch cut into IMAGES_PER_SAMPLE pieces)
    inputs: dict  # the other DALI inputs by name: a tensor (first axis = samples) or a list (one per sample)


@dataclass
class _Epoch:
    """One epoch's chunks with their DALI inputs, and its labels in order; the first `fed` chunks are fed to DALI."""

    number: int
    chunks: list[_Chunk]
    labels: torch.Tensor
    fed: int = 0


@dataclass
class _EpochLayout:
    """How an epoch of given batch sizes is cut into chunks and DALI samples: the same every epoch (the batch sizes
    are), so it is built once per (sizes, batches per chunk) and only the drawn parameters are laid out per epoch."""

    spans: list[tuple[int, int]]  # [start, end) of each training batch in the epoch's order
    groups: list[list[tuple[int, int]]]  # the spans of each chunk
    pieces: list[list[tuple[int, int]]]  # batched graph: each chunk's DALI samples as [start, end) in the order
    position: torch.Tensor | None  # batched graph: (N,) each image's tile in its sample, on the loader's device
    gathers: dict[int, torch.Tensor]  # batched graph: `_gather_index` per row width, made when first used

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (N, R) laid out flat as the batched graph takes them (`_gather_index`), with the index made once."""
        r = rows.shape[1]
        if r not in self.gathers:
            self.gathers[r] = _gather_index([p for chunk in self.pieces for p in chunk], r).to(rows.device)
        return rows.reshape(-1)[self.gathers[r]]


class DaliLoader:
    """Yields (x, y) like the CPU loader: x float32 [B,3,H,W] channels_last, normalized; y int64 [B]; on `device`.
    Satisfies pipeline.Loader: each pass is the next epoch of this rank's shard in `order`'s batches; parameters come
    from a generator seeded by (seed, epoch, rank), so an epoch is reproducible on its own, e.g. after resuming.

    DALI augments an epoch in chunks of `chunk_batches` whole batches (at most `chunk_images` images, at least one
    batch), each into fresh memory, CHUNKS_AHEAD chunk(s) ahead of the one handed out; the next epoch's first chunk
    is queued during this epoch's last. A batch is a view of its chunk's memory, valid while the consumer holds it.
    No output bit depends on the chunk size (tests/test_loaders.py). A consumer that stops early leaves none of its
    epoch's chunks queued.

    Device memory at the default chunk size, estimated (not yet measured): the split (150 MB for CIFAR-10's training
    set), the chunk in training (100.7 MB), DALI's output of it until its copy is done (the same) and the chunk being
    augmented with its sampling maps and masks (a few hundred MB): under 1 GB.

    `graph`: "batched" (the GPU design; the default on CUDA) or "per_image" (the default on the CPU). `remap`
    replaces the batched graph's resampling operator (tests run that graph on the CPU with it). Raises ValueError
    for an unknown graph, the per_image graph on CUDA, or chunk_images < 1.
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
        chunk_images: int | None = None,
    ):
        if chunk_images is not None and chunk_images < 1:
            raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
        if train:
            spec.check_image_size(*images.shape[1:3])
        batched_pipeline, per_image_pipeline = _graphs()
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.graph = graph or ("batched" if on_gpu else "per_image")
        if self.graph not in ("batched", "per_image"):
            raise ValueError(f"unknown DALI graph {graph!r}; choose batched or per_image")
        if self.graph == "per_image" and on_gpu:
            raise ValueError("the per_image graph is DALI's CPU fallback; on CUDA use the batched graph")
        self.spec, self.train, self.order, self.batch_size = spec, train, order, batch_size
        self.n = len(images)
        self.height, self.width = images.shape[1:3]
        self.num_samples = shard_size(self.n, order)
        chunk_images = chunk_images or (CHUNK_IMAGES if self.graph == "batched" else CPU_CHUNK_IMAGES)
        self.chunk_batches = max(1, chunk_images // batch_size)
        self.layout = graph_layout(spec)
        self.epoch = 0
        self._epoch_layouts: dict[tuple[tuple[int, ...], int], _EpochLayout] = {}
        # On the GPU the whole split is resident (150 MB for CIFAR-10's training set): no host-to-device copy per
        # chunk, and a chunk is gathered by index on the device.
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        if not on_gpu and order.rank == 0:
            _say_cpu_mode_once()
        self.workers = default_threads(on_gpu) if workers is None else workers
        options = dict(
            num_threads=self.workers,
            # DALI's own prefetch stays 1: its first schedule_run() would otherwise run that many iterations at
            # once, and with fed inputs it is simpler to schedule exactly one iteration per fed chunk (the dynamic
            # executor queues them; CHUNKS_AHEAD says how many).
            prefetch_queue_depth=1,
            seed=order.seed,
            device_id=(self.device.index or 0) if on_gpu else None,
        )
        # The pipelines' batch limit, in DALI samples: the largest chunk of an epoch, or run_fixed's batch_size
        # images (this rank's last batch may hold batch_size + 1, see pipeline.order).
        sizes = batch_sizes(self.n, batch_size, order)
        groups = [sizes[i : i + self.chunk_batches] for i in range(0, len(sizes), self.chunk_batches)]
        if self.graph == "batched":
            extra = {"remap": remap} if remap is not None else {}
            most = max(_samples_in(g) for g in [[batch_size], *groups])
            device_kind = "gpu" if on_gpu else "cpu"
            self.pipe = batched_pipeline(
                spec, self.height, self.width, train, device_kind, **extra, batch_size=most, **options
            )
        else:
            most = max(sum(g) for g in [[batch_size], *groups])
            self.pipe = per_image_pipeline(spec, self.height, self.width, train, batch_size=most, **options)
        self.pipe.build()
        # (DALI's output, CUDA event): DALI's buffer of the last chunk collected on the GPU, kept alive until the
        # asynchronous copy out of it is done (see _collect)
        self._held: tuple | None = None
        self._in_flight = 0  # chunks scheduled in DALI and not collected yet, by whichever pass
        self._ahead: _Epoch | None = None  # the next epoch, prepared (some chunks queued) during the last one

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, self.order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._check_no_pass_in_flight()
        number, self.epoch = self.epoch, self.epoch + 1
        if self._ahead is not None and self._ahead.number != number:  # set_epoch jumped: its chunks are not this one's
            self._drop_ahead()
        current, self._ahead = self._ahead or self._prepare(number), None
        try:
            for k, chunk in enumerate(current.chunks):
                # CHUNKS_AHEAD chunks queued behind this one, so that DALI augments them while this one is copied
                # out and trained on; at the epoch's end they are the next epoch's first chunks.
                while current.fed - k + (self._ahead.fed if self._ahead else 0) < 1 + CHUNKS_AHEAD:
                    if current.fed < len(current.chunks):
                        self._feed(current)
                        continue
                    self._ahead = self._ahead or self._prepare(number + 1)
                    if self._ahead.fed == len(self._ahead.chunks):
                        break
                    self._feed(self._ahead)
                x = self._collect()
                for a, b in chunk.spans:
                    yield x[a - chunk.start : b - chunk.start], current.labels[a:b]
        finally:  # a consumer that stops early leaves none of this epoch's chunks queued (the next one's stay)
            # counted from _in_flight, which _collect updates, so a Ctrl-C inside _collect drains no chunk twice
            self._drain(self._in_flight - (self._ahead.fed if self._ahead else 0))

    def _prepare(self, number: int) -> _Epoch:
        """Epoch `number`: its batches, labels and every chunk's DALI inputs, none fed yet.

        Everything random about the epoch is drawn and turned into DALI's inputs here, in a few dozen kernels for
        the whole epoch: per chunk the host then only gathers the images and feeds DALI, and per batch it only
        slices, which keeps the loader's host time off the training loop's (on a launch-bound GPU host every
        kernel launch counts)."""
        chosen = epoch_batches(self.n, self.batch_size, number, self.order)
        index = torch.from_numpy(np.concatenate(chosen) if chosen else np.zeros(0, np.int64)).to(self.device)
        params = None
        if self.train:
            generator = epoch_generator(self.order.seed, number, self.order.rank, self.device)
            params = draw_params(self.spec, len(index), self.height, self.width, generator, self.device)
        chunks = self._chunks(index, params, [len(b) for b in chosen], self.chunk_batches)
        return _Epoch(number, chunks, self.labels[index])

    def _feed(self, epoch: _Epoch) -> None:
        self._submit(epoch.chunks[epoch.fed])
        epoch.fed += 1

    def _drain(self, count: int) -> None:
        """Collect and drop the `count` oldest chunks queued in DALI."""
        if getattr(self.pipe, "_pipe", None) is not None:  # (None at interpreter exit)
            for _ in range(count):
                self.pipe.outputs()
                self._in_flight -= 1

    def _drop_ahead(self) -> None:
        """Drop the next epoch's chunks queued at the end of the last pass (they are the oldest in DALI's queue)."""
        if self._ahead is not None:
            self._drain(self._ahead.fed)
            self._ahead = None

    def _check_no_pass_in_flight(self) -> None:
        """DALI has one queue per loader: a pass that started while another still had chunks queued would collect
        that pass's images under its own labels. Raises RuntimeError then (a pass holds chunks in DALI from its
        first batch until its last chunk is collected; closing its iterator drains them)."""
        if self._in_flight > (self._ahead.fed if self._ahead else 0):
            raise RuntimeError(
                "DaliLoader: another pass over this loader still has chunks queued in DALI; exhaust it or close its "
                "iterator (it.close()) before starting a new one"
            )

    def run_fixed(self, images: np.ndarray, params: AugParams) -> torch.Tensor:
        """Augment `images` (uint8 [N, H, W, 3], N <= batch_size) with explicit parameters (the parity tests' seam);
        returns float32 [N, 3, H, W] channels_last, normalized."""
        self._check_no_pass_in_flight()
        self._drop_ahead()
        saved = self.images
        self.images = torch.from_numpy(images).to(self.device)
        try:
            (chunk,) = self._chunks(torch.arange(len(images), device=self.device), params, [len(images)], 1)
            self._submit(chunk)
            return self._collect()
        finally:
            self.images = saved

    def _chunks(self, order: torch.Tensor, params: AugParams | None, sizes: list[int], per_chunk: int) -> list[_Chunk]:
        """The epoch's `order` (dataset indices) cut into batches of `sizes` images and those into chunks of
        `per_chunk` batches, each chunk with its DALI inputs: views into tensors made once for the epoch."""
        h, w, n = self.height, self.width, len(order)
        cut = self._epoch_layout(sizes, per_chunk)
        groups, pieces = cut.groups, cut.pieces
        inputs: list[dict] = [{} for _ in groups]
        if self.train and params is not None:
            params = params.for_units(self.spec.included, self.device)
            matrices, shifts, holes = sampling_matrices(params, h, w), grid_shifts(params), hole_boxes(params)
            if self.graph == "per_image":
                columns = {"warp": _to_dali_corner_convention(matrices)}
                if self.layout.shifts:
                    translation = torch.eye(2, 3, device=self.device).repeat(n, 1, 1)
                    translation[:, :, 2] = shifts
                    columns["shift"] = _to_dali_corner_convention(translation)
                if self.layout.fills:
                    columns["holes"] = holes.view(n, -1, 4)
                inputs = [{k: v[g[0][0] : g[-1][1]] for k, v in columns.items()} for g in groups]
            else:
                # per DALI sample: warp (layout.warp_rows, N, 1, 1) = matrix rows a..f, the shift offsets, each
                # image's first row in the tall image; holes (4 per Box unit, N, 1, 1)
                rows = {"warp": torch.cat([matrices.view(n, 6), shifts, (cut.position * h).float()[:, None]], 1)}
                if self.layout.fills:
                    rows["holes"] = holes
                laid = {name: (cut.gather(v), v.shape[1]) for name, v in rows.items()}
                inputs = [
                    {
                        name: _as_samples(flat[r * g[0][0] : r * g[-1][1]], [d - c for c, d in chunk], (r, -1, 1, 1))
                        for name, (flat, r) in laid.items()
                    }
                    for g, chunk in zip(groups, pieces, strict=True)
                ]
        return [
            _Chunk(
                start=group[0][0],
                index=order[group[0][0] : group[-1][1]],
                spans=group,
                samples=[d - c for c, d in chunk_pieces],
                inputs=chunk_inputs,
            )
            for group, chunk_pieces, chunk_inputs in zip(groups, pieces, inputs, strict=True)
        ]

    def _epoch_layout(self, sizes: list[int], per_chunk: int) -> _EpochLayout:
        """The chunks and DALI samples of an epoch of batches of `sizes` images, `per_chunk` batches a chunk: built
        on first use and kept (an epoch's batch sizes are the same every epoch; run_fixed adds a few one-batch
        entries of at most batch_size + 1 images, so the cache stays small)."""
        key = (tuple(sizes), per_chunk)
        if key not in self._epoch_layouts:
            ends = np.cumsum(sizes).tolist()
            spans = list(zip([0, *ends[:-1]], ends, strict=True))
            groups = [spans[i : i + per_chunk] for i in range(0, len(spans), per_chunk)]
            # batched graph: each batch cut into DALI samples from its own start, whatever chunk it is in (the tile
            # an image takes in its sample enters its float32 sampling coordinates)
            batched = self.graph == "batched"
            pieces = [
                [(c, min(c + IMAGES_PER_SAMPLE, b)) for a, b in group for c in range(a, b, IMAGES_PER_SAMPLE)]
                if batched
                else []
                for group in groups
            ]
            every = [piece for chunk in pieces for piece in chunk]
            tile = np.concatenate([np.arange(d - c) for c, d in every]) if every else np.zeros(0, np.int64)
            position = torch.from_numpy(tile).to(self.device) if batched else None
            self._epoch_layouts[key] = _EpochLayout(spans, groups, pieces, position, {})
        return self._epoch_layouts[key]

    def _submit(self, chunk: _Chunk) -> None:
        """Feed DALI one chunk and schedule its iteration (asynchronous: DALI runs it on its own threads/stream)."""
        images = self.images[chunk.index]  # the chunk's one gather on the device
        if self.graph == "batched":
            tall = _as_samples(images, chunk.samples, (-1, self.width, 3))
            self._feed_input("images", tall, layout="HWC")
        else:
            self._feed_input("images", images, layout="HWC")
        for name, tensor in chunk.inputs.items():
            self._feed_input(name, tensor)
        self.pipe.schedule_run()
        self._in_flight += 1

    def _feed_input(self, name: str, tensor: torch.Tensor | list[torch.Tensor], layout: str | None = None) -> None:
        """A tensor is a batch (first axis = samples); a list holds one tensor per sample. DALI copies the data
        (external_source's default), so the tensors may be freed as soon as this returns."""
        samples = [t.contiguous() for t in tensor] if isinstance(tensor, list) else tensor.contiguous()
        on_gpu = (samples[0] if isinstance(samples, list) else samples).is_cuda
        if on_gpu:
            # DALI copies on torch's stream, so the copy is ordered after the kernels that produced the tensor.
            self.pipe.feed_input(name, samples, layout=layout, cuda_stream=torch.cuda.current_stream(self.device))
        elif isinstance(samples, list):
            self.pipe.feed_input(name, [t.numpy() for t in samples], layout=layout)
        else:
            self.pipe.feed_input(name, samples.numpy(), layout=layout)

    def _collect(self) -> torch.Tensor:
        """The oldest scheduled chunk's output in fresh torch memory: float32 [N, 3, H, W] channels_last."""
        self._in_flight -= 1
        if self.graph == "per_image":
            (out,) = self.pipe.outputs()
            x = torch.from_numpy(np.array(out.as_array()))  # a copy: DALI may reuse its buffer
        elif self.device.type == "cuda":
            x = self._copy_on_torch_stream()
        else:
            (out,) = self.pipe.outputs()
            x = torch.from_numpy(np.concatenate([np.asarray(out[i]) for i in range(len(out))]))  # a copy
        return x.view(-1, self.height, self.width, 3).permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW

    def _copy_on_torch_stream(self) -> torch.Tensor:
        """Copy DALI's GPU output into fresh torch memory asynchronously, on torch's stream: the model's kernels
        queue behind the copy and the host never waits for the GPU.

        `outputs(cuda_stream=...)` binds DALI's output to torch's stream: DALI makes that stream wait for the
        iteration's completion event instead of blocking the host (DALI's `Pipeline.outputs` docs; exec2's
        PopOutputs). DALI's buffer must outlive the copy, and freeing it returns it to DALI's stream-ordered pool
        on DALI's own stream, which knows nothing of torch's: so it is kept, with an event marking the copy's end,
        until the next chunk is collected, and released only after that event."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device)
        if self._held is not None:
            _, copied = self._held
            copied.synchronize()  # long done in practice: a whole chunk's training steps were queued after it
            self._held = None
        (out,) = self.pipe.outputs(cuda_stream=stream)
        tall = [out[i] for i in range(len(out))]
        rows = [t.shape()[0] for t in tall]
        x = torch.empty((sum(rows), self.width, 3), dtype=torch.float32, device=self.device)
        for t, part in zip(tall, torch.split(x, rows), strict=True):
            feed_ndarray(t, part, cuda_stream=stream)
        copied = torch.cuda.Event()
        copied.record(stream)
        self._held = (out, copied)
        return x


def _samples_in(sizes: list[int]) -> int:
    """DALI samples of the batched graph for batches of `sizes` images: each cut into IMAGES_PER_SAMPLE pieces."""
    return sum(-(-size // IMAGES_PER_SAMPLE) for size in sizes)


def _gather_index(pieces: list[tuple[int, int]], r: int) -> torch.Tensor:
    """The gather that lays (N, R=r) per-image values out flat as the batched graph takes them: for each [c, d) of
    `pieces` (consecutive, from 0 to N), an (R, d - c) block, row k holding images c..d-1's k-th value; the block of
    image c's piece starts at element R * c. int64 on the CPU, indices into the rows' flat view."""
    where = [(np.arange(c, d)[None, :] * r + np.arange(r)[:, None]).ravel() for c, d in pieces]
    return torch.from_numpy(np.concatenate(where) if where else np.zeros(0, np.int64))


def _as_samples(flat: torch.Tensor, images: list[int], shape: tuple[int, ...]) -> torch.Tensor | list[torch.Tensor]:
    """Consecutive DALI samples of `images` images each, stored one after another in the contiguous `flat`, each
    viewed as `shape` (one -1 in it: the axis that grows with the images). When all samples hold the same number of
    images they are one (samples, *shape) tensor, which DALI's feed_input takes as a whole batch in one call (a list
    costs it per sample: ~10 us each on this 2-core machine's CPU); otherwise a list of views, one per sample."""
    flat = flat.reshape(-1)
    per_image = flat.numel() // max(sum(images), 1)
    if len(set(images)) == 1:
        return flat.view(len(images), *shape)
    return [part.view(shape) for part in flat.split([per_image * n for n in images])]


def default_threads(on_gpu: bool) -> int:
    """DALI's CPU threads when --workers is not given. The GPU graph's host side only feeds and schedules one chunk
    at a time: 4 threads are plenty (and leave the cores to the training loop). DALI's CPU mode does all its work on
    them: every core this process may use, as the albumentations loader's default does."""
    from pipeline import usable_cores

    return min(4, usable_cores()) if on_gpu else usable_cores()


def _say_cpu_mode_once() -> None:
    global _warned_cpu_mode
    if not _warned_cpu_mode:
        _warned_cpu_mode = True
        print("DALI: no GPU in use, running DALI's CPU operators (expect CPU-loader speeds, not GPU ones).", flush=True)
