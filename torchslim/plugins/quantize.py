"""Built-in ``quantize`` stage: dynamic quantization of Linear and recurrent layers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..engine.errors import StageError
from ..engine.stage import Context, Stage
from ._layers import layer_census, layer_type

#: Layer types torch's dynamic quantization really converts. It accepts others (Conv2d)
#: and silently leaves them float, so anything else is refused at validation.
DYNAMIC_TYPES = ("Linear", "LSTM", "GRU", "LSTMCell", "GRUCell", "RNNCell")


class QuantizeStage(Stage):
    """Replace float layers by quantized ones with real int8 (or float16) kernels."""

    type: Literal["quantize"] = "quantize"
    method: Literal["dynamic"] = "dynamic"
    """``dynamic``: weights stored quantized, activations quantized on the fly (Linear, LSTM, GRU)."""
    dtype: Literal["qint8", "float16"] = "qint8"
    """Weight type of the quantized layers."""
    modules: list[str] = Field(default_factory=lambda: ["Linear"], min_length=1)
    """Layer types (torch.nn class names) to quantize; dynamic supports Linear, LSTM, GRU and the cells."""

    @field_validator("modules")
    @classmethod
    def _supported(cls, value: list[str]) -> list[str]:
        for name in value:
            layer_type(name)
            if name not in DYNAMIC_TYPES:
                raise ValueError(f"dynamic quantization cannot quantize {name} (torch would leave it float); "
                                 f"supported: {', '.join(DYNAMIC_TYPES)}")
        return value

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Return a quantized copy of ``model``; StageError if no layer was converted."""
        before = _census(model, self.modules)
        if not before:
            raise StageError(self.label, f"modules {self.modules} matched no layer; the model has: {layer_census(model)}")
        quantized = self._convert(model)
        left = _census(quantized, self.modules)
        if left:
            raise StageError(self.label, f"these layers stayed float: {', '.join(left)}")
        ctx.add_metric("quantized_layers", len(before))
        ctx.note("dynamic quantization runs on the CPU only; quantized layers cannot be trained further")
        return quantized

    def restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        """Swap in the same quantized layer types, ready for the saved tensors."""
        return self._convert(model)

    def _convert(self, model: nn.Module) -> nn.Module:
        types = {layer_type(name) for name in self.modules}
        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in 2.13 and warns on every call; the
            # replacement (torchao) is not a dependency, so the warning tells the user nothing.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
            quantized: nn.Module = torch.ao.quantization.quantize_dynamic(model.eval(), types, dtype=getattr(torch, self.dtype))
            return quantized


def _census(model: nn.Module, names: list[str]) -> list[str]:
    types = tuple(layer_type(name) for name in names)
    return [name for name, module in model.named_modules() if type(module) in types]
