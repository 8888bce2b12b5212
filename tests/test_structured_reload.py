"""A structured prune saved and loaded back: layers registered under two names, tensors tied between layers,
bidirectional LSTMs over rows and columns (a cut undone, tensors of the LSTM that share a channel count by chance).
Each model is small and hand-written; the reload goes through torchslim.run's check and torchslim.load_model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchslim
from torchslim import Registry
from torchslim.examples import digits
from torchslim.plugins.prune._recurrent import prune_units
from torchslim.plugins.prune._shapes import changes, replay, snapshot
from torchslim.plugins.prune._structured_cut import save, undo

from .conftest import FAST_METRICS


class SharedMlp(nn.Module):
    """One MLP registered under two names (``self.mlp_a = self.mlp_b = ...``), applied to two streams that are
    added: a model's state dict then holds its tensors under both names, ``named_modules()`` only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Linear(64, 32)
        self.mlp_a = self.mlp_b = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.rows(x))
        return self.head(self.mlp_a(h) + self.mlp_b(0.5 * h))


class RowsAndColumns(nn.Module):
    """A convolution, then a bidirectional LSTM along the rows and another along the columns, concatenated on
    the channel axis and mixed back by a Linear (a residual): the rows' and columns' hidden units are pruned.
    Each LSTM's gates have ``4 * hidden`` = ``channels`` rows, as many as its input features (as in timm's
    Sequencer2d): cutting its inputs must not cut those rows."""

    def __init__(self, channels: int = 16, hidden: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.rnn_v = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.rnn_h = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(4 * hidden, channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image).permute(0, 2, 3, 1)
        n, rows, cols, channels = x.shape
        v, _ = self.rnn_v(x.permute(0, 2, 1, 3).reshape(-1, rows, channels))
        v = v.reshape(n, cols, rows, -1).permute(0, 2, 1, 3)
        h, _ = self.rnn_h(x.reshape(-1, cols, channels))
        x = x + self.fc(torch.cat([v, h.reshape(n, rows, cols, -1)], dim=-1))
        return self.head(x.mean(dim=(1, 2)))


def shared_mlp() -> nn.Module:
    """An untrained :class:`SharedMlp` (a model factory for recipes)."""
    torch.manual_seed(0)
    return SharedMlp().eval()


def rows_and_columns() -> nn.Module:
    """An untrained :class:`RowsAndColumns` (a model factory for recipes)."""
    torch.manual_seed(0)
    return RowsAndColumns().eval()


def _run(tmp_path: Path, factory: str, image: bool) -> tuple[Any, nn.Module, torch.Tensor]:
    recipe = {
        "name": "reload",
        "seed": 0,
        "metrics": dict(FAST_METRICS),
        "model": {"target": f"tests.test_structured_reload:{factory}"},
        "data": {"target": "torchslim.examples.digits:loaders", "kwargs": {"image": image}},
        "stages": [{"type": "prune", "method": "structured", "amount": 0.3}],
    }
    registry = Registry.load(autoload=False)
    report = torchslim.run(recipe, tmp_path, registry=registry)  # its reload check runs (--out)
    inputs = next(iter(digits.loaders(image=image)["eval"]))[0]
    return report, torchslim.load_model(tmp_path, registry=registry), inputs


def test_a_layer_registered_under_two_names_is_pruned_and_reloads(tmp_path: Path) -> None:
    report, loaded, inputs = _run(tmp_path, "shared_mlp", image=False)
    assert report.model.mlp_a is report.model.mlp_b and loaded.mlp_a is loaded.mlp_b
    assert loaded.mlp_a[0].out_features < 48  # the shared hidden layer lost neurons
    with torch.inference_mode():
        assert torch.equal(loaded(inputs), report.model(inputs))


def test_tensors_tied_between_layers_stay_tied_when_replayed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8))
    model[2].weight = nn.Parameter(model[0].weight.detach().t().contiguous())
    fresh = copy.deepcopy(model)
    fresh[2].weight = fresh[0].weight  # tied in the architecture: one tensor, two names
    pruned = copy.deepcopy(fresh)
    before = snapshot(pruned)
    pruned[0].weight = nn.Parameter(pruned[0].weight.detach()[:4])
    pruned[2].weight = pruned[0].weight
    rebuilt = replay(fresh, changes(before, pruned))
    assert rebuilt[0].weight is rebuilt[2].weight and rebuilt[0].weight.shape == (4, 8)


def test_rows_and_columns_lstms_are_pruned_and_reload_with_identical_outputs(tmp_path: Path) -> None:
    report, loaded, inputs = _run(tmp_path, "rows_and_columns", image=True)
    model = report.model
    assert model.stem.out_channels < 16 and model.rnn_v.input_size == model.stem.out_channels
    # both LSTMs lose units (the columns' one through a reshape of (n*rows, cols, c) to (n, rows, cols, c))
    assert model.rnn_v.hidden_size < 4 and model.rnn_h.hidden_size < 4
    assert not any("left whole" in note for note in report.notes), report.notes
    for lstm in (model.rnn_v, model.rnn_h):  # every gate keeps 4 * hidden_size rows, in both directions
        for name, tensor in lstm.named_parameters():
            assert tensor.shape[0] == 4 * lstm.hidden_size, name
    with torch.inference_mode():
        expected = model(inputs)
        assert torch.isfinite(expected).all() and torch.equal(loaded(inputs), expected)


def test_an_lstm_cut_undone_runs_as_before() -> None:
    """Undoing a cut restores an LSTM's list of flat weights too (it is updated in place when a weight is
    replaced): its forward reads the weights it had, not the cut ones with the old hidden size."""
    torch.manual_seed(0)
    lstm, inputs = nn.LSTM(6, 5, batch_first=True, bidirectional=True).eval(), torch.randn(2, 4, 6)
    with torch.no_grad():
        before = lstm(inputs)[0]
    saved = save(lstm)
    prune_units(lstm, [0, 5])
    undo(lstm, saved)
    with torch.no_grad():
        assert torch.equal(lstm(inputs)[0], before)
