"""Short fine-tuning between the steps of a gradual prune: cross-entropy on the labels, Adam."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.stage import Batch


def zero_masks(model: nn.Module, layers: Iterable[nn.Module]) -> dict[nn.Parameter, torch.Tensor]:
    """For each layer's weight, where it is non-zero: pruned weights must stay zero while training."""
    masks: dict[nn.Parameter, torch.Tensor] = {}
    for layer in layers:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, nn.Parameter):
            masks[weight] = weight.detach() != 0
    return masks


def finetune(model: nn.Module, loader: Iterable[Batch], epochs: int, lr: float,
             masks: Mapping[nn.Parameter, torch.Tensor]) -> float:
    """Train ``model`` in place; returns the mean loss of the last epoch (NaN if the loader was empty)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    loss_sum, batches = 0.0, 0
    for _ in range(epochs):
        loss_sum, batches = 0.0, 0
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _reapply(masks)
            loss_sum, batches = loss_sum + float(loss.detach()), batches + 1
    model.eval()
    return loss_sum / batches if batches else float("nan")


def _reapply(masks: Mapping[nn.Parameter, torch.Tensor]) -> None:
    # Adam moves every weight, zeros included (momentum); multiplying by the mask after each
    # step keeps the pruned pattern exactly.
    with torch.no_grad():
        for param, mask in masks.items():
            param.mul_(mask)
