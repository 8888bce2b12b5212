"""An example torchslim plugin: the ``scale`` stage, which multiplies Linear weights by a factor.

It exists to show how a third-party stage is written and registered; scaling weights is
not a useful compression on its own.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from torchslim import Context, Stage, StageError


class ScaleStage(Stage):
    """Multiply the weight of every ``nn.Linear`` layer by ``factor``, in place.

    Registered under the entry point ``scale`` in the ``torchslim.stages`` group; the
    entry-point name must equal the ``type`` tag below.
    """

    type: Literal["scale"] = "scale"
    factor: float = Field(default=0.5, gt=0)
    """Number every Linear weight is multiplied by (greater than 0)."""

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Scale the floating-point weights of all Linear layers and report how many were scaled."""
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not layers:
            raise StageError(self.label, "the model has no nn.Linear layer to scale")
        scaled = 0
        with torch.no_grad():
            for layer in layers:
                if isinstance(layer.weight, torch.Tensor) and layer.weight.is_floating_point():
                    layer.weight.mul_(self.factor)
                    scaled += 1
        ctx.add_metric("scaled_layers", scaled)
        return model
