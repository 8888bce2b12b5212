"""A small ViT built only from PyTorch's own blocks (nn.TransformerEncoderLayer, whose self-attention is an
nn.MultiheadAttention): a conv patch embedding, a class token, learned positions, a linear head. Used by the
tests of attention pruned by whole heads and as a recipe's model (``tests.torch_vit:vit``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TorchViT(nn.Module):
    """Images (B, 3, size, size) -> class logits, through ``layers`` encoder layers of ``width`` and ``heads``."""

    def __init__(
        self,
        size: int = 32,
        patch: int = 4,
        width: int = 192,
        heads: int = 6,
        layers: int = 4,
        classes: int = 10,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=batch_first, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        tokens = self.encoder(tokens)
        first = tokens[:, 0] if self.batch_first else tokens[0]
        return self.head(self.norm(first))


def vit(**kwargs: int | bool) -> TorchViT:
    """A seeded :class:`TorchViT` in eval mode (keyword arguments as its constructor's)."""
    torch.manual_seed(0)
    return TorchViT(**kwargs).eval()  # type: ignore[arg-type]


def loaders(size: int = 32, samples: int = 16, batch_size: int = 8) -> dict[str, DataLoader]:
    """Random images labelled with the unpruned model's top-1 (accuracy is agreement)."""
    images = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = vit(size=size)(images).argmax(dim=1)
    data = TensorDataset(images, labels)
    return {name: DataLoader(data, batch_size=batch_size) for name in ("train", "calibration", "eval")}
