"""Convolutions whose padding is a string (``padding="same"`` or ``"valid"``), which torch's int8 convolutions do
not take (``quantized::conv2d_prepack`` wants a list of ints: the stage failed in FX and in eager mode alike).

Before a static backend sees the model, each such layer gets the numbers its string stands for, where they are
the same on both sides of every dimension (``"valid"``: 0; ``"same"``: ``dilation * (kernel - 1) / 2`` when that
is a whole number), which computes exactly what the string did. A ``"same"`` that pads one more on one side
(an even kernel) has no such numbers: that layer stays float, and a note says why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from .._layers import select_layers

#: Why a convolution with an uneven ``padding="same"`` stays float.
UNEVEN = "padding='same' pads one more on one side here (an even kernel), which torch's int8 convolution cannot express"


@dataclass
class Padded:
    """The model with its string paddings made numbers, and the layers left float (by name, with why)."""

    model: nn.Module
    """A copy with the changed layers (the input model itself when no layer has a string padding)."""
    kept: dict[str, str] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """What the summary says about the layers left float (nothing when there are none)."""
        return [f"convolutions left float: {', '.join(self.kept)} ({UNEVEN})"] if self.kept else []


def numeric_padding(model: nn.Module, types: list[str], exclude: list[str], in_place: bool = False) -> Padded:
    """``model`` (a copy unless ``in_place``) with every convolution of ``types`` (outside ``exclude``) whose
    padding is a string given the numbers it stands for, or named in ``kept`` where there are none."""
    strings = [name for name, m in select_layers(model, types, exclude) if _string_padded(m)]
    if not strings:
        return Padded(model)
    result = Padded(model if in_place else copy.deepcopy(model))
    for name in strings:
        conv = result.model.get_submodule(name)
        assert isinstance(conv, nn.modules.conv._ConvNd)  # selected as one above
        numbers = _numbers(conv)
        if numbers is None:
            result.kept[name] = UNEVEN
        else:
            conv.padding = numbers  # the float forward pads the same: zeros on both sides of each dimension
    return result


def _string_padded(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and isinstance(module.padding, str)


def _numbers(conv: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """The padding per dimension the layer's string stands for, equal on both sides; None if there is none."""
    if conv.padding == "valid":
        return tuple(0 for _ in conv.kernel_size)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(total % 2 for total in totals):
        return None
    return tuple(total // 2 for total in totals)
