"""Structured pruning of a forward that branches on its data: the layers of the branch the example inputs did not
take are traced on calibration inputs that take it, or, where none does, probed on the tensors they could read;
either way the pruned model runs down both branches."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim import Registry
from torchslim.examples import digits
from torchslim.plugins.prune._structured import ChannelOptions, ChannelState, prune_step
from torchslim.plugins.prune._structured_branches import find_reach

from .conftest import FAST_METRICS


class Switch(nn.Module):
    """A stem, then one of two branches chosen by the sign of the input's sum (the digits are never negative, so
    only a negated image takes ``deep``), both writing the channels the head reads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.shallow = nn.Conv2d(16, 32, 3, padding=1)
        self.deep = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1))
        self.head = nn.Linear(32, digits.CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(image))
        x = self.deep(x) if bool(image.sum() < 0) else self.shallow(x)
        return self.head(F.relu(x).mean(dim=(2, 3)))


def switch() -> Switch:
    """An untrained :class:`Switch` (a model factory for recipes)."""
    torch.manual_seed(0)
    return Switch().eval()


def _images() -> torch.Tensor:
    return next(iter(digits.loaders(image=True)["eval"]))[0]


def test_a_branch_taken_by_a_calibration_batch_is_traced_on_it() -> None:
    model, images = switch(), _images()
    reach = find_reach(model, images[:2], [images[2:10], -images[10:18]])
    assert len(reach.inputs) == 1 and torch.equal(reach.inputs[0], -images[10:18]) and not reach.unreached
    assert reach.searched == 2  # the first batch took the example's branch: searched on
    prune_step(model, images[:2], 0.3, ChannelOptions("global", 2, 1, 0.9, [], reach=reach), ChannelState())
    assert model.stem.out_channels < 16 and model.deep[0].in_channels == model.stem.out_channels
    with torch.no_grad():  # both branches run on the cut channels
        assert model(images).shape == model(-images).shape == (len(images), digits.CLASSES)


def test_a_branch_no_input_takes_is_probed_and_still_runs_after_the_cut(tmp_path: Path) -> None:
    recipe = {
        "name": "switch",
        "seed": 0,
        "metrics": dict(FAST_METRICS),
        "model": {"target": "tests.test_structured_branches:switch"},
        "data": {"target": "torchslim.examples.digits:loaders", "kwargs": {"image": True}},
        "stages": [{"type": "prune", "method": "structured", "amount": 0.3}],
    }
    registry = Registry.load(autoload=False)
    report = torchslim.run(recipe, tmp_path, registry=registry)
    model, images = report.model, _images()
    assert any("1 module(s) (deep) ran neither on the example inputs nor on" in note for note in report.notes)
    assert model.stem.out_channels < 16 and model.deep[0].in_channels == model.stem.out_channels
    assert report.final.metrics["macs"] < report.baseline.metrics["macs"]
    loaded = torchslim.load_model(tmp_path, registry=registry)
    with torch.inference_mode():  # the branch no input took runs, before and after the reload
        assert torch.equal(loaded(-images), model(-images)) and model(-images).shape == (len(images), digits.CLASSES)


def test_a_layer_computed_with_but_never_called_counts_as_reached() -> None:
    """``F.linear(x, self.proj.weight)`` reaches proj without calling it: nothing to search for or probe."""

    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(64, digits.CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.proj.weight, self.proj.bias)

    reach = find_reach(Bypass(), torch.rand(2, 64), iter(()))
    assert not reach.unreached and not reach.inputs
