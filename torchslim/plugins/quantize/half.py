"""``method: half``: the whole model cast to float16 or bfloat16 (plain torch)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from ._backends import Quantized, module_types, take_census
from .base import QuantizeStage


class HalfQuantize(QuantizeStage):
    """Half precision: every float parameter and buffer cast to float16 or bfloat16.

    Callers keep feeding and receiving float32 tensors: float inputs are cast down and outputs
    back. Half the size; the speed depends on the CPU's float16/bfloat16 support.
    """

    method: Literal["half"] = "half"
    """``half``: the whole model cast to float16 or bfloat16."""
    dtype: Literal["float16", "bfloat16"] = "float16"
    """Weight and activation type: ``float16`` or ``bfloat16``."""

    def _check_targets(self, model: nn.Module) -> None:
        if not any(p.is_floating_point() for p in model.parameters()):
            raise StageError(self.label, "method half: the model has no float parameters to cast")

    def _quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        half = _half(copy.deepcopy(model), self.dtype)
        dtype = getattr(torch, self.dtype)
        census = take_census(module_types(model), half, lambda m: _is_cast(m, dtype), prefix="model.")
        return Quantized(half, {}, census)

    def _restore(self, model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
        return _half(model, self.dtype)

    def _verb(self) -> str:
        return f"cast to {self.dtype}"

    def _caveats(self) -> list[str]:
        return [
            "half precision: float inputs are cast down and outputs back to float32; "
            "speed depends on the CPU's float16/bfloat16 support and can be slower than float32"
        ]


def _half(model: nn.Module, dtype: str) -> nn.Module:
    from ._modules import HalfPrecision

    return HalfPrecision(model, getattr(torch, dtype))


def _is_cast(module: nn.Module, dtype: torch.dtype) -> bool:
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.dtype == dtype for p in own)
