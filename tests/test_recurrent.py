"""Recurrent layers (LSTM, GRU, RNN): a saved model that cannot be loaded explained to its user; hidden units
pruned (all gates' rows, the recurrent and next layer's columns), then int8, saved and reloaded."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

import torchslim
from torchslim import Context, Registry, Stage, StageEntry, StageError
from torchslim.engine.checkpoints import ReloadProblem
from torchslim.engine.runner import reload_message
from torchslim.examples import digits
from torchslim.plugins.quantize import DynamicQuantize


class TorchLSTMQuantize(Stage):
    """A plugin's stage that calls torch's dynamic quantization itself: the LSTM it returns keeps its
    packed weights as TorchScript objects in the state dict. Its restore redoes the swap correctly."""

    type: Literal["torch_lstm"] = "torch_lstm"

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """torch's dynamic int8 LSTM."""
        ctx.record_for_restore(quantized=True)
        return self.restore(model, {})

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """The same swap, for the saved tensors."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation
            return torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)


def test_model_whose_file_cannot_be_read_back_is_explained(tmp_path: Path) -> None:
    registry = Registry.load(autoload=False)
    registry.add(StageEntry("torch_lstm", "tests", "tests:TorchLSTMQuantize", cls=TorchLSTMQuantize))
    recipe = {
        "name": "lstm",
        "model": {"target": "tests.test_quantize:sequence_model", "kwargs": {"rows": True}},
        "data": {"target": "torchslim.examples.digits:loaders"},
        "metrics": {"latency": False},
        "stages": [{"type": "torch_lstm"}],
    }
    with pytest.raises(StageError) as caught:
        torchslim.run(recipe, tmp_path, registry=registry)
    message = str(caught.value)
    assert "\x1b" not in message  # torch bolds a phrase of its refusal
    assert message.startswith("stage torch_lstm: the model it returned cannot be saved so that it loads again (")
    assert "refused to load" in message and "GLOBAL torch.ScriptObject was not an allowed global" in message
    assert "The run stopped here rather than leave in --out a model that torchslim.load_model cannot load" in message
    assert "For the stage's author: everything in the model's state dict must load with torch.load(weights_only=True)" in message
    assert "record_for_restore" not in message  # the stage recorded its swap: that is not what is wrong
    log = (tmp_path / "torchslim.log").read_text()
    assert "UnpicklingError: Weights only load failed" in log and "\x1b" not in log  # torch's own message, the cause


def test_builtin_stage_failing_its_reload_is_reported_as_torchslim_bug() -> None:
    stage = DynamicQuantize(modules=["LSTM"])
    message = reload_message(stage, ReloadProblem("model.pt: does not fit the model: Missing key(s) \n  in state_dict"))
    assert message.startswith(
        "the model it returned cannot be rebuilt from its checkpoint as torchslim.load_model would "
        "(model.pt: does not fit the model: Missing key(s) in state_dict). The run stopped here"
    )
    assert message.endswith("This is a torchslim bug in the quantize stage: please report it with the recipe.")
    assert "record_for_restore" not in message


class Classifier(nn.Module):
    """The 8 x 8 digits as 8 rows of 8 pixels: a Linear on each row, a recurrent layer, a linear head on the
    last step (the recurrent layer's input features and hidden units are both prunable)."""

    def __init__(self, kind: str, layers: int, bidirectional: bool, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rows = nn.Linear(8, 12)
        self.rnn = getattr(nn, kind)(12, 16, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(16 * (2 if bidirectional else 1), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.relu(self.rows(x.reshape(len(x), 8, 8)))
        out, _ = self.rnn(steps if self.batch_first else steps.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


def classifier(kind: str = "GRU", layers: int = 2, bidirectional: bool = False, batch_first: bool = True) -> Classifier:
    """An untrained :class:`Classifier` (a model factory for recipes)."""
    torch.manual_seed(0)
    return Classifier(kind, layers, bidirectional, batch_first).eval()


def _silence(model: Classifier, units: int) -> None:
    """Make the last ``units`` hidden units of every layer and direction send nothing anywhere: their columns
    in the recurrent weights, the next layer's input weights and the head become zero."""
    rnn, hidden = model.rnn, model.rnn.hidden_size
    directions = 2 if rnn.bidirectional else 1
    dead = [d * hidden + j for d in range(directions) for j in range(hidden - units, hidden)]
    with torch.no_grad():
        for name, weight in rnn.named_parameters():
            if name.startswith("weight_hh"):
                weight[:, hidden - units :] = 0
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                weight[:, dead] = 0
        model.head.weight[:, dead] = 0


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
def test_silent_hidden_units_are_pruned_and_nothing_else_changes(kind: str, bidirectional: bool) -> None:
    from torchslim.plugins.prune._structured import ChannelOptions, ChannelState, prune_step

    model = classifier(kind, layers=2, bidirectional=bidirectional, batch_first=not bidirectional)
    _silence(model, 5)
    inputs = torch.rand(6, 64)
    with torch.no_grad():
        before = model(inputs)
    state = ChannelState()
    channels = 16 * (2 if bidirectional else 1)
    prune_step(model, inputs, 5 * (2 if bidirectional else 1) / channels, ChannelOptions("global", 2, 1, 0.9, ["rows"]), state)
    assert model.rnn.hidden_size == 11 and not state.skipped
    assert model.rnn.weight_ih_l1.shape[1] == 11 * (2 if bidirectional else 1)  # the next layer's input columns
    with torch.no_grad():
        assert torch.allclose(model(inputs), before, atol=1e-6)  # the silent units, and only they, are gone


def _recipe(stages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    return {
        "name": "rnn",
        "seed": 0,
        "metrics": {"warmup": 1, "runs": 2, "batch_size": 8},
        "model": {"target": "tests.test_recurrent:classifier", "kwargs": kwargs},
        "data": {"target": "torchslim.examples.digits:loaders"},
        "stages": stages,
    }


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_pruned_recurrent_classifier_is_int8_and_reloads(tmp_path: Path, kind: str) -> None:
    stages = [
        {"type": "prune", "method": "structured", "amount": 0.3, "scope": "layer"},
        {"type": "quantize", "method": "dynamic", "modules": ["Linear", kind]},
    ]
    registry = Registry.load(autoload=False)
    report = torchslim.run(_recipe(stages, kind=kind, bidirectional=True), tmp_path, registry=registry)
    baseline, pruned = report.baseline.metrics, report.rows[1].metrics
    assert report.model.rnn.hidden_size == 11  # 30% of 16 units, in both directions
    assert report.model.rnn.input_size == 8  # 30% of the 12 features the Linear before it fed in
    assert pruned["params"] < 0.75 * baseline["params"] and pruned["macs"] < 0.6 * baseline["macs"]
    loaded = torchslim.load_model(tmp_path, registry=registry)
    inputs = next(iter(digits.loaders()["eval"]))[0]
    with torch.inference_mode():
        assert torch.equal(loaded(inputs), report.model(inputs))


class Stacked(nn.Module):
    """Rows -> an LSTM read only by a second LSTM -> a head on the last step."""

    def __init__(self, proj_size: int = 0) -> None:
        super().__init__()
        self.rows = nn.Linear(8, 12)
        self.low = nn.LSTM(12, 16, batch_first=True)
        self.high = nn.LSTM(16, 16, batch_first=True, proj_size=proj_size)
        self.head = nn.Linear(proj_size or 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, _ = self.low(torch.relu(self.rows(x.reshape(len(x), 8, 8))))
        return self.head(self.high(low)[0][:, -1])


def test_units_read_only_by_another_recurrent_layer_are_ranked_by_its_input_columns() -> None:
    """The low LSTM's units are read by the high LSTM alone (no Linear to score them): its silent units, whose
    columns in the high LSTM's input weights are zero, go first, and nothing else changes."""
    from torchslim.plugins.prune._structured import ChannelOptions, ChannelState, prune_step

    torch.manual_seed(0)
    model, inputs = Stacked().eval(), torch.rand(6, 64)
    with torch.no_grad():
        model.low.weight_hh_l0[:, 11:] = 0
        model.high.weight_ih_l0[:, 11:] = 0
        before = model(inputs)
    state = ChannelState()
    prune_step(model, inputs, 5 / 16, ChannelOptions("global", 2, 1, 0.9, ["rows", "high"]), state)
    assert model.low.hidden_size == 11 and model.high.input_size == 11 and not state.skipped
    with torch.no_grad():
        assert torch.allclose(model(inputs), before, atol=1e-6)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_an_lstm_with_proj_size_is_kept_whole_saying_what_to_do() -> None:
    from torchslim.plugins.prune._structured import ChannelOptions, ChannelState, prune_step

    torch.manual_seed(0)
    model, state = Stacked(proj_size=6).eval(), ChannelState()
    prune_step(model, torch.rand(6, 64), 0.3, ChannelOptions("global", 2, 1, 0.9, []), state)
    assert model.high.hidden_size == 16 and model.high.proj_size == 6 and model.low.hidden_size < 16
    assert state.skipped["high"].startswith(
        "an LSTM with proj_size=6 outputs its projection, which torchslim does "
        "not cut; its 16 hidden units and its output are kept whole"
    )
    assert "build it without proj_size" in state.skipped["high"]
