"""A MobileNetV2/EfficientNet-style network for the ``1 x 8 x 8`` digits: depthwise convs,
squeeze-excite and inverted residual blocks, the layer kinds that make pruning hard.

Use it with ``torchslim.examples.digits:loaders`` and ``image: true``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .digits import CLASSES, fit, loaders


class SqueezeExcite(nn.Module):
    """Channel attention: pool, squeeze to a few channels, expand, and scale the input by a sigmoid."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` scaled channel by channel."""
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.expand(F.silu(self.reduce(scale)))
        return x * torch.sigmoid(scale)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project; a shortcut when shapes allow."""

    def __init__(self, inputs: int, outputs: int, expand: int = 4, stride: int = 1, se: bool = True) -> None:
        super().__init__()
        hidden = inputs * expand
        self.expand = nn.Sequential(nn.Conv2d(inputs, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
        )
        self.se: nn.Module = SqueezeExcite(hidden, max(4, inputs // 4)) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, plus ``x`` when it has the same shape."""
        out: torch.Tensor = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class MobileNet(nn.Module):
    """Stem, five inverted residual blocks (two downsampling), a 1x1 head, pooling, classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w1, w2, w3 = width, width * 3 // 2, width * 5 // 2
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.SiLU())
        self.blocks = nn.Sequential(
            InvertedResidual(w1, w1, expand=2),
            InvertedResidual(w1, w2, stride=2),
            InvertedResidual(w2, w2),
            InvertedResidual(w2, w3, stride=2),
            InvertedResidual(w3, w3),
        )
        self.head = nn.Sequential(nn.Conv2d(w3, 8 * width, 1, bias=False), nn.BatchNorm2d(8 * width), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of ``N x 1 x 8 x 8`` images."""
        features = self.head(self.blocks(self.stem(x)))
        logits: torch.Tensor = self.classifier(torch.flatten(self.pool(features), 1))
        return logits


def mobilenet(width: int = 16, train_epochs: int = 0, seed: int = 0) -> MobileNet:
    """A :class:`MobileNet`, trained for ``train_epochs`` on the digits train split (deterministic under ``seed``)."""
    torch.manual_seed(seed)
    model = MobileNet(width)
    if train_epochs:
        fit(model, loaders(seed=seed, image=True)["train"], train_epochs, lr=3e-3)
    return model.eval()
