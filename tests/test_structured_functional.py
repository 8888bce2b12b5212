"""Layers whose weight the model uses through a functional call, not through their own forward
(``F.linear(x, self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))``, as BEiT-, EVA- and
Swin-V2-style attention computes its query, key and value): the layer roots its group of channels or heads as a
called one does, and the bias built from the model's own per-channel tensors loses the same rows.
Hand-written models (no timm), random init."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.engine.macs import count_macs
from torchslim.plugins.prune import StructuredPrune

from .conftest import make_ctx
from .test_structured_head_dims import HEADS, TOKENS, WIDTH, Residual

pytestmark = pytest.mark.usefixtures("one_thread")


class FunctionalAttention(nn.Module):
    """Attention whose fused q/k/v Linear layer is never called: its weight goes to ``F.linear`` with a bias
    concatenated from a query bias, a key bias buffer of zeros and a value bias. ``tied``: the heads are merged
    back to the input's width (``reshape(B, N, C)``), so whole heads cannot go alone."""

    def __init__(self, width: int, heads: int, tied: bool = False) -> None:
        super().__init__()
        self.num_heads, self.tied = heads, tied
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.randn(width) * 0.1)
        self.register_buffer("k_bias", torch.zeros(width), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(width) * 0.1)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(out.reshape(batch, tokens, width if self.tied else -1))


class TiedFunctionalAttention(FunctionalAttention):
    """The same, its heads merged back to the input's width."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__(width, heads, tied=True)


class FunctionalConv(nn.Module):
    """A convolution applied by ``F.conv2d`` with its weight and a bias of the parent's own, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 24, 3, bias=False)
        self.shift = nn.Parameter(torch.randn(24) * 0.1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(F.conv2d(x, self.conv.weight, self.shift, padding=1))
        return self.head(x.mean(dim=(2, 3)))


def _pruned(original: nn.Module, x: torch.Tensor) -> nn.Module:
    data = {name: [(x, torch.zeros(len(x), dtype=torch.long))] for name in ("train", "calibration", "eval")}
    return StructuredPrune(amount=0.3).apply(copy.deepcopy(original), make_ctx(original, data, evaluate=lambda m: 0.0))


def _gone(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Rows of ``before`` that ``after`` no longer holds."""
    return [i for i, row in enumerate(before) if not any(torch.equal(row, r) for r in after)]


def test_functional_qkv_is_pruned_by_whole_heads_with_its_bias() -> None:
    original = Residual(FunctionalAttention).eval()
    x = torch.randn(8, TOKENS, 16, generator=torch.Generator().manual_seed(1))
    model = _pruned(original, x)
    channels = _gone(original.embed.weight, model.embed.weight)  # the residual stream's cut
    assert len(channels) > 0
    kept = [c for c in range(WIDTH) if c not in channels]
    masked = copy.deepcopy(original)
    for layer in (masked.embed, *(b.proj for b in masked.blocks)):
        layer.weight.data[channels], layer.bias.data[channels] = 0, 0
    for before, after, target in zip(original.blocks, model.blocks, masked.blocks, strict=True):
        assert after.num_heads == HEADS - 1  # 30% of 4 heads: one whole head
        rows = _gone(before.qkv.weight[:, kept], after.qkv.weight)
        head = rows[0] // 8
        assert rows == [b * WIDTH + head * 8 + d for b in range(3) for d in range(8)]
        left = [i for i in range(WIDTH) if i // 8 != head]
        for key in ("q_bias", "k_bias", "v_bias"):  # the bias pieces lost that head's rows
            assert torch.equal(getattr(after, key), getattr(before, key)[left])
        target.proj.weight.data[:, head * 8 : head * 8 + 8] = 0  # the head's values read by nothing
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)  # the original with what was cut zeroed
    assert count_macs(original, x) / count_macs(model, x) > 1.4


def test_functional_qkv_tied_to_its_input_narrows_its_heads_and_bias() -> None:
    original = Residual(TiedFunctionalAttention).eval()
    x = torch.randn(8, TOKENS, 16, generator=torch.Generator().manual_seed(1))
    model = _pruned(original, x)
    assert model.embed.out_features == 24  # 30% of 32 is 10 channels: the nearest multiple of the 4 heads below
    for after in model.blocks:
        assert after.num_heads == HEADS and after.qkv.out_features == 72
        assert all(len(getattr(after, key)) == 24 for key in ("q_bias", "k_bias", "v_bias"))
    with torch.no_grad():
        assert model(x).shape == (8, 5)
    assert count_macs(original, x) / count_macs(model, x) > 1.4


def test_functional_conv_keeps_its_bias_rows() -> None:
    original = FunctionalConv().eval()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    model = _pruned(original, x)
    inputs = _gone(original.stem.weight.flatten(1), model.stem.weight.flatten(1))
    kept_inputs = [c for c in range(16) if c not in inputs]
    outputs = _gone(original.conv.weight[:, kept_inputs].flatten(1), model.conv.weight.flatten(1))
    assert outputs and model.conv.weight.shape[0] == 24 - len(outputs)
    assert torch.equal(model.shift, original.shift[[c for c in range(24) if c not in outputs]])  # cut with the weight
    masked = copy.deepcopy(original)
    masked.stem.weight.data[inputs], masked.stem.bias.data[inputs] = 0, 0
    masked.conv.weight.data[outputs], masked.shift.data[outputs] = 0, 0
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)
