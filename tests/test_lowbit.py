"""Below int8: binary, ternary, k-bit and float8 weights, packed storage, reload, QAT, bad input."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim
from torchslim import Registry, load_recipe
from torchslim.engine.errors import StageError
from torchslim.engine.metrics import accuracy, size_bytes
from torchslim.plugins.quantize import BinaryQuantize, KbitQuantize, QuantizeStage, TernaryQuantize
from torchslim.plugins.quantize.formats import Format, fake_quantize, quantize
from torchslim.plugins.quantize.layers import LowBitLayer
from torchslim.plugins.quantize.packing import pack, unpack

from .conftest import digits_recipe, make_ctx

FORMATS = [
    Format("binary", 1),
    Format("ternary", 2),
    *(Format("int", b) for b in range(2, 9)),
    *(Format("int", b, grid=g) for b in (2, 3) for g in ("midrise", "skewed")),
    Format("int", 3, symmetric=False, group_size=8),
    Format("float8", 8),
    Format("float8", 8, float8="float8_e5m2"),
]


def _id(fmt: Format) -> str:
    return fmt.describe().replace(" ", "")


@pytest.mark.parametrize("bits", range(1, 9), ids=[f"{b}bit" for b in range(1, 9)])
def test_packing_round_trip_is_bit_exact_and_dense(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (1003,), dtype=torch.uint8)
    stream = pack(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == -(-1003 * bits // 8)
    assert torch.equal(unpack(stream, bits, 1003), codes)


@pytest.mark.parametrize("fmt", FORMATS, ids=[_id(f) for f in FORMATS])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_saved_layer_reloads_with_identical_codes_and_outputs(fmt: Format, kind: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 6) if kind == "linear" else nn.Conv2d(2, 6, 2, padding=1)
    q = quantize(layer.weight.reshape(6, -1), fmt)
    packed = LowBitLayer.convert(layer, fmt, q)
    buffer = io.BytesIO()
    torch.save(packed.state_dict(), buffer)
    buffer.seek(0)
    loaded = LowBitLayer(layer, fmt)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(loaded.qweight().codes.view(torch.uint8), q.codes.view(torch.uint8))
    x = torch.randn(3, 16) if kind == "linear" else torch.randn(3, 2, 5, 5)
    assert torch.equal(loaded(x), packed(x))


def _old_grid(weight: torch.Tensor, bits: int) -> torch.Tensor:
    # kbit's only grid before issue 23, written out: codes -2**(b-1)..2**(b-1)-1 times 2 max|w| / (2**b - 1).
    step = 2 * weight.abs().amax(1, keepdim=True) / (2**bits - 1)
    return (weight / step).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step


def _rounded(weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    return LowBitLayer.convert(nn.Linear(weight.shape[1], weight.shape[0]), fmt, quantize(weight, fmt)).weight()


@pytest.mark.parametrize("bits", [2, 3], ids=lambda b: f"{b}bit")
def test_kbit_default_grid_rounds_low_bit_weights_closer_than_the_old_grid(bits: int) -> None:
    # Issue 23: at 2 bits the old grid stored +max as 2/3 max, -max as -4/3 max, and most weights as 0.
    torch.manual_seed(0)
    weight = torch.distributions.Laplace(0.0, 0.05).sample((16, 256))  # heavy-tailed, like trained weights
    weight[:, :8] = 0  # pruned weights stay zero
    rounded = _rounded(weight, KbitQuantize(bits=bits).layer_format())
    old = _old_grid(weight, bits)
    assert (rounded - weight).square().sum() < 0.7 * (old - weight).square().sum()
    assert bool((rounded[:, :8] == 0).all())


@pytest.mark.parametrize("grid", ["narrow", "midrise"])
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_narrow_and_midrise_grids_keep_both_extremes_of_every_group(grid: str, bits: int) -> None:
    weight = torch.tensor([[0.5, -0.5, 0.1, 0.0, 2.0, -2.0, 0.3, 1.0], [-3.0, 3.0, 1.0, 0.0, 0.7, 0.0, 0.0, -0.7]])
    rounded = _rounded(weight, KbitQuantize(bits=bits, grid=grid, group_size=4).layer_format())
    groups = weight.view(2, 2, 4)
    extremes = groups.abs() == groups.abs().amax(2, keepdim=True)
    assert torch.allclose(rounded.view_as(groups)[extremes], groups[extremes], rtol=1e-3)


@pytest.mark.parametrize("grid", ["narrow", "midrise", "skewed", "mse"])
def test_each_grid_has_its_documented_levels_at_2_bits(grid: str) -> None:
    weight = torch.linspace(-1, 1, 201).view(1, -1)
    levels = torch.unique(_rounded(weight, KbitQuantize(bits=2, grid=grid).layer_format()))
    if grid == "mse":  # four levels -2..1 times one step, no wider than skewed's
        step = levels[-1]
        assert len(levels) == 4 and 0 < step <= 2 / 3 and torch.allclose(levels, torch.arange(-2.0, 2.0) * step)
        return
    expected = {"narrow": [-1, 0, 1], "midrise": [-1, -1 / 3, 1 / 3, 1], "skewed": [-4 / 3, -2 / 3, 0, 2 / 3]}[grid]
    assert torch.allclose(levels, torch.tensor(expected, dtype=torch.float32), atol=1e-3)


def test_grid_applies_to_symmetric_formats_only(registry: Registry) -> None:
    asymmetric = load_recipe(digits_recipe([{"type": "quantize", "method": "kbit", "symmetric": False}]), registry)
    load_recipe(asymmetric.resolved(), registry)  # as saved beside a model: every default written out
    with pytest.raises(torchslim.RecipeError, match=r"stages\[0\]\.grid \(quantize\): grid applies to symmetric: true"):
        load_recipe(digits_recipe([{"type": "quantize", "method": "kbit", "symmetric": False, "grid": "narrow"}]), registry)


def test_binary_weights_are_sign_times_channel_mean() -> None:
    layer = nn.Linear(64, 8)
    w = layer.weight.detach()
    packed = LowBitLayer.convert(layer, Format("binary", 1), quantize(w, Format("binary", 1)))
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)
    assert torch.allclose(packed.weight(), expected, rtol=1e-3)
    assert packed.codes.numel() == 64 * 8 // 8  # eight weights per byte


def test_ste_passes_the_gradient_through_the_rounding() -> None:
    weight = torch.randn(4, 8, requires_grad=True)
    out = fake_quantize(weight, Format("int", 2))
    assert len(torch.unique(out.detach()[0])) <= 4  # rounded in the forward pass
    (out * torch.arange(8.0)).sum().backward()
    assert torch.equal(weight.grad, torch.arange(8.0).expand(4, 8))


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_ste_of_mean_scaled_formats_also_trains_through_the_scale(kind: str) -> None:
    weight = torch.randn(4, 8, requires_grad=True)
    fmt = Format(kind, 1 if kind == "binary" else 2)
    out = fake_quantize(weight, fmt)
    assert torch.equal(out.detach(), LowBitLayer.convert(nn.Linear(8, 4), fmt, quantize(weight, fmt)).weight().float())
    out.sum().backward()
    assert weight.grad is not None and bool(torch.isfinite(weight.grad).all()) and not torch.equal(weight.grad, torch.ones(4, 8))


def _acc(model: nn.Module, flat: dict) -> float:
    return accuracy(model.eval(), flat["eval"])


def test_qat_improves_on_ptq_at_2_bits(trained_mlp: nn.Module, flat: dict) -> None:
    ptq = KbitQuantize(bits=2).apply(copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat))
    qat = KbitQuantize(bits=2, train={"epochs": 3, "lr": 0.003}).apply(copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat))
    assert _acc(qat, flat) > _acc(ptq, flat) + 2
    assert not any(p.requires_grad for p in qat.parameters())  # converted: packed buffers only


def test_qat_keeps_pruned_zeros_zero(trained_mlp: nn.Module, flat: dict) -> None:
    pruned = copy.deepcopy(trained_mlp)
    with torch.no_grad():
        pruned[0].weight[:, :32] = 0
    ternary = TernaryQuantize(train={"epochs": 1}).apply(pruned, make_ctx(pruned, flat))
    assert bool((ternary[0].weight()[:, :32] == 0).all())


def test_keep_ends_names_the_int8_layers(trained_mlp: nn.Module, flat: dict) -> None:
    ctx = make_ctx(trained_mlp, flat)
    model = BinaryQuantize(keep_ends="both").apply(copy.deepcopy(trained_mlp), ctx)
    assert [m.fmt.kind for m in model if isinstance(m, LowBitLayer)] == ["int", "binary", "int"]
    assert any("kept at int8 (keep_ends both): 0, 4" in note for note in ctx.notes)
    assert any("smaller, not faster on this CPU" in note for note in ctx.notes)


def test_packed_file_is_really_smaller(trained_mlp: nn.Module, flat: dict) -> None:
    base = size_bytes(trained_mlp)
    binary = BinaryQuantize().apply(copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat))
    four = KbitQuantize(bits=4).apply(copy.deepcopy(trained_mlp), make_ctx(trained_mlp, flat))
    assert size_bytes(binary) < size_bytes(four) < base / 3


class Scaled(nn.Linear):
    """A Linear subclass with its own forward: it must stay float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Plain(nn.Conv2d):
    """A Conv2d subclass without its own forward: it is converted."""


def test_subclasses_are_converted_unless_they_change_forward(flat: dict) -> None:
    model = nn.Sequential(Plain(1, 4, 3), nn.Flatten(), Scaled(144, 10))
    ctx = make_ctx(model, {k: [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))] for k in flat})
    out = KbitQuantize(bits=4).apply(model, ctx)
    assert isinstance(out[0], LowBitLayer) and isinstance(out[2], Scaled)
    assert any("2 stays float: Scaled has its own forward" in note for note in ctx.notes)


RUNS = [
    {"method": "binary", "keep_ends": "last"},
    {"method": "ternary"},
    pytest.param(
        {"method": "kbit", "bits": 3, "symmetric": False, "group_size": 16, "rounding": "gptq"},
        marks=pytest.mark.slow,
        id="kbit3-gptq",
    ),
    pytest.param({"method": "float8", "dtype": "float8_e5m2"}, marks=pytest.mark.slow, id="float8"),
    pytest.param({"method": "kbit", "bits": 8, "train": {"epochs": 1}}, marks=pytest.mark.slow, id="int8-qat"),
]


@pytest.mark.parametrize("options", RUNS, ids=["binary", "ternary", "kbit3-gptq", "float8", "int8-qat"])
def test_run_then_load_model_gives_identical_outputs(tmp_path: Path, registry: Registry, options: dict) -> None:
    report = torchslim.run(digits_recipe([{"type": "quantize", **options}], train_epochs=2), tmp_path / "out", registry=registry)
    loaded = torchslim.load_model(tmp_path / "out", registry)
    x = torch.rand(5, 64)
    assert torch.equal(loaded(x), report.model(x))
    saved, again = report.model.state_dict(), loaded.state_dict()
    assert all(
        torch.equal(
            saved[k].view(torch.uint8) if saved[k].dtype.itemsize == 1 else saved[k],
            again[k].view(torch.uint8) if again[k].dtype.itemsize == 1 else again[k],
        )
        for k in saved
    )


def test_a_save_from_before_grids_reloads_on_the_grid_it_was_made_with(tmp_path: Path, registry: Registry) -> None:
    stage = {"type": "quantize", "method": "kbit", "bits": 2, "grid": "skewed"}
    report = torchslim.run(digits_recipe([stage], train_epochs=2), tmp_path / "out", registry=registry)
    saved = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    layers = saved["structure"][0]["layers"]
    assert {f["grid"] for f in layers.values()} == {"skewed"}  # a new record names its grid
    for fmt in layers.values():
        del fmt["grid"]  # as every record written before grids were an option
    torch.save(saved, tmp_path / "out" / "model.pt")
    loaded = torchslim.load_model(tmp_path / "out", registry)
    assert [m.fmt.grid for m in loaded.modules() if isinstance(m, LowBitLayer)] == ["skewed"] * 3
    x = torch.rand(5, 64)
    assert torch.equal(loaded(x), report.model(x))


BAD = [
    ({"method": "kbit", "bits": 1}, "bits", "bits must be 2..8, not 1"),
    ({"method": "kbit", "bits": 9}, "bits", "bits must be 2..8, not 9"),
    ({"method": "kbit", "damp": 0.1}, "damp", "damp applies to rounding gptq only"),
    ({"method": "ternary", "bits": 2}, "bits", "'bits' does not apply to method ternary"),
]


@pytest.mark.parametrize(("options", "option", "message"), BAD, ids=[str(sorted(o.items())) for o, _, _ in BAD])
def test_bad_options_point_at_the_recipe(registry: Registry, options: dict, option: str, message: str) -> None:
    with pytest.raises(torchslim.RecipeError) as info:
        load_recipe(digits_recipe([{"type": "quantize", **options}]), registry)
    assert f"stages[0].{option} (quantize): {message}" in str(info.value)


def test_group_size_must_divide_every_layer_and_nothing_is_written(tmp_path: Path, registry: Registry) -> None:
    recipe = digits_recipe([{"type": "quantize", "method": "kbit", "group_size": 48}], train_epochs=0)
    with pytest.raises(StageError, match=r"group_size 48 does not divide the 64 input features of layer '0' \(Linear\)"):
        torchslim.run(recipe, tmp_path / "out", registry=registry)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_qat_without_trainable_layer_is_refused(trained_mlp: nn.Module, flat: dict) -> None:
    frozen = copy.deepcopy(trained_mlp).requires_grad_(False)
    with pytest.raises(StageError, match="train: none of the 3 chosen layers has a trainable float weight"):
        QuantizeStage.from_options(method="ternary", train={"epochs": 1}).apply(frozen, make_ctx(frozen, flat))
