"""``method: float8``: float8 weights (e4m3fn or e5m2) times a float scale per output channel."""

from __future__ import annotations

from typing import Literal

from .formats import Format
from .lowbit import LowBitQuantize


class Float8Quantize(LowBitQuantize):
    """float8 weights: each output channel scaled so its largest |w| is the format's largest value.

    One byte per weight. torch's CPU float8 matmul (``_scaled_mm``) quantizes the activations too and
    was slower than float32 here, so the layers dequantize (docs/quantize.md).
    """

    method: Literal["float8"] = "float8"
    """``float8``: float8 weights times a float scale per output channel."""
    dtype: Literal["float8_e4m3fn", "float8_e5m2"] = "float8_e4m3fn"
    """``float8_e4m3fn`` (more precision) or ``float8_e5m2`` (more range)."""

    def layer_format(self) -> Format:
        """float8 values, scale per output channel."""
        return Format("float8", 8, float8=self.dtype)
