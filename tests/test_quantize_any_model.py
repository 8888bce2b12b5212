"""int8 on models whose own code reads their layers (``fc.weight.device``, torch's TransformerEncoderLayer
fast path), and the MACs of a quantized U-Net: each through ``torchslim.run`` with ``--out`` and reloaded."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.engine.macs import count_macs
from torchslim.examples import digits
from torchslim.plugins.quantize import DynamicQuantize
from torchslim.plugins.quantize._ao import FxBackend
from torchslim.plugins.quantize._backends import STATIC_TYPES, StaticOptions, is_torch_quantized

from .conftest import FAST_METRICS, make_ctx
from .test_quantize_models import _run_and_reload


class ReadsWeights(nn.Module):
    """A model whose forward reads its layers' weights: ``fc.weight.device`` (metadata, fc still runs) and
    ``F.linear(h, proj.weight * scale)`` (computes with proj's weight: proj itself never runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.proj = nn.Linear(32, digits.CLASSES)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1)
        h = F.relu(self.fc(h[:, : self.fc.in_features].to(self.fc.weight.device)))  # reads sizes and weight
        return F.linear(h, self.proj.weight * self.scale, self.proj.bias)


def reads_weights() -> ReadsWeights:
    torch.manual_seed(0)
    model = ReadsWeights()
    digits.fit(model, digits.loaders(image=True)["train"], 1)
    return model.eval()


class ReadsDevice(nn.Module):
    """A forward torch.fx traces that reads ``fc.weight.device`` (timm's edgenext does, for its position encoding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, digits.CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1)
        return self.fc(h.to(self.fc.weight.device))


def reads_device() -> ReadsDevice:
    torch.manual_seed(0)
    model = ReadsDevice()
    digits.fit(model, digits.loaders(image=True)["train"], 1)
    return model.eval()


class RowEncoder(nn.Module):
    """The 8 x 8 digits as 8 rows of 8 pixels through torch's own transformer encoder layers."""

    def __init__(self, batch_first: bool, stacked: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if stacked else layer
        self.head = nn.Linear(32, digits.CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.embed(x.view(x.shape[0], 8, 8))
        rows = rows if self.batch_first else rows.transpose(0, 1)
        out = self.encoder(rows)
        return self.head(out.mean(dim=1 if self.batch_first else 0))


def row_encoder(batch_first: bool = True, stacked: bool = False) -> RowEncoder:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." for batch_first False
        return RowEncoder(batch_first, stacked).eval()


class UNet(nn.Module):
    """Conv down, ConvTranspose up, a skip concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Conv2d(3, 8, 3, padding=1)
        self.down2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.down1(x))
        return self.out(torch.cat([skip, self.up(F.relu(self.down2(skip)))], dim=1))


def _recipe(factory: str, stage: dict[str, Any], image: bool, **kwargs: Any) -> dict[str, Any]:
    return {
        "name": "reads",
        "seed": 0,
        "metrics": dict(FAST_METRICS),
        "evaluate": {"metric": "accuracy"},
        "model": {"target": f"tests.test_quantize_any_model:{factory}", "kwargs": kwargs},
        "data": {"target": "torchslim.examples.digits:loaders", "kwargs": {"image": image}},
        "stages": [{"type": "quantize", **stage}],
    }


class Branches(nn.Module):
    """A Linear the model computes with itself (``F.linear(h, proj.weight)``), one on a branch the inputs never
    take (``rare``), and one it calls (``fc``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.proj = nn.Linear(16, digits.CLASSES)
        self.rare = nn.Linear(16, digits.CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return self.rare(h) if bool(x.isnan().any()) else F.linear(h, self.proj.weight, self.proj.bias)


def test_dynamic_leaves_float_only_the_layers_the_model_computes_with_itself() -> None:
    torch.manual_seed(0)
    model, data = Branches().eval(), digits.loaders()
    ctx = make_ctx(model, data)
    quantized = DynamicQuantize().apply(model, ctx)
    assert type(quantized.proj) is nn.Linear  # bypassed: its weight is used, its forward never runs
    assert quantized.fc.weight().dtype == torch.qint8 and quantized.rare.weight().dtype == torch.qint8
    assert ctx.restore_record["bypassed"] == ["proj"]
    assert any("computes with their weights itself" in note and note.endswith(": proj") for note in ctx.notes)


def _images() -> torch.Tensor:
    return next(iter(digits.loaders(image=True)["eval"]))[0]


def _rows() -> torch.Tensor:
    return next(iter(digits.loaders()["eval"]))[0]


def test_static_eager_keeps_the_weights_the_model_reads(tmp_path: Path) -> None:
    stage = {"method": "static", "calibration_batches": 4}
    report, loaded = _run_and_reload(tmp_path, _recipe("reads_weights", stage, image=True), _images())
    notes = " ".join(report.notes)
    assert "eager mode, layer by layer" in notes  # FX's graph read the packed layer's weight() method
    assert "the model computes with their weights itself and never calls them" in notes and ": proj" in notes
    assert report.final.metrics["quantized_layers"] == 2  # conv and fc: int8; proj computed by F.linear: float
    assert type(loaded.proj) is nn.Linear
    assert loaded.fc.weight.shape == (32, 128) and loaded.fc.in_features == 128
    assert report.final.metrics["accuracy"] >= report.baseline.metrics["accuracy"] - 3.0


def test_static_graph_reading_a_weight_stays_one_int8_graph(tmp_path: Path) -> None:
    stage = {"method": "static", "calibration_batches": 4}
    report, loaded = _run_and_reload(tmp_path, _recipe("reads_device", stage, image=True), _images())
    assert isinstance(loaded, torch.fx.GraphModule) and not any("eager mode" in n for n in report.notes)
    assert report.final.metrics["quantized_layers"] == 2
    assert loaded.fc.weight.device.type == "cpu" and loaded.fc.weight().dtype == torch.qint8


def _ops(model: nn.Module, inputs: torch.Tensor) -> set[str]:
    """The aten / quantized ops the model's forward dispatches (no hook on the model: hooks turn torch's
    fused transformer path off by themselves)."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(inputs)
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("stacked", [False, True], ids=["layer", "encoder"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_dynamic_transformer_encoder_runs_its_int8_layers(tmp_path: Path, batch_first: bool, stacked: bool) -> None:
    inputs = _rows()
    assert "aten::_transformer_encoder_layer_fwd" in _ops(row_encoder(batch_first, stacked), inputs) or not batch_first
    recipe = _recipe("row_encoder", {"method": "dynamic"}, image=False, batch_first=batch_first, stacked=stacked)
    report, loaded = _run_and_reload(tmp_path, recipe, inputs)
    layers = 2 if stacked else 1
    # embed, head, and each encoder layer's linear1 and linear2 (torch never converts attention's out_proj)
    assert report.final.metrics["quantized_layers"] == 2 + 2 * layers
    ops = _ops(loaded, inputs)
    assert "aten::_transformer_encoder_layer_fwd" not in ops  # no float fused path behind the int8 layers' back
    assert "quantized::linear_dynamic" in ops
    first = loaded.encoder.layers[0] if stacked else loaded.encoder
    assert first.linear1.weight.device.type == "cpu" and first.linear1.weight().dtype == torch.qint8
    assert abs(report.final.metrics["accuracy"] - report.baseline.metrics["accuracy"]) < 5.0


def test_quantized_unet_counts_the_macs_of_its_float_model() -> None:
    torch.manual_seed(0)
    model, inputs = UNet().eval(), torch.randn(4, 3, 16, 16)
    options = StaticOptions("x86", STATIC_TYPES, ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation
        quantized = FxBackend().quantize(model, inputs, [inputs], options).model
    assert any(is_torch_quantized(m) and "ConvTranspose2d" in type(m).__name__ for m in quantized.modules())
    up = (16 * 8 * 8) * 8 * (2 * 2)  # each input element of the transposed conv x out_channels x kernel
    convs = (8 * 16 * 16) * 3 * 9 + (16 * 8 * 8) * 8 * 9 + (2 * 16 * 16) * 16  # output elements x in_channels x kernel
    assert count_macs(model, inputs) == up + convs
    assert count_macs(quantized, inputs) == up + convs


class StringPadding(nn.Module):
    """Convolutions padded by a string: ``"same"`` (odd kernel, dilated, depthwise), ``"valid"``, and a ``"same"``
    with an even kernel, which pads one more on one side."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding="same")
        self.dilated = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=8)
        self.valid = nn.Conv2d(8, 8, 3, padding="valid")
        self.even = nn.Conv2d(8, 8, 2, padding="same")
        self.fc = nn.Linear(8, digits.CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = x + F.relu(self.dilated(x))
        return self.fc(F.relu(self.even(F.relu(self.valid(x)))).mean(dim=(2, 3)))


def string_padding() -> StringPadding:
    """An untrained :class:`StringPadding` (a model factory for recipes)."""
    torch.manual_seed(0)
    return StringPadding().eval()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_static_int8_takes_convolutions_padded_by_a_string(tmp_path: Path) -> None:
    stage = {"method": "static", "calibration_batches": 4}
    report, loaded = _run_and_reload(tmp_path, _recipe("string_padding", stage, image=True), _images())
    assert report.final.metrics["quantized_layers"] == 4  # conv, dilated, valid and fc; even stays float
    assert not is_torch_quantized(loaded.even)  # float (fused with its ReLU)
    assert "convolutions left float: even (padding='same' pads one more on one side" in " ".join(report.notes)
    assert report.final.metrics["accuracy"] >= report.baseline.metrics["accuracy"] - 10.0
