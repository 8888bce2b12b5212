"""torch's int4 kernel in 4-bit ``kbit`` Linear layers: its outputs, the forced and automatic choice,
reload, and the options it refuses."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchslim
from torchslim import Registry, load_recipe
from torchslim.engine.errors import StageError
from torchslim.plugins.quantize import KbitQuantize
from torchslim.plugins.quantize.formats import Format, quantize
from torchslim.plugins.quantize.int4pack import available
from torchslim.plugins.quantize.layers import LowBitLayer

from .conftest import digits_recipe, make_ctx

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no int4 CPU kernel")

FORMATS = [
    Format("int", 4),
    Format("int", 4, symmetric=False, group_size=32),
    Format("int", 4, group_size=64),
    Format("int", 4, grid="midrise"),
    Format("int", 4, grid="skewed", group_size=32),
]


def _packed(fmt: Format, kernel: str = "int4pack") -> LowBitLayer:
    torch.manual_seed(0)
    layer = nn.Linear(128, 32)
    fmt = Format(**{**fmt.record(), "kernel": kernel})
    return LowBitLayer.convert(layer, fmt, quantize(layer.weight, fmt))


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.describe().replace(" ", "") for f in FORMATS])
def test_int4_kernel_matches_dequantizing_within_bfloat16(fmt: Format) -> None:
    layer = _packed(fmt)
    x = torch.randn(3, 7, 128)
    fast, exact = layer(x), layer.run(x, "dequantize")
    assert fast.shape == exact.shape == (3, 7, 32) and fast.dtype == torch.float32
    assert not torch.equal(fast, exact)  # the kernel really ran (bfloat16 inputs)
    assert (fast - exact).abs().max() <= 0.02 * exact.abs().max()  # bfloat16: 8 bits of mantissa
    assert torch.equal(layer(x), fast)  # the same outputs call after call


def test_inputs_that_need_a_gradient_are_dequantized() -> None:
    layer = _packed(FORMATS[0])
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).sum().backward()  # the int4 kernel has no backward: the float path runs
    assert x.grad is not None and torch.equal(layer(x), layer.run(x, "dequantize"))


def test_loading_new_codes_rebuilds_the_kernel_layout() -> None:
    first, other = _packed(FORMATS[0]), _packed(FORMATS[0])
    with torch.no_grad():
        other.scale.mul_(2)
    x = torch.randn(2, 128)
    before = first(x)
    first.load_state_dict(other.state_dict())
    assert torch.equal(first(x), other(x)) and not torch.equal(first(x), before)


def test_forced_int4pack_runs_and_reloads_identically(tmp_path: Path, registry: Registry) -> None:
    stage = {"type": "quantize", "method": "kbit", "bits": 4, "kernel": "int4pack"}
    report = torchslim.run(digits_recipe([stage], train_epochs=2), tmp_path / "out", registry=registry)
    loaded = torchslim.load_model(tmp_path / "out", registry)
    assert [m.fmt.kernel for m in loaded if isinstance(m, LowBitLayer)] == ["int4pack", "int4pack", "dequantize"]
    x = torch.rand(5, 64)
    assert torch.equal(loaded(x), report.model(x))
    assert any(
        "int4pack for 0, 2 (forced, not timed); dequantize for 4 (out_features 10 is not a multiple of 16)" in note
        for note in report.notes
    )
    assert report.rows[-1].metrics["macs"] == report.rows[0].metrics["macs"]  # the kernel's products are counted


def test_auto_times_the_kernels_and_the_note_names_each_layers(trained_mlp: nn.Module, flat: dict) -> None:
    ctx = dataclasses.replace(make_ctx(trained_mlp, flat), latency_batch=8, threads=1)  # the recipe's metrics
    model = KbitQuantize(bits=4).apply(copy.deepcopy(trained_mlp), ctx)
    kernels = {name: m.fmt.kernel for name, m in model.named_modules() if isinstance(m, LowBitLayer)}
    note = next(n for n in ctx.notes if "kernels (auto, timed per layer shape at batch 8, 1 thread(s))" in n)
    for name, kernel in kernels.items():
        assert re.search(rf"{kernel} for ([\d, ]*\b)?{name}\b", note), note
    assert kernels["4"] == "dequantize" and "the dequantizing path's speed" in note


def test_forced_int4pack_without_a_layer_it_can_run_is_refused(flat: dict) -> None:
    model = nn.Sequential(nn.Linear(64, 10))
    with pytest.raises(StageError, match=r"kernel: int4pack: no chosen layer can run torch's int4 kernel \(0: out_"):
        KbitQuantize(bits=4, kernel="int4pack").apply(model, make_ctx(model, flat))


BAD = [
    ({"bits": 3, "kernel": "int4pack"}, "kernel", "kernel int4pack is torch's 4-bit kernel: it needs bits 4, not 3"),
    ({"group_size": 16, "kernel": "int4pack"}, "kernel", "kernel int4pack takes group_size 32, 64, 128, 256 or null"),
    ({"kernel": "fast"}, "kernel", "Input should be 'auto', 'int4pack' or 'dequantize'"),
]


@pytest.mark.parametrize(("options", "option", "message"), BAD, ids=["bits3", "group16", "unknown"])
def test_bad_kernel_options_point_at_the_recipe(registry: Registry, options: dict, option: str, message: str) -> None:
    with pytest.raises(torchslim.RecipeError) as info:
        load_recipe(digits_recipe([{"type": "quantize", "method": "kbit", **options}]), registry)
    assert f"stages[0].{option} (quantize): {message}" in str(info.value)


def test_forced_int4pack_is_refused_before_gptq_and_training(flat: dict) -> None:
    """The refusal comes before the calibration data and the train data are read, not after."""

    class Unread:
        def __iter__(self) -> Any:
            raise AssertionError("the data was read before the kernel was refused")

    model = nn.Sequential(nn.Linear(64, 10))
    data = {**flat, "train": Unread(), "calibration": Unread()}
    stage = KbitQuantize(bits=4, kernel="int4pack", rounding="gptq", train={"epochs": 1})
    with pytest.raises(StageError, match=r"kernel: int4pack: no chosen layer can run torch's int4 kernel \(0: out_"):
        stage.apply(model, make_ctx(model, data))
