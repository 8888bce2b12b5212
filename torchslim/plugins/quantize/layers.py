"""The layer a low-bit method swaps in: packed codes and scales as buffers, dequantized on the fly.

Only plain tensors are saved (uint8 bit streams, float8 values, float16 scales and biases, or float32
where a value is outside float16's normal range), so a
saved model loads with ``weights_only=True`` and its file is as small as the codes really are.
A call unpacks the codes and runs torch's float kernel (on the measured CPU torch's int8 and float8
kernels were slower than float32), except in a 4-bit Linear whose format says ``kernel: int4pack``:
that one runs torch's int4 kernel on bfloat16 inputs (:mod:`.int4pack`; chosen per layer by ``kbit``).
With ``activations: binary`` the inputs are binarized first (:mod:`.activations`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import bias_of, weight_of
from .activations import binarize, input_dims
from .formats import Format, QWeight, dequantize, symmetric_zero
from .int4pack import Int4Weight
from .packing import pack, packed_length, unpack

#: The constructor arguments of F.conv2d a converted Conv2d keeps.
CONV_ARGS = ("stride", "padding", "dilation", "groups")


class LowBitLayer(nn.Module):
    """A Linear or Conv2d whose weight is stored packed at its bit width (or as float8) with scales.

    ``weight()`` gives the dequantized float weight (what the metrics count); ``forward`` computes
    the float layer's function on it.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, layer: nn.Module, fmt: Format) -> None:
        super().__init__()
        self.fmt = fmt
        self.shape = tuple(weight_of(layer).shape)
        self._copy_geometry(layer)
        out, features = self.shape[0], math.prod(self.shape[1:])
        groups = fmt.groups(features)
        if fmt.kind == "float8":
            self.register_buffer("codes", torch.zeros(out, features, dtype=getattr(torch, fmt.float8)))
        else:
            self.register_buffer("codes", torch.zeros(packed_length(out * features, fmt.bits), dtype=torch.uint8))
        stored = getattr(torch, fmt.storage)
        self.register_buffer("scale", torch.ones(out, groups, dtype=stored))
        self.register_buffer("zero", None if fmt.symmetric or fmt.kind != "int" else torch.zeros(out, groups, dtype=torch.uint8))
        self.register_buffer("bias", None if bias_of(layer) is None else torch.zeros(out, dtype=stored))
        self._int4: Int4Weight | None = None  # the int4 kernel's layout, built from the buffers when first used
        self.register_load_state_dict_post_hook(_forget_int4)

    def _copy_geometry(self, layer: nn.Module) -> None:
        # The attribute names of torch's layers: the MAC counter and users read them.
        if isinstance(layer, nn.Linear):
            self.in_features, self.out_features = layer.in_features, layer.out_features
            return
        self.in_channels, self.out_channels, self.kernel_size = layer.in_channels, layer.out_channels, layer.kernel_size
        self.conv: dict[str, Any] = {name: getattr(layer, name) for name in CONV_ARGS}
        self.groups = layer.groups

    @classmethod
    def convert(cls, layer: nn.Module, fmt: Format, q: QWeight) -> LowBitLayer:
        """``layer`` with its weight replaced by the quantized ``q`` (scales and bias stored as ``fmt.storage``)."""
        new = cls(layer, fmt).to(weight_of(layer).device)
        with torch.no_grad():
            new.codes.copy_(q.codes if fmt.kind == "float8" else pack(q.codes, fmt.bits))
            new.scale.copy_(q.scale)
            if new.zero is not None:
                new.zero.copy_(q.zero)  # type: ignore[arg-type]  # a zero tensor whenever the layer has a zero buffer
            bias = bias_of(layer)
            if new.bias is not None and bias is not None:
                new.bias.copy_(bias.detach())
        return new

    def qweight(self) -> QWeight:
        """The stored codes (unpacked), scales and zeros."""
        out, features = self.shape[0], math.prod(self.shape[1:])
        codes = self.codes if self.fmt.kind == "float8" else unpack(self.codes, self.fmt.bits, out * features)
        zero = self.zero if self.zero is not None else _ZEROS[self.fmt.kind](self.fmt)
        return QWeight(codes.view(out, features), self.scale, zero)

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight, in the float layer's shape."""
        return dequantize(self.qweight()).view(self.shape)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The float layer's function on the stored weight (and binarized inputs, if the format says so)."""
        if self.fmt.activations == "binary":
            inputs = binarize(inputs, input_dims(self))
        return self.run(inputs, self.fmt.kernel)

    def run(self, inputs: torch.Tensor, kernel: str) -> torch.Tensor:
        """The layer's function computed by ``kernel``: ``dequantize`` (the weight unpacked to float32, then
        torch's float kernel) or ``int4pack`` (a 4-bit Linear on the CPU; inputs that need a gradient,
        which the int4 kernel has not, or live on another device are computed by ``dequantize``)."""
        bias = self.bias.float() if self.bias is not None else None
        if not hasattr(self, "in_features"):
            return F.conv2d(inputs, self.weight(), bias, **self.conv)
        if kernel == "int4pack" and inputs.device.type == "cpu" and not inputs.requires_grad:
            if self._int4 is None:
                self._int4 = Int4Weight.of(self.qweight(), self.fmt)
            return self._int4.linear(inputs, bias)
        return F.linear(inputs, self.weight(), bias)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        kernel = ", int4 kernel" if self.fmt.kernel == "int4pack" else ""
        return f"{'x'.join(str(d) for d in self.shape)}, {self.fmt.describe()}{kernel}"


def _forget_int4(layer: Any, _keys: Any) -> None:
    # New codes or scales were loaded: the kernel's layout is rebuilt from them when next used.
    layer._int4 = None


#: The fixed zero point of each symmetric format (asymmetric int formats store theirs).
_ZEROS: dict[str, Any] = {"binary": lambda f: 0.5, "ternary": lambda f: 1.0, "float8": lambda f: 0.0, "int": symmetric_zero}
