"""Attention with per-head tensors pruned by whole heads: the tensors whose channels are the heads themselves
(a relative position bias table of shape [2N-1, heads] in a module of its own, a position MLP ending in one
output per head, a talking-heads mixing of the heads' scores, a gate per head) are cut along with the heads.
Torch-Pruning couples them to the projections and maps the projections' channel indices onto them (scoring
raised IndexError); and a five-dimensional windowed attention product no longer divides its index mapping by
zero. Hand-written models (no timm), random init."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim.plugins.prune import StructuredPrune

from .conftest import make_ctx
from .test_structured_mha import Tokens  # two residual blocks of an attention(32, 4, 8), 6 tokens of 16

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS, HEADS, SIZE = 6, 4, 8


class RelativeBias(nn.Module):
    """A learnt bias per head and relative offset (a relative position bias table), gathered into [heads, N, N]."""

    def __init__(self, tokens: int, heads: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        offsets = torch.arange(tokens)
        self.register_buffer("index", (offsets[:, None] - offsets[None, :] + tokens - 1).flatten(), persistent=False)
        self.tokens = tokens

    def forward(self) -> torch.Tensor:
        return self.table[self.index].view(self.tokens, self.tokens, -1).permute(2, 0, 1)


class BiasedAttention(nn.Module):
    """Fused q/k/v attention whose scores get a relative position bias per head (a child module's table)."""

    def __init__(self, width: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.size = heads, size
        self.qkv = nn.Linear(width, 3 * heads * size)
        self.bias = RelativeBias(TOKENS, heads)
        self.out = nn.Linear(heads * size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.size).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) * self.size**-0.5 + self.bias()
        return self.out((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, -1))


class PositionMlpAttention(BiasedAttention):
    """The bias per head made by a small MLP from the relative offsets (a continuous position bias)."""

    def __init__(self, width: int, heads: int, size: int) -> None:
        super().__init__(width, heads, size)
        del self.bias
        self.position = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, heads))
        offsets = torch.arange(TOKENS, dtype=torch.float32)
        self.register_buffer("offsets", (offsets[:, None] - offsets[None, :]).reshape(-1, 1), persistent=False)

    def bias(self) -> torch.Tensor:  # type: ignore[override]
        return self.position(self.offsets).view(TOKENS, TOKENS, -1).permute(2, 0, 1)


class TalkingHeads(nn.Module):
    """Talking-heads attention: the heads' scores mixed by a Linear(heads, heads) before and after the softmax."""

    def __init__(self, width: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.size = heads, size
        self.qkv = nn.Linear(width, 3 * heads * size)
        self.mix_logits, self.mix_weights = nn.Linear(heads, heads), nn.Linear(heads, heads)
        self.out = nn.Linear(heads * size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.size).permute(2, 0, 3, 1, 4).unbind(0)
        scores = self.mix_logits((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        weights = self.mix_weights(scores.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, tokens, -1))


class GatedPositional(nn.Module):
    """Gated positional attention: separate q/k and v projections; each head blends its content scores with
    positional scores (a Linear from relative offsets to one score per head) by a learnt gate of its own."""

    def __init__(self, width: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.size = heads, size
        self.qk, self.v = nn.Linear(width, 2 * heads * size), nn.Linear(width, heads * size)
        self.positional = nn.Linear(3, heads)
        self.gate = nn.Parameter(torch.linspace(-1.0, 1.0, heads))
        self.out = nn.Linear(heads * size, width)
        offsets = torch.arange(TOKENS, dtype=torch.float32)
        relative = offsets[:, None] - offsets[None, :]
        self.register_buffer("relative", torch.stack([relative, relative.abs(), relative**2], dim=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k = self.qk(x).reshape(batch, tokens, 2, self.heads, self.size).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).reshape(batch, tokens, self.heads, self.size).transpose(1, 2)
        content = (q @ k.transpose(-2, -1) * self.size**-0.5).softmax(dim=-1)
        position = self.positional(self.relative).permute(2, 0, 1).unsqueeze(0).softmax(dim=-1)
        gate = torch.sigmoid(self.gate).view(1, -1, 1, 1)
        weights = (1 - gate) * content + gate * position
        return self.out((weights @ v).transpose(1, 2).reshape(batch, tokens, -1))


def _pruned(attention: type[nn.Module], *exclude: str) -> tuple[nn.Module, nn.Module, dict]:
    original = Tokens(attention).eval()
    x = torch.randn(8, TOKENS, 16, generator=torch.Generator().manual_seed(1))
    data = {name: [(x, torch.zeros(8, dtype=torch.long))] for name in ("train", "calibration", "eval")}
    ctx = make_ctx(original, data, evaluate=lambda m: 0.0)
    model = StructuredPrune(amount=0.3, head_amount=0.5, exclude=["embed", "feed*", "head", *exclude]).apply(
        copy.deepcopy(original), ctx
    )
    return original, model, ctx.metrics


def _kept_heads(before: nn.Module, after: nn.Module, projection: str) -> list[int]:
    """The original heads whose query rows the pruned projection still holds."""
    rows = getattr(before, projection).weight[: HEADS * SIZE].view(HEADS, SIZE, -1)
    left = getattr(after, projection).weight[: 2 * SIZE].view(2, SIZE, -1)
    return [h for h in range(HEADS) if any(torch.equal(rows[h], r) for r in left)]


def _masked(original: nn.Module, model: nn.Module, projection: str) -> tuple[nn.Module, list[list[int]]]:
    """The original with the pruned heads' columns of the output projection zeroed, and each block's kept heads."""
    masked, kept = copy.deepcopy(original), []
    for before, after, target in zip(original.blocks, model.blocks, masked.blocks, strict=True):
        kept.append(_kept_heads(before, after, projection))
        assert len(kept[-1]) == 2 and after.heads == 2
        for head in set(range(HEADS)) - set(kept[-1]):
            target.out.weight.data[:, head * SIZE : (head + 1) * SIZE] = 0
    return masked, kept


def _same(model: nn.Module, masked: nn.Module) -> bool:
    x = torch.randn(8, TOKENS, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(model(x), masked(x), atol=1e-5)


def test_relative_position_table_in_a_child_module_loses_the_pruned_heads_columns() -> None:
    original, model, metrics = _pruned(BiasedAttention)
    assert metrics["pruned_heads"] == 4
    masked, kept = _masked(original, model, "qkv")
    for before, after, heads in zip(original.blocks, model.blocks, kept, strict=True):
        assert torch.equal(after.bias.table, before.bias.table[:, heads])
    assert _same(model, masked)  # a head's bias only reaches that head: cutting it equals zeroing its output


def test_position_mlp_loses_the_pruned_heads_outputs() -> None:
    original, model, metrics = _pruned(PositionMlpAttention, "*.position.0")
    assert metrics["pruned_heads"] == 4
    masked, kept = _masked(original, model, "qkv")
    for before, after, heads in zip(original.blocks, model.blocks, kept, strict=True):
        assert torch.equal(after.position[2].weight, before.position[2].weight[heads])
        assert after.position[0].out_features == 16  # its hidden layer is no head (and excluded)
    assert _same(model, masked)


def test_gated_positional_attention_loses_gates_and_positional_scores_of_the_pruned_heads() -> None:
    original, model, metrics = _pruned(GatedPositional)
    assert metrics["pruned_heads"] == 4
    masked, kept = _masked(original, model, "qk")
    for before, after, heads in zip(original.blocks, model.blocks, kept, strict=True):
        assert torch.equal(after.gate, before.gate[heads]) and after.v.out_features == 2 * SIZE
        assert torch.equal(after.positional.weight, before.positional.weight[heads])
    assert _same(model, masked)


def test_talking_heads_mixing_loses_the_pruned_heads_on_both_ends() -> None:
    """The heads' scores enter the first mixing and leave the second: those ends lose the pruned heads; the
    mixed scores between them stay as many (a mixture is no head). The pruned model equals the original with
    the pruned heads' scores left out of the first mixing and their output zeroed."""
    original, model, metrics = _pruned(TalkingHeads, "*.mix_logits")  # the mixtures between the two ends kept
    assert metrics["pruned_heads"] == 4
    masked, kept = _masked(original, model, "qkv")
    for before, after, target, heads in zip(original.blocks, model.blocks, masked.blocks, kept, strict=True):
        assert torch.equal(after.mix_logits.weight, before.mix_logits.weight[:, heads])
        assert torch.equal(after.mix_weights.weight, before.mix_weights.weight[heads])
        target.mix_logits.weight.data[:, [h for h in range(HEADS) if h not in heads]] = 0
    assert _same(model, masked)


class WindowedAttention(nn.Module):
    """Attention within windows of 3 tokens, as five-dimensional products (batch, windows, heads, tokens, d)."""

    def __init__(self, width: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.size = heads, size
        self.qkv = nn.Linear(width, 3 * heads * size)
        self.out = nn.Linear(heads * size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        windows = x.reshape(batch, tokens // 3, 3, width)
        qkv = self.qkv(windows).reshape(batch, tokens // 3, 3, 3, self.heads, self.size).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)
        weights = (q @ k.transpose(-2, -1) * self.size**-0.5).softmax(dim=-1)
        return self.out((weights @ v).transpose(2, 3).reshape(batch, tokens, -1))


def test_windowed_attention_lists_its_groups_through_the_five_dimensional_products() -> None:
    """Torch-Pruning takes the products' batch broadcast for a grouped-query repeat of 0 and divides by zero
    listing the heads' group; torchslim maps the indices through it unchanged and cuts whole heads."""
    import torch_pruning as tp

    model = Tokens(WindowedAttention).eval()
    x = torch.randn(2, TOKENS, 16)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    with pytest.raises(ZeroDivisionError):
        graph.get_pruning_group(model.blocks[0].qkv, tp.prune_linear_out_channels, list(range(3 * HEADS * SIZE)))
    original, model, metrics = _pruned(WindowedAttention)
    assert metrics["pruned_heads"] == 4
    masked, _ = _masked(original, model, "qkv")
    assert _same(model, masked)
