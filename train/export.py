"""`python -m train.export CHECKPOINT OUT.onnx`: a run's network as one self-contained ONNX model.

uint8 RGB images [N, 32, 32, 3] (any N) -> float32 class probabilities [N, 10], the run's normalization and TTA
inside (train.evaluate's Classifier); checked with onnxruntime first. Needs: pip install -e '.[export]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import warnings

import numpy as np
import torch

from pipeline.cli import OneLineParser, given_path, one_line_errors, output_file, writable_folder
from pipeline.errors import ConfigError, OutputError
from train.checkpoint import atomic_write
from train.data import load_data
from train.dist import Dist
from train.evaluate import Classifier, load_run

CHECK_IMAGES = 256  # evaluation images both runtimes classify before the file is written
TOLERANCE = 1e-4  # the largest difference in any probability accepted between onnxruntime and PyTorch
OPSET = 17  # ONNX opset: read by every onnxruntime since 1.15


def to_checked_onnx(classifier: Classifier, images: np.ndarray) -> bytes:
    """The ONNX model of `classifier`, traced on two of `images` (uint8 [N, 32, 32, 3]) with a dynamic batch axis, once
    onnxruntime ran it on all N. Raises OutputError when a probability differs from PyTorch's by more than TOLERANCE."""
    import onnxruntime

    buffer = io.BytesIO()
    # The TorchScript exporter (dynamo=False): the default torch.export-based one needs onnxscript, which the export
    # extra does not install; this one is deprecated but still present in the torch versions the project supports.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            classifier,
            (torch.from_numpy(images[:2]),),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to any binary file
            dynamo=False,
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=OPSET,
        )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (found,) = session.run(None, {"images": images})
    with torch.no_grad():
        worst = float(np.abs(found - classifier(torch.from_numpy(images)).numpy()).max())
    if not worst <= TOLERANCE:  # NaN too
        raise OutputError(
            f"onnxruntime's probabilities differ from PyTorch's by up to {worst:.2g} (more than {TOLERANCE:g}); "
            "nothing was written"
        )
    return buffer.getvalue()


@one_line_errors("what else runs on this machine")
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="python -m train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", type=given_path, help="a run's last.pt or best.pt")
    p.add_argument("out", type=output_file, help="the ONNX file to write (e.g. model.onnx)")
    p.add_argument("--data-dir", help="the data folder whose evaluation images check the export (default: the run's)")
    args = p.parse_args(argv)
    try:
        writable_folder(args.out.parent, "out")  # before the work, not after it
    except ValueError as err:
        p.error(str(err))
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime")):
        raise ConfigError("python -m train.export needs onnx and onnxruntime: pip install -e '.[export]'")
    cfg, _, net = load_run(args.checkpoint, torch.device("cpu"), data_dir=args.data_dir)
    images = load_data(cfg, Dist()).eval_x[:CHECK_IMAGES]
    model = to_checked_onnx(Classifier(net, cfg).eval(), images)
    atomic_write(args.out, lambda f: f.write(model))
    print(f"{args.out}: uint8 RGB [N, 32, 32, 3] -> probabilities [N, 10]; onnxruntime agrees on {len(images)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
