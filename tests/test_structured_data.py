"""Structured pruning with calibration data: ``importance: activation`` and ``refit``, on the bundled digits
(a trained MLP and CNN) and on a tiny transformers BERT (heads and feed-forward neurons)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from torchslim.engine.metrics import accuracy
from torchslim.examples import digits
from torchslim.plugins.prune import StructuredPrune

from .conftest import make_ctx

pytestmark = pytest.mark.usefixtures("one_thread")


def _prune(model: nn.Module, data: dict, **options: object) -> tuple[nn.Module, object]:
    ctx = make_ctx(model, data)
    stage = StructuredPrune.from_options(method="structured", **options)
    return stage.apply(copy.deepcopy(model), ctx), ctx


def _logit_error(model: nn.Module, original: nn.Module, data: dict) -> float:
    """Mean squared difference of the two models' outputs on the eval digits (not what the refit saw)."""
    with torch.no_grad():
        pairs = [(model(x), original(x)) for x, _ in data["eval"]]
    return float(sum(((a - b) ** 2).sum() for a, b in pairs) / sum(a.numel() for a, _ in pairs))


def test_refit_brings_the_pruned_outputs_back_toward_the_original(trained_mlp: nn.Module, flat: dict) -> None:
    options = {"amount": 0.5, "scope": "layer", "importance": "l2"}
    plain, _ = _prune(trained_mlp, flat, **options)
    refit, ctx = _prune(trained_mlp, flat, **options, refit=True)
    assert [m.in_features for m in refit.modules() if isinstance(m, nn.Linear)] == [64, 16, 16]
    assert _logit_error(refit, trained_mlp, flat) < 0.5 * _logit_error(plain, trained_mlp, flat)
    assert accuracy(refit, flat["eval"]) >= accuracy(plain, flat["eval"]) - 0.01
    # the two layers that lost inputs, named with their errors in the note
    assert ctx.metrics["refit_layers"] == 2
    note = next(n for n in ctx.notes if "refit 2 Linear layer(s)" in n)
    found = re.search(r"error (\S+) after the cut, (\S+) after the refit", note)
    assert found and float(found[2]) < float(found[1])


def test_refit_without_a_linear_reader_says_it_changed_nothing(images: dict) -> None:
    cnn = digits.cnn(train_epochs=0)
    pruned, ctx = _prune(cnn, images, amount=0.5, scope="layer", refit=True, exclude=["3"])  # only conv 0 is cut
    assert pruned[3].in_channels == 4
    assert any("refit changed nothing: no Linear layer lost inputs" in n for n in ctx.notes)
    assert "refit_layers" not in ctx.metrics


def _with_dead_neurons(model: nn.Module, count: int) -> nn.Module:
    """The MLP with ``count`` first-layer neurons that never fire (bias -1000) but carry the largest weights."""
    dead = copy.deepcopy(model)
    first, second = dead[0], dead[2]
    with torch.no_grad():
        first.weight[:count] *= 10
        first.bias[:count] = -1000.0
        second.weight[:, :count] *= 10
    return dead


@pytest.mark.parametrize(("importance", "dead_left"), [("activation", 0), ("obs", 0), ("l2", 8)])
def test_activation_importance_removes_neurons_that_never_fire(
    trained_mlp: nn.Module, flat: dict, importance: str, dead_left: int
) -> None:
    dead = _with_dead_neurons(trained_mlp, 8)
    pruned, _ = _prune(dead, flat, amount=0.25, scope="layer", importance=importance, exclude=["2"])
    assert pruned[0].out_features == 24
    assert int((pruned[0].bias < -100).sum()) == dead_left
    if importance != "l2":  # only silent neurons went: the function is unchanged
        assert _logit_error(pruned, dead, flat) < 1e-10


class _WithTwin(nn.Module):
    """A Linear layer reading the digits' 64 pixels plus a copy of pixel 36 (a feature another can replace)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(65, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, x[:, 36:37]], dim=1))


def test_obs_scale_is_what_a_refit_cannot_recover(flat: dict) -> None:
    from torchslim.plugins.prune._structured_data import input_scales

    model = _WithTwin()
    batches = [x for x, _ in flat["calibration"]]
    energy = input_scales(model, batches)[model.linear]
    compensated = input_scales(model, batches, compensated=True)[model.linear]
    assert energy[36] > 0.5 and energy[64] == energy[36]  # a bright pixel and its copy
    assert compensated[36] < 1e-2 * energy[36] and compensated[64] < 1e-2 * energy[64]  # either can go: the other takes over
    assert energy[0] == 0 and compensated[0] == 0  # pixel 0 is always dark: free to remove under both
    assert bool((compensated <= energy + 1e-6).all())


class _Caching(nn.Sequential):
    """An MLP that keeps a tensor computed in its forward as an attribute (as timm's LeViT keeps its
    attention biases): after a forward with gradients on, the attribute carries autograd history."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "cache", None):  # filled once, by the first forward
            self.cache = {"scale": self[0].weight.abs().mean()}
        return super().forward(x)


def test_refit_copes_with_tensors_a_forward_cached(trained_mlp: nn.Module, flat: dict) -> None:
    model = _Caching(*copy.deepcopy(trained_mlp))  # the stage's traced forward fills the cache
    pruned, ctx = _prune(model, flat, amount=0.5, scope="layer", refit=True)
    assert ctx.metrics["refit_layers"] == 2 and pruned[0].out_features == 16
