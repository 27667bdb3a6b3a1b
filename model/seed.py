"""The seed network, exactly as the original write-up defines it (see README, "The seed").

190,880 trainable parameters. Depthwise-separable and dilated convolutions, no max pooling. The original also
defined a `skip2` branch that forward() never used; it is left out, so the count matches the original summary.
It returns logits; the loss applies log-softmax (the original returned log_softmax, the same model).
"""

from __future__ import annotations

import torch
from torch import nn

from model._registry import register_model


@register_model("seed")
class SeedNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.convblock1 = nn.Sequential(  # 32x32
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Dropout(0.2),
        )
        self.skip1 = nn.Conv2d(3, 32, 1, bias=False)  # added to convblock1's output
        self.convblock2 = nn.Sequential(  # 32 -> 15 (stride 2, no padding)
            nn.Conv2d(32, 64, 3, stride=2, bias=False),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Dropout(0.1),
        )
        self.convblock3 = nn.Sequential(  # 15 -> 11 (dilated) -> 9
            nn.Conv2d(128, 64, 3, dilation=2, bias=False),
            nn.Conv2d(64, 32, 3, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Dropout(0.1),
        )
        self.convblock4 = nn.Sequential(  # depthwise-separable, 9x9
            nn.Conv2d(32, 32, 3, padding=1, groups=32),
            nn.Conv2d(32, 16, 1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Dropout(0.1),
        )
        self.gap = nn.AvgPool2d(kernel_size=9)
        self.convblock5 = nn.Conv2d(16, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convblock1(x) + self.skip1(x)
        x = self.convblock2(x)
        x = self.convblock3(x)
        x = self.convblock4(x)
        x = self.convblock5(self.gap(x))
        return x.flatten(1)
