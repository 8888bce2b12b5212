"""Attention heads whose values are wider than their keys, split from one projection head by head (TinyViT's
layout), with a per-head bias cached in eval mode: pruned by whole heads (``_structured_heads``)."""

from __future__ import annotations

import torch
from torch import nn

from .test_structured_repair import pruned


class WideValues(nn.Module):
    """Each head's query, key (4 wide) and value (8 wide) are one block of the projection's rows; the output
    projection reads ``heads * 8`` values, which is the model's width too."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 16) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = heads, 4, dim // heads
        self.out_dim = self.val_dim * heads
        self.qkv = nn.Linear(dim, heads * (2 * self.key_dim + self.val_dim))
        self.proj = nn.Linear(self.out_dim, dim)
        self.biases = nn.Parameter(torch.randn(heads, tokens, tokens) * 0.1)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "bias" not in self.cache:  # computed once in eval mode, as the model's own cache is
            self.cache["bias"] = self.biases.detach() * 1.0
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1) * self.key_dim**-0.5 + self.cache["bias"]).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.out_dim))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 32)
        self.attn = nn.ModuleList(WideValues() for _ in range(2))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2))
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(x.shape[0], 16, 4))  # 8x8 digits as 16 patches of 4 pixels
        for attn, mlp in zip(self.attn, self.mlp, strict=True):
            x = x + attn(x)
            x = x + mlp(x)
        return self.classifier(x.mean(dim=1))


def test_heads_with_wider_values_are_cut_whole(images: dict) -> None:
    out, ratio, notes = pruned(TinyTransformer, images)
    assert not any("whole" in note for note in notes), notes
    for attn in out.attn:
        assert attn.num_heads < 4 and attn.biases.shape[0] == attn.num_heads
        assert attn.qkv.out_features == attn.num_heads * 16 and attn.proj.in_features == attn.out_dim == attn.num_heads * 8
    assert ratio >= 1.4
