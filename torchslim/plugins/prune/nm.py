"""N:M semi-structured pruning: at most ``n`` non-zeros in every ``m`` weights along the input dimension."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ...engine.errors import StageError
from ...engine.stage import Context
from .._layers import weight_of
from ._nm import fits, nm_mask
from .zeroing import Layers, LayerTypes, ZeroingPrune


class NMPrune(ZeroingPrune):
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input dimension (2:4 by
    default); layers whose input dimension is not a multiple of ``m`` are left dense."""

    cpu_note: ClassVar[str] = (
        "N:M sparsity is accelerated only by sparse tensor cores (NVIDIA Ampere and later); on a CPU the zeros "
        "do not lower latency, and only a packed encoding of the weights makes the file smaller"
    )

    method: Literal["nm"] = "nm"
    """``nm``: at most ``n`` non-zeros in every ``m`` consecutive weights along the input dimension."""
    modules: LayerTypes = ["Linear", "Conv2d"]  # noqa: RUF012 (pydantic copies a default for each instance)
    """Layer types (torch.nn class names) whose weights are pruned."""
    n: int = Field(default=2, ge=1)
    """Non-zeros kept in each group of ``m``; the sparsity is ``1 - n/m``."""
    m: int = Field(default=4, ge=2)
    """Group size along the input dimension."""

    def _problems(self) -> list[tuple[str, str]]:
        return self._pattern_problems() + super()._problems()

    def _pattern_problems(self) -> list[tuple[str, str]]:
        if self.n >= self.m:
            return [("m", f"n ({self.n}) must be smaller than m ({self.m})")]
        if self.steps > self.m - self.n:
            return [
                (
                    "steps",
                    f"{self.n}:{self.m} pruning takes at most {self.m - self.n} steps (one more zero in each group per step)",
                )
            ]
        return []

    def _chosen(self, model: nn.Module) -> tuple[Layers, list[str]]:
        """The chosen layers that can follow the pattern, and the names of those that cannot."""
        chosen, _ = super()._chosen(model)
        fitting = {name: layer for name, layer in chosen.items() if fits(weight_of(layer), self.m)}
        if not fitting:
            raise StageError(
                self.label,
                f"no layer among modules {self.modules} has an input dimension divisible "
                f"by m={self.m}; N:M groups run along the input channels or features",
            )
        return fitting, [name for name in chosen if name not in fitting]

    def _step(self, model: nn.Module, layers: Layers, step: int, ctx: Context) -> None:
        zeros = round((self.m - self.n) * step / self.steps)  # per group, one more each step
        with torch.no_grad():
            for weight in map(weight_of, layers.values()):
                weight.mul_(nm_mask(weight, self.m - zeros, self.m))
