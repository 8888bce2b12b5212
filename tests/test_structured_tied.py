"""Attention whose head width is read from the input's width at run time (XCiT's and VOLO's layout): the residual
stream is cut, and every head narrowed to match (``_head_dims``, as tests/test_structured_head_dims.py)."""

from __future__ import annotations

import torch
from torch import nn

from .test_structured_repair import pruned


class CrossCovariance(nn.Module):
    """Heads attend over channels (a cross-covariance attention); the head width is ``C // H`` of the input."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, c))


class ClassAttention(nn.Module):
    """The class token attends to every token: separate query (of the class token only), key and value."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x[:, 0]).unsqueeze(1).reshape(b, 1, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1) * 0.25).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, 1, c))


class Tied(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(CrossCovariance(dim) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(2))
        self.cls = ClassAttention(dim)
        self.classifier = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(x.shape[0], 16, 4))  # 8x8 digits as 16 patches of 4 pixels
        for block, mlp in zip(self.blocks, self.mlps, strict=True):
            x = x + block(x)
            x = x + mlp(x)
        return self.classifier((x[:, :1] + self.cls(x))[:, 0])


def test_heads_sized_from_the_input_width_follow_the_residual_cut(images: dict) -> None:
    out, ratio, _ = pruned(Tied, images)
    width = out.embed.out_features
    assert width < 32 and width % 4 == 0  # the residual stream is cut, by whole channels of every head
    for block in out.blocks:
        assert block.qkv.in_features == width and block.qkv.out_features == 3 * width == 3 * block.proj.in_features
    assert out.cls.q.out_features == out.cls.k.out_features == out.cls.v.out_features == width
    assert ratio >= 1.4
