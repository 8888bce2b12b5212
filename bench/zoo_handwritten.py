"""Hand-written models of the kinds users write, for the zoo (bench/zoo.py): not from timm, random init.

Each is small (a forward in milliseconds) and built from PyTorch's own blocks: recurrent classifiers over
token ids, a CRNN, a convolution subclass with a learned per-output-channel gain, a network whose forward
branches on its data (``torch.fx`` cannot trace it), a ViT from ``nn.TransformerEncoderLayer`` and a U-Net
with transposed convolutions and skip concatenations. :data:`INPUTS` says what each one eats.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 10
VOCAB = 64
TOKENS = 12


class RecurrentClassifier(nn.Module):
    """Token ids -> embedding -> one LSTM or GRU layer -> Linear on the last time step."""

    def __init__(self, cell: type[nn.LSTM] | type[nn.GRU], width: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = cell(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


class CRNN(nn.Module):
    """Convolutions over an image strip, its columns read as a sequence by a bidirectional LSTM."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.rnn = nn.LSTM(32 * 4, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        maps = self.features(image)  # (n, 32, 4, w)
        columns = maps.permute(0, 3, 1, 2).flatten(2)  # (n, w, 32 * 4): one step per column
        out, _ = self.rnn(columns)
        return self.head(out.mean(dim=1))


class GainConv2d(nn.Conv2d):
    """A convolution with a learned gain per output channel (a parameter the pruning library does not know)."""

    def __init__(self, *args: int, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain.view(1, -1, 1, 1)


def _block(conv: Callable[..., nn.Module], cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def gain_cnn() -> nn.Module:
    """Three :class:`GainConv2d` blocks, pooled, a Linear head."""
    return nn.Sequential(
        _block(GainConv2d, 3, 16),
        _block(GainConv2d, 16, 32, 2),
        _block(GainConv2d, 32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, CLASSES),
    )


class DataDependent(nn.Module):
    """A CNN whose forward chooses a branch, and how many times to apply a block, from its activations'
    values: ``torch.fx`` symbolic tracing cannot follow it (a tensor's truth value is not known)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(nn.Conv2d, 3, 24, 2)
        self.wide = _block(nn.Conv2d, 24, 48)
        self.narrow = nn.Sequential(_block(nn.Conv2d, 24, 24), _block(nn.Conv2d, 24, 48))
        self.repeat = _block(nn.Conv2d, 48, 48)
        self.head = nn.Linear(48, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.wide(x) if x.mean() > 0.3 else self.narrow(x)
        for _ in range(1 + int(x.std() > 0.5)):
            x = x + self.repeat(x)
        return self.head(x.mean(dim=(2, 3)))


class TorchViT(nn.Module):
    """A small ViT from PyTorch's own blocks: patches by a strided convolution, a class token, learned
    positions, ``nn.TransformerEncoderLayer`` x2 (``nn.MultiheadAttention`` inside), a Linear head."""

    def __init__(self, size: int = 32, patch: int = 8, width: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(image).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


class UNet(nn.Module):
    """Two levels down, two up by ``ConvTranspose2d``, each joined to its skip by concatenation; per-pixel
    class scores averaged over the image (so the output is one row of logits per input)."""

    def __init__(self) -> None:
        super().__init__()
        self.down1, self.down2, self.bottom = _block(nn.Conv2d, 3, 16), _block(nn.Conv2d, 16, 32), _block(nn.Conv2d, 32, 64)
        self.up2, self.up1 = nn.ConvTranspose2d(64, 32, 2, stride=2), nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2, self.dec1 = _block(nn.Conv2d, 64, 32), _block(nn.Conv2d, 32, 16)
        self.classes = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        b = self.bottom(F.max_pool2d(d2, 2))
        u2 = self.dec2(torch.cat([self.up2(b), d2], dim=1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], dim=1))
        return self.classes(u1).mean(dim=(2, 3))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "lstm_classifier": lambda: RecurrentClassifier(nn.LSTM),
    "gru_classifier": lambda: RecurrentClassifier(nn.GRU),
    "crnn": CRNN,
    "gain_conv_cnn": gain_cnn,
    "data_dependent_cnn": DataDependent,
    "torch_vit": TorchViT,
    "unet": UNet,
}
#: Each model's input: ("tokens", sequence length) or ("image", channels, height, width).
INPUTS: dict[str, tuple[str, ...]] = {
    "lstm_classifier": ("tokens", str(TOKENS)),
    "gru_classifier": ("tokens", str(TOKENS)),
    "crnn": ("image", "3", "16", "48"),
    "gain_conv_cnn": ("image", "3", "32", "32"),
    "data_dependent_cnn": ("image", "3", "32", "32"),
    "torch_vit": ("image", "3", "32", "32"),
    "unet": ("image", "3", "32", "32"),
}


def build(name: str) -> nn.Module:
    """Hand-written model ``name`` (a key of :data:`MODELS`), random init, eval mode. Seed torch first."""
    return MODELS[name]().eval()


def inputs(name: str, samples: int, seed: int) -> torch.Tensor:
    """``samples`` inputs of the kind model ``name`` eats, drawn with ``seed``: token ids in 1..VOCAB-1
    (no padding id) or a standard-normal image batch."""
    generator = torch.Generator().manual_seed(seed)
    kind, *shape = INPUTS[name]
    if kind == "tokens":
        return torch.randint(1, VOCAB, (samples, int(shape[0])), generator=generator)
    return torch.randn(samples, *(int(s) for s in shape), generator=generator)
