"""Unstructured magnitude pruning of layer weights: plain zeros, no masks left behind."""

from __future__ import annotations

import torch
from torch import nn

from .._layers import weight_of


def torch_magnitude(layers: list[nn.Module], amount: float, global_scope: bool) -> None:
    """Zero ``amount`` of the weights (all layers ranked together, or each layer alone) with torch's L1 pruning."""
    from torch.nn.utils import prune

    targets = [(layer, "weight") for layer in layers]
    if global_scope:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for layer, name in targets:
            prune.l1_unstructured(layer, name, amount=amount)
    for layer, name in targets:
        prune.remove(layer, name)  # fold weight_orig * weight_mask back into a plain weight


def capped_magnitude(layers: list[nn.Module], amount: float, ceiling: float, global_scope: bool) -> None:
    """Zero the smallest weights like :func:`torch_magnitude`, but never more than ``ceiling`` of any one layer.

    Global ranking alone can empty a small layer whose weights happen to be small (a depthwise
    conv): each layer offers only its ``ceiling`` smallest weights to the global ranking.
    """
    weights = [weight_of(layer) for layer in layers]
    with torch.no_grad():
        if not global_scope:
            for weight in weights:
                _zero_smallest(weight, round(min(amount, ceiling) * weight.numel()))
            return
        offers = [torch.sort(w.detach().abs().flatten()).values[: int(ceiling * w.numel())] for w in weights]
        count = min(round(amount * sum(w.numel() for w in weights)), sum(o.numel() for o in offers))
        if count == 0:
            return
        owners = torch.cat([torch.full((o.numel(),), i) for i, o in enumerate(offers)])
        chosen = torch.topk(torch.cat(offers), count, largest=False).indices
        per_layer = torch.bincount(owners[chosen], minlength=len(weights))
        for weight, k in zip(weights, per_layer.tolist(), strict=True):
            _zero_smallest(weight, k)


def _zero_smallest(weight: torch.Tensor, count: int) -> None:
    if count <= 0:
        return
    flat = weight.detach().view(-1)
    flat[torch.topk(flat.abs(), count, largest=False).indices] = 0.0
