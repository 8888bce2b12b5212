"""Attention pruned by whole heads beyond the names torchslim knows: PyTorch's own nn.MultiheadAttention
(inside nn.TransformerEncoderLayer, a small ViT built from them), and heads found from the graph in
attention layers whose names and attributes say nothing (an einsum attention with a chunked projection, a
cross-covariance attention whose heads attend over channels)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim import Registry
from torchslim.engine.macs import count_macs
from torchslim.plugins.prune import StructuredPrune
from torchslim.plugins.prune._mha import PrunedMultiheadAttention, cut_heads, settle

from .conftest import FAST_METRICS, make_ctx
from .torch_vit import loaders, vit

pytestmark = pytest.mark.usefixtures("one_thread")


def as_pruned(layer: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """A copy of ``layer`` running PrunedMultiheadAttention's forward, its weights untouched."""
    copied = copy.deepcopy(layer)
    copied.__class__ = PrunedMultiheadAttention
    return copied


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
@pytest.mark.parametrize("extra", [{}, {"add_bias_kv": True, "add_zero_attn": True}], ids=["plain", "bias_kv-zero_attn"])
@pytest.mark.parametrize("weights", [None, True, False], ids=["no-weights", "averaged", "per-head"])
def test_forward_equals_torchs_on_unpruned_weights(batch_first: bool, extra: dict, weights: bool | None) -> None:
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(24, 4, batch_first=batch_first, **extra).eval()
    ours = as_pruned(layer)
    x = torch.randn(3, 5, 24) if batch_first else torch.randn(5, 3, 24)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, -2:] = True
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    options = {"need_weights": weights is not None, "average_attn_weights": bool(weights)}
    for masks in ({}, {"key_padding_mask": padding}, {"attn_mask": causal, "key_padding_mask": padding}):
        expected, expected_weights = layer(x, x, x, **options, **masks)
        got, got_weights = ours(x, x, x, **options, **masks)
        assert torch.allclose(got, expected, atol=1e-5)
        assert (got_weights is None) == (weights is None)
        if got_weights is not None:
            assert torch.allclose(got_weights, expected_weights, atol=1e-5)


def test_forward_unbatched_and_with_other_key_widths() -> None:
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(24, 4, kdim=10, vdim=12, batch_first=True).eval()
    query, key, value = torch.randn(2, 5, 24), torch.randn(2, 7, 10), torch.randn(2, 7, 12)
    assert torch.allclose(as_pruned(layer)(query, key, value)[0], layer(query, key, value)[0], atol=1e-5)
    layer = nn.MultiheadAttention(24, 4).eval()
    x = torch.randn(5, 24)
    assert torch.allclose(as_pruned(layer)(x, x, x)[0], layer(x, x, x)[0], atol=1e-5)


def zeroed(layer: nn.Module, heads: list[int], size: int) -> nn.Module:
    """A copy of ``layer`` whose attention ignores ``heads``: their output-projection columns zeroed."""
    masked = copy.deepcopy(layer)
    with torch.no_grad():
        for head in heads:
            masked.self_attn.out_proj.weight[:, head * size : (head + 1) * size] = 0
    return masked


def test_cut_heads_in_an_encoder_equal_the_zeroed_heads_on_torchs_fast_path() -> None:
    """Inference with a padding mask takes torch's fused encoder kernel and nested tensors for the unpruned
    layer; the pruned one must leave them and still give the same result."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(24, 4, 48, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    masked = copy.deepcopy(encoder)
    for block in masked.layers:
        block.self_attn.out_proj.weight.data[:, 6:12] = 0
    pruned = copy.deepcopy(encoder)
    for block in pruned.layers:
        cut_heads(block.self_attn, torch.tensor([0, 2, 3]))
    settle(pruned)
    assert all(isinstance(b.self_attn, PrunedMultiheadAttention) for b in pruned.layers)
    assert pruned.layers[0].self_attn.in_proj_weight.shape == (3 * 3 * 6, 24) and not pruned.use_nested_tensor
    x, padding = torch.randn(2, 5, 24), torch.zeros(2, 5, dtype=torch.bool)
    padding[1, -2:] = True
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(x), atol=1e-5)
        got, expected = pruned(x, src_key_padding_mask=padding), masked(x, src_key_padding_mask=padding)
    assert torch.allclose(got[~padding], expected[~padding], atol=1e-5)


def test_macs_count_the_pruned_attention() -> None:
    """Projections, both attention products, output projection: a hand formula, per sample."""
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(40, 5, batch_first=True).eval()
    cut_heads(layer, torch.tensor([1, 3]))
    settle(layer)
    tokens, width, inner = 7, 40, 2 * 8

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    expected = tokens * width * 3 * inner + 2 * tokens * tokens * inner + tokens * inner * width
    assert count_macs(SelfAttention(), torch.randn(3, tokens, width)) == expected


def pruned_vit(amount: float = 0.3) -> tuple[nn.Module, nn.Module, torchslim.Context]:
    original = vit()
    ctx = make_ctx(original, loaders(), evaluate=lambda m: 0.0)
    return original, StructuredPrune(amount=amount).apply(copy.deepcopy(original), ctx), ctx


def test_vit_of_torch_layers_loses_heads_and_width() -> None:
    """Issue 25's bar: a small ViT of nn.TransformerEncoderLayer (192 wide, 6 heads, 4 layers) pruned 30%
    has at least 1.8x fewer MACs; every layer lost whole heads and the residual stream lost channels."""
    original, model, ctx = pruned_vit()
    images = next(iter(loaders()["eval"]))[0]
    assert count_macs(original, images) / count_macs(model, images) >= 1.8
    for block in model.encoder.layers:
        attention = block.self_attn
        assert isinstance(attention, nn.MultiheadAttention) and attention.num_heads == 4 and attention.head_dim == 32
        assert attention.in_proj_weight.shape == (3 * 4 * 32, attention.embed_dim) and attention.embed_dim < 192
        assert block.linear1.in_features == attention.embed_dim == model.head.in_features
    assert ctx.metrics["pruned_heads"] == 8
    with torch.no_grad():
        assert model(images).shape == (images.shape[0], 10)


def test_vit_heads_cut_are_whole() -> None:
    """With the residual stream and feed-forward layers kept, the pruned ViT equals the original with the
    removed heads' output columns zeroed (every kept head keeps its q, k and v rows)."""
    original = vit(layers=2)
    ctx = make_ctx(original, loaders(), evaluate=lambda m: 0.0)
    stage = StructuredPrune(amount=0.3, head_amount=0.5, exclude=["embed", "*linear*", "head"])
    model = stage.apply(copy.deepcopy(original), ctx)
    masked = copy.deepcopy(original)
    for before, after, target in zip(original.encoder.layers, model.encoder.layers, masked.encoder.layers, strict=True):
        rows = before.self_attn.in_proj_weight[:192].view(6, 32, 192)
        kept = after.self_attn.in_proj_weight[:96].view(3, 32, 192)
        gone = [h for h in range(6) if not any(torch.equal(rows[h], k) for k in kept)]
        assert len(gone) == 3
        target.self_attn.out_proj.weight.data[:, [h * 32 + j for h in gone for j in range(32)]] = 0
    images = next(iter(loaders()["eval"]))[0]
    with torch.no_grad():
        assert torch.allclose(model(images), masked(images), atol=1e-4)


def test_vit_run_saves_and_reloads(tmp_path: Path) -> None:
    recipe = {
        "name": "vit",
        "seed": 0,
        "model": {"target": "tests.torch_vit:vit", "kwargs": {"layers": 2}},
        "data": {"target": "tests.torch_vit:loaders"},
        "evaluate": {"metric": "accuracy"},
        "metrics": dict(FAST_METRICS),
        "stages": [{"type": "prune", "method": "structured", "amount": 0.3}],
    }
    registry = Registry.load(autoload=False)
    report = torchslim.run(recipe, tmp_path, registry=registry)
    loaded = torchslim.load_model(tmp_path, registry)
    assert all(type(b.self_attn) is PrunedMultiheadAttention for b in loaded.encoder.layers)
    images = next(iter(loaders()["eval"]))[0]
    with torch.no_grad():
        assert torch.equal(loaded(images), report.model(images))
    assert report.final.metrics["macs"] < report.baseline.metrics["macs"] / 1.5


class EinsumAttention(nn.Module):
    """Self-attention written as users write it: one projection chunked into q, k, v, heads by unflatten."""

    def __init__(self, width: int, n: int, size: int) -> None:
        super().__init__()
        self.n, self.size = n, size
        self.project = nn.Linear(width, 3 * n * size)
        self.merge = nn.Linear(n * size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.n, self.size)) for t in self.project(x).chunk(3, dim=-1))
        attention = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(self.size**-0.5).softmax(dim=-1)
        return self.merge(torch.einsum("bhqk,bkhd->bqhd", attention, v).flatten(2))


class CrossCovariance(nn.Module):
    """XCiT-like attention: heads attend over channels (a head's d x d cross-covariance), a learnt temperature
    per head; the head count held as ``groups``, the input's width and the heads' (equal here) apart."""

    def __init__(self, width: int, groups: int, size: int) -> None:
        super().__init__()
        self.groups, self.size, self.width, self.heads_width = groups, size, width, groups * size
        self.temperature = nn.Parameter(torch.linspace(0.5, 2.0, groups).view(groups, 1, 1))
        self.qkv = nn.Linear(width, 3 * groups * size)
        self.out = nn.Linear(groups * size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.groups, self.size).permute(2, 0, 3, 4, 1).unbind(0)
        attention = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        return self.out((attention.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(batch, tokens, -1))


class Tokens(nn.Module):
    """Two residual blocks of ``attention`` and a feed-forward layer over 6 tokens of 16 features."""

    def __init__(self, attention: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(attention(32, 4, 8) for _ in range(2))
        self.feed = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2))
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for attention, feed in zip(self.blocks, self.feed, strict=True):
            x = x + attention(x)
            x = x + feed(x)
        return self.head(x.mean(dim=1))


@pytest.mark.parametrize(
    ("attention", "count", "projection"),
    [(EinsumAttention, "n", "project"), (CrossCovariance, "groups", "qkv")],
    ids=["einsum-chunked", "cross-covariance"],
)
def test_heads_found_from_the_graph(attention: type[nn.Module], count: str, projection: str) -> None:
    """Heads found by the reshape of the projection's output, whatever the names: the module's count and its
    per-head tensors follow, and the pruned model equals the original with those heads' output zeroed."""
    original = Tokens(attention).eval()
    x = torch.randn(8, 6, 16, generator=torch.Generator().manual_seed(1))
    data = {name: [(x, torch.zeros(8, dtype=torch.long))] for name in ("train", "calibration", "eval")}
    ctx = make_ctx(original, data, evaluate=lambda m: 0.0)
    model = StructuredPrune(amount=0.3, head_amount=0.5, exclude=["embed", "feed*", "head"]).apply(copy.deepcopy(original), ctx)
    assert ctx.metrics["pruned_heads"] == 4
    masked = copy.deepcopy(original)
    for before, after, target in zip(original.blocks, model.blocks, masked.blocks, strict=True):
        assert getattr(after, count) == 2 and getattr(after, projection).out_features == 3 * 2 * 8
        rows = getattr(before, projection).weight[:32].view(4, 8, 16 * 2)
        kept = [
            h for h in range(4) if any(torch.equal(rows[h], r) for r in getattr(after, projection).weight[:16].view(2, 8, 32))
        ]
        assert len(kept) == 2
        if isinstance(after, CrossCovariance):
            assert torch.equal(after.temperature.flatten(), before.temperature.flatten()[kept])
            assert (after.width, after.heads_width, after.size) == (32, 16, 8)
        out = target.merge if isinstance(target, EinsumAttention) else target.out
        for head in set(range(4)) - set(kept):
            out.weight.data[:, head * 8 : (head + 1) * 8] = 0
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)
