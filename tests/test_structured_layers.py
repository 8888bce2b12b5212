"""Structured pruning of layers Torch-Pruning does not fully know: a Conv2d/Linear subclass's own per-channel
tensors are cut along with its weight, and a layer type of the user's own is cut by the pruner named in
``layer_pruners``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import StageError
from torchslim.engine.metrics import count_macs
from torchslim.plugins.prune import LayerPruner, StructuredPrune

from .conftest import make_ctx


class StdConv(nn.Conv2d):
    """A weight-standardized conv with a learned gain per output channel (as normalizer-free networks have):
    Torch-Pruning's conv pruner cuts its weight and bias but not ``gain``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(flat, None, None, weight=self.gain.view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding)


class ScaledInput(nn.Linear):
    """A Linear scaling each of its inputs by a learned factor: a tensor shaped by its input features."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__(features, out)
        self.scale = nn.Parameter(torch.rand(features) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.scale, self.weight, self.bias)


class NormFree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = StdConv(1, 16), StdConv(16, 32)
        self.hidden = ScaledInput(32, 24)
        self.classifier = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3))
        return self.classifier(torch.relu(self.hidden(x)))


def test_a_conv_subclass_loses_its_gain_rows_with_its_channels(images: dict) -> None:
    torch.manual_seed(0)
    model = NormFree().eval()
    original, ctx = copy.deepcopy(model), make_ctx(model, images)
    stage = StructuredPrune(amount=0.3)
    out = stage.apply(model, ctx)
    x = ctx.example_inputs
    assert out.conv1.out_channels < 16 and out.conv2.out_channels < 32 and out.hidden.out_features < 24
    assert out.conv1.gain.shape == (out.conv1.out_channels, 1, 1, 1)
    assert out.conv2.gain.shape == (out.conv2.out_channels, 1, 1, 1)
    assert out.hidden.scale.shape == (out.conv2.out_channels,)  # cut with its input features
    assert ctx.metrics["pruned_channels"] == pytest.approx(0.3, abs=0.05)
    assert count_macs(original, x[:1]) / count_macs(out, x[:1]) >= 1.4
    json.dumps(ctx.restore_record)
    rebuilt = stage.restore(NormFree().eval(), ctx.restore_record)
    rebuilt.load_state_dict(out.state_dict(), strict=True)
    assert torch.equal(rebuilt(x), out(x))


def test_the_kept_gains_are_the_kept_channels_own() -> None:
    from torchslim.plugins.prune._structured import ChannelOptions, ChannelState, prune_step

    torch.manual_seed(0)
    model = NormFree().eval()
    gains = model.conv2.gain.detach().flatten().clone()
    biases = model.conv2.bias.detach().clone()  # distinct values: they tell which channels were kept
    prune_step(model, torch.randn(2, 1, 8, 8), 0.3, ChannelOptions("layer", 1, 1, 0.9, []), ChannelState())
    kept = [int((biases - bias).abs().argmin()) for bias in model.conv2.bias.detach()]
    assert len(kept) < 32 and torch.equal(model.conv2.gain.detach().flatten(), gains[kept])


class GainConv(nn.Module):
    """A conv layer of the user's own (not an nn.Conv2d): its weight and a per-channel gain, applied by hand."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)
        self.gain = nn.Parameter(torch.rand(cout) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1) * self.gain.view(1, -1, 1, 1)


class GainConvPruner:
    """How torchslim cuts a :class:`GainConv`'s channels (named in ``layer_pruners``)."""

    def out_channels(self, layer: GainConv) -> int:
        return int(layer.weight.shape[0])

    def in_channels(self, layer: GainConv) -> int:
        return int(layer.weight.shape[1])

    def keep_out(self, layer: GainConv, kept: torch.Tensor) -> None:
        layer.weight = nn.Parameter(layer.weight.data[kept].clone())
        layer.gain = nn.Parameter(layer.gain.data[kept].clone())

    def keep_in(self, layer: GainConv, kept: torch.Tensor) -> None:
        layer.weight = nn.Parameter(layer.weight.data[:, kept].clone())


class OwnLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.own = GainConv(1, 16)
        self.norm = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.norm(self.own(x)))))
        return self.classifier(x.mean(dim=(2, 3)))


PRUNERS = {f"{__name__}:GainConv": f"{__name__}:GainConvPruner"}


def test_a_users_own_layer_is_cut_by_the_pruner_named_for_it(images: dict) -> None:
    assert isinstance(GainConvPruner(), LayerPruner)
    torch.manual_seed(0)
    model = OwnLayers().eval()
    ctx = make_ctx(model, images)
    stage = StructuredPrune(amount=0.4, scope="layer", layer_pruners=PRUNERS)
    out = stage.apply(model, ctx)
    channels = out.own.weight.shape[0]
    assert channels < 16 and out.own.gain.shape == (channels,) and out.norm.num_features == channels
    assert out.conv.in_channels == channels and out.conv.out_channels < 16
    rebuilt = stage.restore(OwnLayers().eval(), ctx.restore_record)
    rebuilt.load_state_dict(out.state_dict(), strict=True)
    x = ctx.example_inputs
    assert torch.equal(rebuilt.eval()(x), out(x))


@pytest.mark.parametrize(
    ("pruners", "expected"),
    [
        ({f"{__name__}:GainConvPruner": f"{__name__}:GainConvPruner"}, "is not an nn.Module class"),
        ({f"{__name__}:GainConv": f"{__name__}:OwnLayers"}, "built a OwnLayers, which lacks out_channels"),
        ({f"{__name__}:GainConv": f"{__name__}:GainConvPrunr"}, "has no attribute 'GainConvPrunr'"),
    ],
    ids=["layer-not-a-module", "pruner-not-a-pruner", "misspelt"],
)
def test_an_unusable_layer_pruner_is_a_stage_error(images: dict, pruners: dict[str, str], expected: str) -> None:
    model = OwnLayers().eval()
    with pytest.raises(StageError, match="layer_pruners") as info:
        StructuredPrune(amount=0.4, layer_pruners=pruners).apply(model, make_ctx(model, images))
    assert expected in str(info.value)
