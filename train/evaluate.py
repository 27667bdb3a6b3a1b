"""`python -m train.evaluate CHECKPOINT`: what a run's checkpoint scores, or what it sees in image files.

Without --images: loss, accuracy and per-class accuracy on the run's evaluation split, computed by the run's own code
with its settings (data, --val-split, loader, TTA, bf16 autocast) and the weights it evaluated (the EMA copy with
--ema): the numbers the run logged for the checkpoint's epoch. With --images FILE...: each image's top-3 classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import LOADERS
from pipeline.cli import OneLineParser, given_path, one_line_errors, output_file, writable_folder
from pipeline.data import CLASSES, IMAGE_SHAPE
from pipeline.errors import CheckpointError, DataError
from train.checkpoint import load_checkpoint, restore, save_json
from train.config import DEVICES, TTAS, TrainConfig
from train.data import load_data, make_eval_loader
from train.dist import Dist
from train.loop import evaluate, tta_logits
from train.run import build_state, resolve_device

ADVICE = "Give a last.pt or best.pt that python -m train wrote."


def load_run(path: Path, device: torch.device, **changes: Any) -> tuple[TrainConfig, dict, nn.Module]:
    """(the run's settings with `changes` (TrainConfig fields; None: the run's), the verified checkpoint, the network
    the run evaluated, in eval mode on `device`: the EMA copy with --ema). Raises CheckpointError (an unusable file)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there. {ADVICE}")
    saved = load_checkpoint(path, ADVICE)
    cfg = TrainConfig(**saved["config"])
    state = build_state(cfg, device, Dist(), total_steps=1)
    restore(state, saved, path, device)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    return cfg, saved, (state.ema.module if state.ema is not None else state.net).eval()


class Classifier(nn.Module):
    """uint8 RGB images [N, 32, 32, 3] (as CIFAR stores them) -> float32 class probabilities [N, 10]: the run's
    normalization (its AugSpec's mean and std), network and TTA, in float32."""

    def __init__(self, net: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.net, self.tta, self.spec = net, cfg.tta, cfg.aug_spec()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2) / 255  # float32; NHWC memory: a channels_last NCHW batch
        x = (x - x.new_tensor(self.spec.mean).view(1, 3, 1, 1)) / x.new_tensor(self.spec.std).view(1, 3, 1, 1)
        return tta_logits(self.net, x, device=x.device, amp=False, tta=self.tta).softmax(1)


def read_images(paths: list[Path]) -> np.ndarray:
    """uint8 RGB [N, 32, 32, 3] of image files of any size and mode, resized by Pillow's bicubic filter (which
    averages over the whole footprint when shrinking). Raises DataError naming a file Pillow cannot read."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB").resize(IMAGE_SHAPE[::-1], Image.Resampling.BICUBIC)))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from None
    return np.stack(images)


def score(cfg: TrainConfig, net: nn.Module, device: torch.device) -> dict:
    """{split, loss, acc, images, per_class} of `net` on `cfg`'s evaluation split (accuracies are fractions), by
    train.run's loader and train.loop.evaluate. Raises DataError / ConfigError as the run would."""
    data = load_data(cfg, Dist())
    loader = make_eval_loader(cfg, data, device, Dist())
    result = evaluate(net, loader, device=device, amp=bool(cfg.amp), tta=cfg.tta, keep_probabilities=True)
    right = result["probabilities"].argmax(1).numpy() == data.eval_y
    per_class = {name: float(right[data.eval_y == c].mean()) for c, name in enumerate(CLASSES) if c in data.eval_y}
    numbers = {"loss": result["loss"], "acc": result["acc"], "images": result["count"], "per_class": per_class}
    return {"split": data.eval_name, **numbers}


@one_line_errors("--images (fewer files at a time)")
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="python -m train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", type=given_path, help="a run's last.pt or best.pt")
    p.add_argument("--images", nargs="+", type=given_path, metavar="FILE", help="classify these image files instead")
    p.add_argument("--data-dir", help="the data folder (default: the run's)")
    p.add_argument("--tta", choices=TTAS, help="test-time augmentation (default: the run's)")
    p.add_argument("--loader", choices=LOADERS, help="the evaluation loader (default: the run's; cpu without DALI)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto = CUDA if available")
    p.add_argument("--json", type=output_file, metavar="FILE", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    try:
        if args.json:
            writable_folder(args.json.parent, "--json")  # before the work, not after it
    except ValueError as err:
        p.error(str(err))
    device = resolve_device(args.device, Dist())
    cfg, saved, net = load_run(args.checkpoint, device, data_dir=args.data_dir, tta=args.tta, loader=args.loader)
    if args.images:
        images = torch.from_numpy(read_images(args.images)).to(device)
        with torch.no_grad():
            top = Classifier(net, cfg).to(device)(images).cpu().topk(3)
        rows = []
        for path, chances, classes in zip(args.images, *top, strict=True):
            top3 = {CLASSES[c]: float(p) for p, c in zip(chances, classes, strict=True)}
            print(f"{path}: " + ", ".join(f"{name} {p:.1%}" for name, p in top3.items()))
            rows.append({"image": str(path), "top3": top3})
        if args.json:
            save_json({"checkpoint": str(args.checkpoint), "images": rows}, args.json)
        return 0
    result = {"checkpoint": str(args.checkpoint), "epoch": saved["epoch"], "tta": cfg.tta}
    result.update(score(cfg, net, device))
    split, logged = result["split"], saved["history"][-1]
    print(
        f"{args.checkpoint} (epoch {result['epoch']}) on {result['images']:,} {split} images, tta {cfg.tta}: "
        f"loss {result['loss']:.4f} acc {result['acc']:.2%}"
    )
    if f"{split}_acc" in logged:  # not with --eval-every on an epoch it skipped
        print(f"the run logged for this epoch: loss {logged[f'{split}_loss']:.4f} acc {logged[f'{split}_acc']:.2%}")
    for name, acc in result["per_class"].items():
        print(f"  {name:<11}{acc:8.2%}")
    if args.json:
        save_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
