"""Handwritten digits (8x8, bundled) and small models for them: the quickstart's model and data.

The data is the UCI optdigits test set (CC BY 4.0, see ``data/README.md``), read from the
package: nothing is downloaded.
"""

from __future__ import annotations

import csv
import gzip
import io
from functools import lru_cache
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine.specs import weights_will_load

PIXELS = 64
CLASSES = 10


@lru_cache(maxsize=1)
def load_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 samples: images as float tensors scaled to [0, 1] (shape N x 64), labels (N)."""
    raw = resources.files("torchslim.examples").joinpath("data/optdigits.csv.gz").read_bytes()
    rows = list(csv.reader(io.StringIO(gzip.decompress(raw).decode("ascii"))))
    values = torch.tensor([[int(v) for v in row] for row in rows], dtype=torch.int64)
    return values[:, :PIXELS].float() / 16.0, values[:, PIXELS]


def split(eval_fraction: float = 0.2, seed: int = 0, validation_fraction: float = 0.0) -> dict[str, TensorDataset]:
    """A fixed shuffled split into ``train`` and ``eval`` datasets, and ``validation`` (taken from what
    would be train: the eval split stays the same) when ``validation_fraction`` > 0."""
    images, labels = load_tensors()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - eval_fraction))
    valid = int(len(labels) * validation_fraction)
    parts = {"train": order[valid:cut], "eval": order[cut:]}
    if valid:
        parts["validation"] = order[:valid]
    return {name: TensorDataset(images[index], labels[index]) for name, index in parts.items()}


def loaders(
    batch_size: int = 64, eval_fraction: float = 0.2, seed: int = 0, image: bool = False, validation_fraction: float = 0.0
) -> dict[str, DataLoader]:
    """Train, calibration and eval loaders, and a validation loader when ``validation_fraction`` > 0
    (held out of the train split); ``image=True`` shapes inputs as N x 1 x 8 x 8 for CNNs."""
    parts = split(eval_fraction, seed, validation_fraction)
    if image:
        parts = {k: TensorDataset(d.tensors[0].view(-1, 1, 8, 8), d.tensors[1]) for k, d in parts.items()}
    shuffle = torch.Generator().manual_seed(seed)
    return {
        "train": DataLoader(parts["train"], batch_size=batch_size, shuffle=True, generator=shuffle),
        "calibration": DataLoader(parts["train"], batch_size=batch_size),
        "eval": DataLoader(parts["eval"], batch_size=256),
        **({"validation": DataLoader(parts["validation"], batch_size=256)} if "validation" in parts else {}),
    }


def mlp(hidden: int = 256, depth: int = 2, train_epochs: int = 0, seed: int = 0) -> nn.Sequential:
    """A ``64 -> hidden (x depth) -> 10`` ReLU network, trained for ``train_epochs`` on the train split.

    Training here (deterministic under ``seed``, about a second) keeps the quickstart free of
    binary checkpoints; pass ``train_epochs=0`` for an untrained network. No training happens when
    torchslim loads saved weights over the model (:func:`torchslim.weights_will_load`).
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = PIXELS
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    model = nn.Sequential(*layers, nn.Linear(width, CLASSES))
    if _should_train(train_epochs):
        fit(model, loaders(seed=seed)["train"], train_epochs)
    return model.eval()


def cnn(channels: int = 8, train_epochs: int = 0, seed: int = 0) -> nn.Sequential:
    """A small conv net for ``1 x 8 x 8`` inputs (use ``loaders(image=True)``)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, CLASSES),
    )
    if _should_train(train_epochs):
        fit(model, loaders(seed=seed, image=True)["train"], train_epochs)
    return model.eval()


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv) shortcut, as in ResNet."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv-bn-relu-conv-bn, plus the shortcut, then relu."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual CNN for ``1 x 8 x 8`` digits: stem, two stages of basic blocks, pooling, classifier."""

    def __init__(self, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(*(BasicBlock(width, width) for _ in range(blocks)))
        self.stage2 = nn.Sequential(
            BasicBlock(width, 2 * width, stride=2), *(BasicBlock(2 * width, 2 * width) for _ in range(blocks - 1))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of ``N x 1 x 8 x 8`` images."""
        features = self.stage2(self.stage1(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(features), 1))


def resnet(width: int = 32, blocks: int = 2, train_epochs: int = 0, seed: int = 0) -> ResNet:
    """A residual CNN (see :class:`ResNet`), trained for ``train_epochs`` on the train split (use ``loaders(image=True)``)."""
    torch.manual_seed(seed)
    model = ResNet(width, blocks)
    if _should_train(train_epochs):
        fit(model, loaders(seed=seed, image=True)["train"], train_epochs)
    return model.eval()


def _should_train(epochs: int) -> bool:
    # Training is wasted when every weight is about to be replaced by saved ones (load_model, resume).
    return epochs > 0 and not weights_will_load()


def fit(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 1e-3) -> None:
    """Plain cross-entropy training with Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
