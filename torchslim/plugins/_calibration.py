"""The calibration inputs: read from the recipe's calibration loader once per run, shared by every stage.

Static quantization, Wanda, structured pruning's measured importances and refit, GPTQ, the sensitivity
ranking and the runtimes' quantizers all run the model over the first batches of the calibration data.
The model differs from stage to stage, the inputs do not: they are read once (as many batches as the
most any stage has asked for so far) and kept in the run's shared context (``Context.shared``), so a
chain of such stages pulls each batch out of the user's loader once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.stage import Context

_KEY = "calibration_inputs"


def calibration_inputs(ctx: Context, limit: int) -> list[torch.Tensor]:
    """The inputs of the first ``limit`` calibration batches (fewer when the loader has fewer)."""
    cached: list[torch.Tensor] = ctx.shared.get(_KEY, [])
    exhausted = ctx.shared.get(_KEY + "_exhausted", False)
    if len(cached) < limit and not exhausted:
        cached = list(batch_inputs(ctx.data["calibration"], limit))
        ctx.shared[_KEY], ctx.shared[_KEY + "_exhausted"] = cached, len(cached) < limit
    return cached[:limit]


@dataclass(frozen=True)
class Calibration:
    """Calibration inputs, iterable more than once (a backend that falls back from one mode to another
    calibrates again)."""

    inputs: list[torch.Tensor]

    @classmethod
    def of(cls, ctx: Context, limit: int) -> Calibration:
        """The run's first ``limit`` calibration inputs (:func:`calibration_inputs`)."""
        return cls(calibration_inputs(ctx, limit))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)


def batch_inputs(batches: Iterable[Any], limit: int) -> Iterator[torch.Tensor]:
    """The inputs of the first ``limit`` ``(inputs, targets)`` batches of any loader."""
    for batch in itertools.islice(batches, limit):  # islice: never pull a batch beyond the limit
        yield batch[0] if isinstance(batch, (tuple, list)) else batch
