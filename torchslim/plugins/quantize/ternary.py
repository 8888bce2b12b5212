"""``method: ternary``: weights in ``{-1, 0, +1} * scale`` per output channel, packed 4 per byte."""

from __future__ import annotations

from typing import Literal

from .formats import Format
from .lowbit import LowBitQuantize


class TernaryQuantize(LowBitQuantize):
    """Ternary weights as in ternary weight networks (Li & Liu, 2016): per output channel, weights
    with |w| above 0.7 * mean |w| become +-scale, the scale being their mean |w|; the rest become 0.

    Chosen over BitNet b1.58's absmean rounding (scale = mean |w|, round(w / scale) clipped to +-1)
    because the threshold rule also serves post-training quantization of a float network, and
    zeros (pruned weights) stay zero. 2 bits per weight in the file.
    """

    method: Literal["ternary"] = "ternary"
    """``ternary``: weights in {-1, 0, +1} times a float scale per output channel."""

    def layer_format(self) -> Format:
        """Ternary codes, scale per output channel."""
        return Format("ternary", 2)
