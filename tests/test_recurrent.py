"""Recurrent layers (LSTM, GRU, RNN): a saved model that cannot be loaded explained to its user."""

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
