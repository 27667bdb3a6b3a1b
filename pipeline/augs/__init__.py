"""The augmentations, one module each; AugSpec (pipeline/spec.py) composes them, in the order its fields list them.

A new augmentation is one new module here (a frozen dataclass subclassing `Warp`, `Shift` or `Box` from
pipeline/augs/unit.py) and one field of AugSpec.
"""

from pipeline.augs.cutout import Cutout
from pipeline.augs.flip import Flip
from pipeline.augs.pad_crop import PadCrop
from pipeline.augs.ssr import ShiftScaleRotate
from pipeline.augs.unit import Aug, Box, Shift, Warp

__all__ = ["Aug", "Box", "Cutout", "Flip", "PadCrop", "Shift", "ShiftScaleRotate", "Warp"]
