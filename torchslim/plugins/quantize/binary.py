"""``method: binary``: 1-bit weights, ``sign(w) * mean|w|`` per output channel (XNOR-Net), packed 8 per byte."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from .formats import Format
from .lowbit import LowBitQuantize


class BinaryQuantize(LowBitQuantize):
    """Binary weights: each weight is +scale or -scale, the scale being its output channel's mean |w|.

    Post-training binarization destroys most networks; use ``train`` (quantization-aware training)
    and usually ``keep_ends``. A weight that is exactly zero (pruned) becomes +scale: 1 bit has no zero.
    """

    method: Literal["binary"] = "binary"
    """``binary``: 1-bit weights times a float scale per output channel."""
    activations: Literal["float", "binary"] = "float"
    """``float`` (weights only). ``binary`` activations (XNOR-Net's sign of the inputs) are not supported yet."""

    @field_validator("activations")
    @classmethod
    def _weights_only(cls, value: str) -> str:
        if value == "binary":
            raise ValueError("binary activations are not supported yet: torchslim binarizes weights only "
                             "(the layers keep float inputs); use activations: float")
        return value

    def layer_format(self) -> Format:
        """1 bit per weight, scale per output channel."""
        return Format("binary", 1)
