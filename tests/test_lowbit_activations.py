"""Binary activations (``method: binary, activations: binary``): the sign and its straight-through
gradient, the packed layer's forward, reload, the refusal, and QAT on the digits MLP."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim import Registry
from torchslim.engine.errors import StageError
from torchslim.engine.metrics import accuracy
from torchslim.examples import digits
from torchslim.plugins.quantize import BinaryQuantize
from torchslim.plugins.quantize.activations import binarize
from torchslim.plugins.quantize.formats import Format, quantize
from torchslim.plugins.quantize.layers import LowBitLayer

from .conftest import digits_recipe, make_ctx

BINARY_INPUTS = Format("binary", 1, activations="binary")


def test_the_gradient_passes_the_sign_as_the_clipped_identity() -> None:
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.25, 1.0, 3.0]], requires_grad=True)
    out = binarize(x, (-1,))
    scale = x.detach().abs().mean()
    assert torch.equal(out.detach(), torch.sign(x.detach()) * scale)
    out.sum().backward()
    # d(sign(x) * K)/dx with K a per-sample constant: K where |x| <= 1, 0 outside.
    assert torch.equal(x.grad, scale * torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_layer_computes_on_sign_times_the_samples_mean(kind: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 6) if kind == "linear" else nn.Conv2d(3, 6, 3, padding=1)
    packed = LowBitLayer.convert(layer, BINARY_INPUTS, quantize(layer.weight.reshape(6, -1), BINARY_INPUTS))
    x = torch.randn(4, 16) if kind == "linear" else torch.randn(4, 3, 5, 5)
    dims = (-1,) if kind == "linear" else (1, 2, 3)  # a conv's scale: one per sample, over C x H x W
    fed = torch.sign(x) * x.abs().mean(dims, keepdim=True)
    run = F.linear if kind == "linear" else lambda i, w, b: F.conv2d(i, w, b, padding=1)
    assert torch.equal(packed(x), run(fed, packed.weight(), packed.bias.float()))
    assert not torch.equal(packed(x), run(x, packed.weight(), packed.bias.float()))


def test_run_then_load_model_restores_the_binary_inputs(tmp_path: Path, registry: Registry) -> None:
    stage = {
        "type": "quantize",
        "method": "binary",
        "activations": "binary",
        "keep_ends": "first",
        "train": {"epochs": 1, "lr": 0.01},
    }
    report = torchslim.run(digits_recipe([stage], train_epochs=2), tmp_path / "out", registry=registry)
    loaded = torchslim.load_model(tmp_path / "out", registry)
    assert [m.fmt.activations for m in loaded if isinstance(m, LowBitLayer)] == ["float", "binary", "binary"]
    x = torch.rand(5, 64)
    assert torch.equal(loaded(x), report.model(x))
    assert any(
        "binary activations (sign(x) * mean|x| per sample) into 2, 4; float inputs: 0 (kept at int8)" in n
        and "no XNOR/popcount kernel on this CPU, smaller, not faster" in n
        for n in report.notes
    )


BAD = [
    ({"depth": 0}, {}, r"the binarized layers take only the model's input \(0\); use activations: float"),
    (
        {"depth": 1},
        {"keep_ends": "both"},
        r"every chosen layer is kept at int8 \(keep_ends both\); use activations: float or keep_ends none",
    ),
]


@pytest.mark.parametrize(("model", "options", "message"), BAD, ids=["single-layer", "all-kept-at-int8"])
def test_no_layer_to_take_binary_activations_is_refused(
    tmp_path: Path, registry: Registry, model: dict, options: dict, message: str
) -> None:
    stage = {"type": "quantize", "method": "binary", "activations": "binary", "train": {"epochs": 1}, **options}
    with pytest.raises(StageError) as info:
        torchslim.run(digits_recipe([stage], train_epochs=0, **model), tmp_path / "out", registry=registry)
    text = str(info.value)
    assert "stages[0]" in text and "activations: binary activations need a binarized Linear or Conv2d" in text
    assert re.search(message, text), text
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.fixture(scope="module")
def mlp256() -> nn.Module:
    """The digits MLP of the benchmark (64-256-256-10, 15 epochs: 96.1% on the eval digits)."""
    return digits.mlp(hidden=256, train_epochs=15)


def test_qat_with_binary_activations_learns(mlp256: nn.Module, flat: dict) -> None:
    # Measured: 85.3, 89.7 and 90.3% over three training orders (float32 96.1%, chance 10%); PTQ ~15%.
    stage = BinaryQuantize(activations="binary", keep_ends="first", train={"epochs": 2, "lr": 0.01})
    model = stage.apply(copy.deepcopy(mlp256), make_ctx(mlp256, flat))
    assert accuracy(model.eval(), flat["eval"]) > 70
