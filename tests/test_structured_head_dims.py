"""Attention whose heads are as wide as its input and tied to it (the head size taken from the input,
``reshape(B, N, 3, H, C // H)``, the heads merged back to the input's width): neither whole heads nor the
residual channels can be cut alone, so the residual channels it reads go in multiples of its head count and
each head loses as many dimensions in the same cut. Hand-written model (no timm), random init."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim.engine.macs import count_macs
from torchslim.plugins.prune import StructuredPrune

from .conftest import make_ctx

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS, WIDTH, HEADS = 6, 32, 4


class TiedAttention(nn.Module):
    """Old-style attention: the head size is the input's width over the head count, the output as wide as the input."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))


class TiedDimensionMajor(TiedAttention):
    """The heads merged dimension-major: the output projection's column ``d * heads + h`` is head h's dimension d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).permute(0, 2, 3, 1).reshape(batch, tokens, width))


class TiedClassAttention(nn.Module):
    """Class attention: one query from the mean token (given a token axis before its split into heads), keys and
    values from every token, by three projections; the head size again the input's width over the head count."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = heads, (width // heads) ** -0.5
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        size = width // self.num_heads
        q = self.q(x.mean(dim=1)).unsqueeze(1).reshape(batch, 1, self.num_heads, size).transpose(1, 2)
        k = self.k(x).reshape(batch, tokens, self.num_heads, size).transpose(1, 2)
        v = self.v(x).reshape(batch, tokens, self.num_heads, size).transpose(1, 2)
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, 1, width))


class Residual(nn.Module):
    """An embedding, two residual blocks of tied attention, a classifier on the mean token."""

    def __init__(self, attention: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, WIDTH)
        self.blocks = nn.ModuleList(attention(WIDTH, HEADS) for _ in range(2))
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(dim=1))


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(8, TOKENS, 16, generator=torch.Generator().manual_seed(seed))


def _gone(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Rows of ``before`` that ``after`` no longer holds."""
    return [i for i, row in enumerate(before) if not any(torch.equal(row, r) for r in after)]


@pytest.mark.parametrize(
    "attention", [TiedAttention, TiedDimensionMajor, TiedClassAttention], ids=["fused-qkv", "dimension-major", "class-attention"]
)
def test_tied_heads_narrow_with_the_residual_channels(attention: type[nn.Module]) -> None:
    original = Residual(attention).eval()
    x = _inputs()
    data = {name: [(x, torch.zeros(8, dtype=torch.long))] for name in ("train", "calibration", "eval")}
    model = StructuredPrune(amount=0.3).apply(copy.deepcopy(original), make_ctx(original, data, evaluate=lambda m: 0.0))
    channels = _gone(original.embed.weight, model.embed.weight)
    assert len(channels) == 8  # 30% of 32 is 10 channels: the nearest multiple of the 4 heads below, 2 per head
    masked = copy.deepcopy(original)
    for layer in (masked.embed, *(b.proj for b in masked.blocks)):
        layer.weight.data[channels], layer.bias.data[channels] = 0, 0
    kept = [c for c in range(WIDTH) if c not in channels]
    for before, after, target in zip(original.blocks, model.blocks, masked.blocks, strict=True):
        assert after.num_heads == HEADS and after.proj.in_features == 24
        for name in ("q", "k", "v") if attention is TiedClassAttention else ("qkv",):
            rows = _gone(getattr(before, name).weight[:, kept], getattr(after, name).weight)
            blocks = getattr(before, name).out_features // WIDTH
            dims = sorted({r % 8 for r in rows})
            assert len(dims) == 2 and rows == [b * WIDTH + h * 8 + d for b in range(blocks) for h in range(HEADS) for d in dims]
            layer = getattr(target, name)
            layer.weight.data[rows], layer.bias.data[rows] = 0, 0  # those dimensions of q, k and v: nothing
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)  # equal to the original with what was cut zeroed
    assert count_macs(original, x) / count_macs(model, x) > 1.5


class _Holder:
    """Holds a whole model, as the graph's tracing does: a hook on one layer is a bound method of it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def hook(self, module: nn.Module, args: object) -> None:
        """Does nothing: only what it holds matters here."""


def test_a_trial_copy_of_an_attention_module_shares_the_rest_of_the_model() -> None:
    from torchslim.plugins.prune._head_dims import _copy

    model = Residual(TiedAttention)
    owner = model.blocks[0]
    holder = _Holder(model)
    owner.qkv.register_forward_pre_hook(holder.hook)  # a plain deepcopy copied the holder, so the whole model
    trial = _copy(owner, model)
    (hook,) = trial.qkv._forward_pre_hooks.values()
    assert hook.__self__.model is model and hook.__self__.model.blocks[1] is model.blocks[1]
    assert trial.qkv.weight is not owner.qkv.weight and torch.equal(trial.qkv.weight, owner.qkv.weight)
