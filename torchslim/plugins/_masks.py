"""The one zero keeper: weights that are exactly zero before a stage trains stay zero through it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class ZeroMasks:
    """Where a model's weights are exactly zero, re-imposed after every optimizer step.

    Captured from the whole model, not from the layers the current stage touched: the zeros an
    earlier stage left elsewhere (an unstructured prune before an N:M one) must survive too.
    Masks are keyed by parameter name within the captured model, so they still apply when the
    training loop wraps that model (DistributedDataParallel, a module with projections).
    """

    model: nn.Module
    """The model the masks were taken from; the names below are relative to it."""
    masks: dict[str, torch.Tensor]
    """Parameter name -> True where the weight may move, False where it must stay zero."""

    @classmethod
    def of(cls, model: nn.Module) -> ZeroMasks:
        """Every weight of ``model`` (parameters of two or more dimensions) that holds an exact zero.

        Capture after moving the model to its device: the masks live where the weights do.
        """
        # Trained weights are practically never exactly zero, so exact zeros mark pruned weights.
        # Biases and norm scales (one dimension) are never pruned, and a zero there is a real value.
        masks = {name: p.detach() != 0 for name, p in model.named_parameters() if p.dim() > 1 and bool((p == 0).any())}
        return cls(model, masks)

    def reapply(self) -> None:
        """Zero the masked weights again (call after each optimizer step)."""
        if not self.masks:
            return
        # Adam and SGD with momentum or weight decay move every weight, zeros included;
        # multiplying by the mask after each step keeps the pattern exactly.
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.masks:
                    p.mul_(self.masks[name])

    def __len__(self) -> int:
        """The number of masked parameters."""
        return len(self.masks)
