"""Static int8 in torch.ao's eager mode, layer by layer: the fallback of :class:`._ao.FxBackend` for a model
torch.fx cannot trace or whose converted graph does not run.

Each layer is wrapped in an :class:`Int8Layer` that quantizes its input and dequantizes its output, so the
model's own forward runs unchanged around it. The wrapper keeps the float layer's identity (its ``weight``,
``bias`` and size attributes, see :mod:`._identity`), as the model's code may read them; a layer the model
bypasses (computing with its weights, never calling it) stays float.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .._layers import matches
from ._backends import StaticOptions
from ._identity import bypassed_layers, identity_tensor

#: Attributes a wrapper does not copy from its layer: torch.nn's own bookkeeping.
_NOT_COPIED = frozenset({"training"})


class Int8Layer(nn.Module):
    """One layer quantized on its own (eager mode): its input quantized, its output dequantized.

    It reads as the float layer it replaced: ``weight`` and ``bias`` are the (dequantized) values, and the
    layer's plain attributes (``in_features``, ``out_channels``, ``kernel_size``, ...) are copied over.
    """

    def __init__(self, layer: nn.Module, quant: nn.Module, dequant: nn.Module) -> None:
        super().__init__()
        self.quant = quant
        self.layer = layer
        self.dequant = dequant
        for key, value in vars(layer).items():
            if not key.startswith("_") and key not in _NOT_COPIED and isinstance(value, (int, float, str, tuple)):
                setattr(self, key, value)
        weight, bias = layer.get_parameter("weight"), getattr(layer, "bias", None)
        self._shapes = (tuple(weight.shape), None if bias is None else tuple(bias.shape))

    @property
    def weight(self) -> Any:
        """The layer's weight: float while calibrating, the int8 weight dequantized once converted."""
        return identity_tensor(self._shapes[0], lambda: _value(self.layer.weight), self)

    @property
    def bias(self) -> Any:
        """The layer's float bias, or None."""
        shape = self._shapes[1]
        return None if shape is None else identity_tensor(shape, lambda: _value(self.layer.bias), self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, float and contiguous as the float layer's was."""
        out: torch.Tensor = self.dequant(self.layer(self.quant(x)))
        # int8 convolutions hand back channels-last tensors; the user's forward may .view() the output.
        return out.contiguous()


def _value(attribute: Any) -> torch.Tensor:
    # A float layer's parameter, or a converted layer's method (torch.ao's weight() and bias()).
    value: torch.Tensor = attribute() if callable(attribute) else attribute
    return value


def bypassed_wrapped(model: nn.Module, options: StaticOptions, batch: Any) -> list[str]:
    """The layers eager mode would wrap that the model's forward on ``batch`` bypasses (computing with their weights)."""
    prepared = eager_prepare(copy.deepcopy(model), options)
    names = [name for name, m in prepared.named_modules() if isinstance(m, Int8Layer)]
    return bypassed_layers(prepared, names, lambda m: m(batch))


def eager_prepare(model: nn.Module, options: StaticOptions) -> nn.Module:
    """Wrap each layer to quantize in an :class:`Int8Layer` and insert observers (eager mode)."""
    from torch.ao.quantization import DeQuantStub, QuantStub, get_default_qconfig, prepare

    from ._ao import select_engine

    select_engine(options.backend)
    qconfig = get_default_qconfig(options.backend)
    wanted = tuple(getattr(nn, name) for name in options.modules)
    skipped = (*options.exclude, *options.keep_float)
    names = [name for name, m in model.named_modules() if name and type(m) in wanted and not matches(name, skipped)]
    for name in names:
        wrapper = Int8Layer(model.get_submodule(name), QuantStub(qconfig), DeQuantStub(qconfig))
        wrapper.qconfig = qconfig  # only the wrappers' layers are quantized: the rest has no qconfig
        _replace(model, name, wrapper)
    prepared: nn.Module = prepare(model.eval(), inplace=True)
    return prepared


def eager_convert(prepared: nn.Module) -> nn.Module:
    """The prepared (and calibrated) model with its wrapped layers converted to int8."""
    from torch.ao.quantization import convert

    converted: nn.Module = convert(prepared, inplace=True)
    return converted.eval()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def eager_note(why: Exception) -> str:
    """The note of a model quantized in eager mode because FX failed (``why``)."""
    return (
        f"{why}, so it was quantized in eager mode, layer by layer: each int8 layer quantizes its input and "
        "dequantizes its output (no fusion with BatchNorm/ReLU, float between layers), slower than a traced int8 graph"
    )
